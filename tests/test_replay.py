"""The rehearsal baselines er / der / derpp (strategies/replay.py) on split_digits with a tiny
CNN: the Avalanche buffer's size and balance, the loss of a training step recomputed by
hand, memory rows at the front of the mini-batch (extra elements untouched), the stored
logits, the full head, determinism for a seed, an exact checkpoint round trip, config
errors, and each strategy end to end through the CLI."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from typing import Any

import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.storage_policy import ClassBalancedBuffer, ReservoirSamplingBuffer
from avalanche.training.supervised.der import ClassBalancedBufferWithLogits
from clbench.strategies.replay import DER, ER, DERpp
from torch import nn

from clbench import statefile
from clbench.data import TensorBatches, materialise
from clbench.errors import ConfigError
from clbench.models import ClassifierModel
from clbench.registry import SCENARIOS, STRATEGIES
from helpers import only_run_dir, results_of, run_cli, snapshot_after

MEM, MEM_BATCH = 30, 8


@pytest.fixture(scope="module")
def scenario() -> Any:
    build = SCENARIOS.get("split_digits")
    return build(build.Config(n_experiences=5))


def _model() -> ClassifierModel:
    """A tiny CNN with BatchNorm (train and eval outputs differ)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return ClassifierModel(backbone, 4)


def build(name: str | type, plugins: tuple[Any, ...] = (), seed: int = 0, **options: Any) -> Any:
    cls = STRATEGIES.get(name) if isinstance(name, str) else name
    defaults = {"epochs": 1, "mem_size": MEM, "batch_size_mem": MEM_BATCH, "lr": 0.05}
    cfg = cls.Config(name="test", **{**defaults, **options})
    return cls(model=_model(), cfg=cfg, seed=seed, plugins=list(plugins), n_experiences=5)


def train_x(scenario: Any, e: int) -> torch.Tensor:
    return materialise(scenario.train_stream[e].dataset)[0]


def memory_snapshot(strategy: Any) -> dict[str, Any]:
    data = materialise(strategy.memory.dataset)
    return {
        "x": data[0],
        "y": data[1],
        "refs": list(strategy.memory.refs),
        "logits": strategy.memory.logits(),
    }


def row_of(pool: torch.Tensor, x: torch.Tensor) -> int:
    """The position of sample ``x`` in ``pool`` (exact match, unique)."""
    hits = torch.nonzero((pool == x).flatten(1).all(1)).flatten()
    assert len(hits) >= 1, "sample not found"
    return int(hits[0])


class Steps(SupervisedPlugin):
    """Per training step, just before backward: the mini-batch, memory rows, stored logits
    of the memory rows, outputs and loss."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[dict[str, Any]] = []

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        logits = strategy.mem_logits
        self.steps.append(
            {
                "exp": int(strategy.experience.current_experience),
                "mbatch": [t.detach().clone() for t in strategy.mbatch],
                "m": strategy.mem_rows,
                "z": None if logits is None else logits.clone(),
                "out": strategy.mb_output.detach().clone(),
                "loss": float(strategy.loss),
                "current": list(strategy.current_classes),
            }
        )


def assert_same_weights(a: Any, b: Any) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def hand_ce(logits: torch.Tensor, y: torch.Tensor, keep: list[int] | None = None) -> torch.Tensor:
    """Per-row cross-entropy, computed from the definition (optionally over ``keep``)."""
    if keep is not None:
        mask = torch.full_like(logits, float("-inf"))
        mask[:, keep] = 0.0
        logits = logits + mask
    log_norm = torch.logsumexp(logits, dim=1)
    return log_norm - logits[torch.arange(len(y)), y]


# --------------------------------------------------------------------- buffer
@pytest.mark.parametrize(
    ("name", "policy", "storage"),
    [
        ("er", "reservoir", ReservoirSamplingBuffer),
        ("er", "class_balanced", ClassBalancedBuffer),
        ("derpp", None, ClassBalancedBufferWithLogits),
    ],
)
def test_buffer_is_bounded_and_balanced_as_configured(scenario, name, policy, storage):
    options = {"buffer_policy": policy} if policy else {}
    st = build(name, **options)
    assert isinstance(st.storage_policy, storage)  # Avalanche's buffer, not a new one
    seen_classes: list[int] = []
    for t in range(3):
        st.train(scenario.train_stream[t])
        seen_classes += sorted(int(c) for c in scenario.train_stream[t].classes_in_this_experience)
        snap = memory_snapshot(st)
        assert len(snap["refs"]) == MEM == len(set(snap["refs"]))
        for row, (e, i) in enumerate(snap["refs"]):  # each reference names its sample
            x, y = scenario.train_stream[e].dataset[i][:2]
            assert e <= t and torch.equal(snap["x"][row], x) and int(snap["y"][row]) == int(y)
        counts = Counter(snap["y"].tolist())
        if storage is ReservoirSamplingBuffer:
            assert {e for e, _ in snap["refs"]} == set(range(t + 1))
        else:  # every seen class holds MEM // classes samples (the remainder spread by one)
            assert set(counts) == set(seen_classes)
            share = MEM // len(seen_classes)
            assert set(counts.values()) <= {share, share + 1}


# ----------------------------------------------------------------------- loss
@pytest.mark.parametrize(
    ("name", "loss_mask"),
    [("er", "seen"), ("er", "current"), ("der", "seen"), ("derpp", "seen"), ("derpp", "current")],
)
def test_training_loss_equals_the_formula_by_hand(scenario, name, loss_mask):
    rec = Steps()
    st = build(name, plugins=(rec,), loss_mask=loss_mask)
    st.train(scenario.train_stream[0])
    assert rec.steps and all(s["m"] == 0 for s in rec.steps)  # empty memory: no replay
    memory = memory_snapshot(st)
    rec.steps.clear()
    st.train(scenario.train_stream[1])
    alpha = {"er": 0.0, "der": 0.3, "derpp": 0.1}[name]  # the defaults
    beta = {"er": 0.0, "der": 0.0, "derpp": 0.5}[name]
    assert rec.steps
    for step in rec.steps:
        m, out, (x, y) = step["m"], step["out"], step["mbatch"][:2]
        assert m == MEM_BATCH
        keep = step["current"] if loss_mask == "current" else None
        current = hand_ce(out[m:], y[m:], keep)
        memory_ce = hand_ce(out[:m], y[:m])
        if name == "er":  # one CE over every row (memory rows over every output)
            expected = (current.sum() + memory_ce.sum()) / len(y)
        else:
            rows = [row_of(memory["x"], x[j]) for j in range(m)]
            z = memory["logits"][rows]
            assert torch.equal(step["z"], z)  # the stored logits of exactly these samples
            mse = ((out[:m] - z) ** 2).mean()
            expected = current.mean() + alpha * mse + beta * memory_ce.mean()
        assert step["loss"] == pytest.approx(float(expected), rel=1e-5, abs=1e-6)


def test_der_has_no_label_term_and_derpp_the_sparcl_weights():
    assert "beta" not in {f.name for f in dataclasses.fields(DER.Config)}
    assert DER.Config(name="der").beta == 0.0
    assert issubclass(DER, DERpp)
    cfg = DERpp.Config(name="derpp")
    assert (cfg.alpha, cfg.beta, cfg.mem_size, cfg.batch_size_mem) == (0.1, 0.5, 500, 32)
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay) == ("sgd", 0.03, 0.0, 0.0)
    assert (cfg.batch_size, cfg.epochs) == (32, 50)


# ------------------------------------------------------------- mini-batch layout
class WithIds(DERpp):
    """DER++ whose mini-batches carry the examples' ids as ``mbatch[3]`` (as SparCL)."""

    def make_train_dataloader(self, shuffle: bool = True, **kwargs: Any) -> None:
        super().make_train_dataloader(shuffle=shuffle, **kwargs)
        old = self.dataloader
        ids = torch.arange(old.n)
        self.dataloader = TensorBatches(
            [*old.tensors, ids], old.batch_size, shuffle=True, generator=old.generator
        )

    @property
    def mb_task_id(self) -> torch.Tensor:
        return self.mbatch[2]


@pytest.mark.parametrize("mem_size", [MEM, 5])
def test_memory_rows_come_first_and_extra_elements_are_untouched(scenario, mem_size):
    rec = Steps()
    st = build(WithIds, plugins=(rec,), mem_size=mem_size)
    st.train(scenario.train_stream[0])
    for step in rec.steps:
        assert step["m"] == 0 and len(step["mbatch"][0]) == len(step["mbatch"][3])
    memory = memory_snapshot(st)
    rec.steps.clear()
    st.train(scenario.train_stream[1])
    current_x = train_x(scenario, 1)
    for step in rec.steps:
        x, y, task, ids = step["mbatch"]
        m = step["m"]
        assert m == min(MEM_BATCH, mem_size)  # a small memory is replayed whole
        assert len(x) == len(y) == len(task) == m + len(ids)
        assert torch.equal(x[m:], current_x[ids])  # the current rows, in the loader's order
        rows = [row_of(memory["x"], x[j]) for j in range(m)]
        assert len(set(rows)) == m  # distinct memory samples
        assert torch.equal(y[:m], memory["y"][rows])
        assert torch.equal(task[:m], torch.zeros(m, dtype=task.dtype))


def test_a_lazily_read_scenario_replays_the_same_memory_batches(scenario):
    """Memory batches come from the seeded order whether the memory is materialised or
    read sample by sample (``in_memory=False``; the training order differs there, the
    memory's samples do not)."""
    rows = {}
    for in_memory in (True, False):
        rec = Steps()
        st = build("derpp", plugins=(rec,))
        st.in_memory = in_memory
        st.train(scenario.train_stream[0])
        rec.steps.clear()
        st.train(scenario.train_stream[1])
        rows[in_memory] = [s["mbatch"][0][: s["m"]] for s in rec.steps]
    assert len(rows[True]) == len(rows[False])
    for a, b in zip(rows[True], rows[False], strict=True):
        assert len(a) == MEM_BATCH and torch.equal(a, b)


# --------------------------------------------------------------------- logits
def test_stored_logits_are_the_outputs_at_the_end_of_their_experience(scenario):
    st = build("der")
    st.train(scenario.train_stream[0])
    first = memory_snapshot(st)
    st.model.eval()
    with torch.no_grad():
        end_of_0 = st.model(first["x"])
        st.model.train()
        train_mode = st.model(first["x"])
    assert end_of_0.shape == (MEM, 10)  # the full head: every class of the scenario
    assert torch.allclose(first["logits"], end_of_0, atol=1e-5)
    assert not torch.allclose(first["logits"], train_mode, atol=1e-3)  # eval mode (BN)

    st.train(scenario.train_stream[1])
    second = memory_snapshot(st)
    st.model.eval()
    with torch.no_grad():
        end_of_1 = st.model(second["x"])
    old = {ref: z for ref, z in zip(first["refs"], first["logits"], strict=True)}
    kept = [i for i, ref in enumerate(second["refs"]) if ref in old]
    new = [i for i, ref in enumerate(second["refs"]) if ref[0] == 1]
    assert kept and new
    for i in kept:  # a sample keeps the logits of when it was stored
        assert torch.equal(second["logits"][i], old[second["refs"][i]])
        assert not torch.allclose(second["logits"][i], end_of_1[i], atol=1e-4)
    assert torch.allclose(second["logits"][new], end_of_1[new], atol=1e-5)


class EvalWidths(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.widths: set[int] = set()

    def after_eval_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.widths.add(int(strategy.mb_output.shape[1]))


@pytest.mark.parametrize("full_head", [True, False])
def test_head_size_and_evaluated_classes(scenario, full_head):
    widths = EvalWidths()
    st = build("er", plugins=(widths,), full_head=full_head)
    for t in range(2):
        st.train(scenario.train_stream[t])
        assert st.model.head.num_classes == (10 if full_head else 2 * (t + 1))
        widths.widths.clear()
        st.eval(scenario.test_stream[:2])
        assert widths.widths == {2 * (t + 1)}  # evaluation: the classes seen so far


# -------------------------------------------------------------- determinism
def _run(scenario: Any, name: str, seed: int, disturb: bool) -> Any:
    st = build(name, seed=seed)
    for t in range(3):
        if disturb and t > 0:
            torch.manual_seed(1000 + t)  # the global RNG must not matter after the init
        st.train(scenario.train_stream[t])
    return st


@pytest.mark.parametrize("name", ["er", "derpp"])
def test_a_run_is_deterministic_for_its_seed(scenario, name):
    a = _run(scenario, name, 0, disturb=False)
    b = _run(scenario, name, 0, disturb=True)
    assert a.memory.refs == b.memory.refs
    assert torch.equal(a.memory.logits(), b.memory.logits())
    assert_same_weights(a, b)
    c = _run(scenario, name, 1, disturb=False)
    assert c.memory.refs != a.memory.refs  # the seed does choose the memory


# ---------------------------------------------------------------- checkpoint
@pytest.mark.parametrize(
    ("name", "options"), [("er", {}), ("er", {"buffer_policy": "class_balanced"}), ("derpp", {})]
)
def test_checkpoint_round_trip_restores_buffer_and_next_step(scenario, tmp_path, name, options):
    rec_a, rec_b = Steps(), Steps()
    a = build(name, plugins=(rec_a,), **options)
    for t in range(2):
        a.train(scenario.train_stream[t])
    path = tmp_path / "state.safetensors"
    statefile.save(path, a.checkpoint_state())  # data only: tensors and JSON

    b = build(name, plugins=(rec_b,), seed=0, **options)
    b.restore_checkpoint_state(statefile.load(path))
    b.memory.restore(scenario.train_stream)
    before_a, before_b = memory_snapshot(a), memory_snapshot(b)
    assert before_b["refs"] == before_a["refs"]
    assert torch.equal(before_b["x"], before_a["x"])
    assert torch.equal(before_b["y"], before_a["y"])
    assert torch.equal(before_b["logits"], before_a["logits"])
    assert b.storage_policy is b.memory.storage

    rec_a.steps.clear()
    a.train(scenario.train_stream[2])
    b.train(scenario.train_stream[2])
    assert rec_b.steps[0]["loss"] == rec_a.steps[0]["loss"]  # the same next step
    assert [s["loss"] for s in rec_b.steps] == [s["loss"] for s in rec_a.steps]
    after_a, after_b = memory_snapshot(a), memory_snapshot(b)
    assert after_b["refs"] == after_a["refs"]
    assert torch.equal(after_b["logits"], after_a["logits"])
    assert_same_weights(a, b)


# -------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("cls", "options", "key"),
    [
        (DER, {"full_head": False}, "strategy.full_head"),
        (DERpp, {"full_head": False}, "strategy.full_head"),
        (ER, {"buffer_policy": "fifo"}, "strategy.buffer_policy"),
        (ER, {"mem_size": 0}, "strategy.mem_size"),
        (DERpp, {"batch_size_mem": 0}, "strategy.batch_size_mem"),
        (DERpp, {"beta": -0.5}, "strategy.beta"),
        (DER, {"alpha": -1.0}, "strategy.alpha"),
    ],
)
def test_bad_options_are_one_config_error(cls, options, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        cls.Config(name="x", **options)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------- CLI
@pytest.mark.parametrize("name", ["er", "der", "derpp"])
def test_each_strategy_runs_through_the_cli(tmp_path, name):
    """A small run end to end; derpp's is also killed (snapshotted) after its first
    experience and resumed, and must end as the uninterrupted run."""
    snapshot = tmp_path / "killed"
    args = [
        "run",
        "scenario=split_digits",
        "scenario.n_experiences=2",
        "scenario.test_fraction=0.8",
        "backbone=wrn_16_2",
        f"strategy={name}",
        "strategy.epochs=1",
        "strategy.mem_size=50",
        "tracking=none",
        "progress=false",
        f"runs_dir={tmp_path / 'runs'}",
    ]
    with snapshot_after(1 if name == "derpp" else 0, snapshot):  # 0: never
        assert run_cli(args) == 0
    res = results_of(only_run_dir(tmp_path / "runs"))
    assert res["strategy"] == name
    matrix = res["accuracy_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert all(0.0 <= v <= 1.0 for row in matrix for v in row)
    assert matrix[0][1] == 0.0  # an unseen experience: its classes are not evaluated yet
    if name != "derpp":
        return
    assert run_cli(["resume", str(snapshot)]) == 0
    resumed = results_of(snapshot)
    assert resumed["resumed_after_experience"] == 1
    assert resumed["accuracy_matrix"] == matrix
    assert json.dumps(resumed["metrics"]) == json.dumps(res["metrics"])
