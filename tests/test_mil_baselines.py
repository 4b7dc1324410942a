"""The classic and LoRA baselines of the MIL kind (strategies/mil_baselines.py), on a tiny
class-incremental bag stream: what makes each method what it is holds (the memory and
its replay, DER++'s stored logits, EWC's penalty and importances, LwF's teacher, which
parameters the LoRA family trains), a checkpoint resumes exactly, and every MIL YAML
composes and validates."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from avalanche.training.plugins import SupervisedPlugin
from clbench.scenarios.bags import Bags, MILStream, mil_scenario
from clbench.strategies.mil_baselines import (
    MILER,
    MILEWC,
    BagMemory,
    MILDERpp,
    MILInfLoRA,
    MILLoRA,
    MILLwF,
    MILOLoRA,
)
from torch import nn

from clbench import statefile
from clbench.adapters.lora import LoRALinear, lora_layers
from clbench.backbones.mil import ABMILConfig, abmil
from clbench.errors import ConfigError

D, TASKS, TRAIN_BAGS, TEST_BAGS = 6, 3, 6, 2
NAMES = [f"c{i}" for i in range(2 * TASKS)]
ABMIL_LINEARS = {"fc", "attention_a", "attention_b", "attention_c"}


def _bags(task: int, n: int, g: torch.Generator) -> Bags:
    """``n`` bags of task ``task`` (classes 2t, 2t+1), 3-9 instances each; one instance
    carries the class's planted feature."""
    feats, labels = [], []
    for i in range(n):
        y = 2 * task + i % 2
        x = torch.randn(int(torch.randint(3, 10, (1,), generator=g)), D, generator=g)
        x[0, y % D] += 4.0
        feats.append(x)
        labels.append(y)
    return Bags(feats, labels)


@pytest.fixture(scope="module")
def scenario() -> Any:
    g = torch.Generator().manual_seed(0)
    stream = MILStream(
        setting="new_classes",
        task_names=tuple(f"t{t}" for t in range(TASKS)),
        task_classes=tuple((2 * t, 2 * t + 1) for t in range(TASKS)),
        train=tuple(_bags(t, TRAIN_BAGS, g) for t in range(TASKS)),
        test=tuple(_bags(t, TEST_BAGS, g) for t in range(TASKS)),
    )
    return mil_scenario("tiny_bags", stream, NAMES, D)


def build(cls: type, plugins: list | None = None, dropout: float = 0.0, **options: Any) -> Any:
    """A strategy as the protocol builds it (ABMIL without dropout: forwards repeat)."""
    torch.manual_seed(0)
    aggregator = abmil(ABMILConfig(in_dim=D, hidden=8, attn_dim=4, dropout=dropout))
    model = aggregator.classifier(NAMES)
    cfg = cls.Config(name="test", **{"epochs": 1, **options})
    return cls(
        model=model,
        cfg=cfg,
        seed=0,
        device="cpu",
        plugins=plugins or [],
        in_memory=False,
        n_experiences=TASKS,
    )


class Recorder(SupervisedPlugin):
    """Per training step: the bags the aggregator saw (in order), the labels, the model's
    output, the step's loss before backward and, if set, ``expect(strategy, inputs)``."""

    def __init__(self, expect: Any = None) -> None:
        super().__init__()
        self.expect = expect
        self.steps: list[dict[str, Any]] = []
        self._inputs: list[torch.Tensor] = []
        self._hooked: set[int] = set()

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        backbone = strategy.model.backbone
        if id(backbone) not in self._hooked:
            backbone.register_forward_pre_hook(lambda _m, a: self._inputs.append(a[0].detach()))
            self._hooked.add(id(backbone))

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self._inputs = []

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        step = {
            "exp": int(strategy.experience.current_experience),
            "inputs": list(self._inputs),
            "x": strategy.mb_x.detach().clone(),
            "y": int(strategy.mb_y),
            "out": strategy.mb_output.detach().clone(),
            "loss": float(strategy.loss),
        }
        if self.expect is not None:
            step["expected"] = float(self.expect(strategy, list(self._inputs)))
        self.steps.append(step)


def find_in_memory(memory: BagMemory, x: torch.Tensor) -> int:
    """The memory position holding bag ``x`` ((N, D) or (1, N, D))."""
    x = x.reshape(-1, D)
    hits = [
        i
        for i in range(len(memory))
        if memory.bag(i)[0].shape == x.shape and torch.equal(memory.bag(i)[0], x)
    ]
    assert hits, "the replayed bag is not in the memory"
    return hits[0]


def ce(logits: torch.Tensor, y: int) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(1, -1), torch.tensor([y]))


# ------------------------------------------------------------------------- ER
@pytest.mark.parametrize(
    ("policy", "size"), [("reservoir", 4), ("experience_balanced", 4), ("class_balanced", 6)]
)
def test_er_memory_is_bounded_and_holds_the_stream_bags(scenario, policy, size):
    strategy = build(MILER, mem_size=size, buffer_policy=policy)
    for t, experience in enumerate(scenario.train_stream):
        strategy.train(experience)
        memory = strategy.memory
        assert len(memory) == min(size, TRAIN_BAGS * (t + 1))
        assert len(set(memory.refs)) == len(memory.refs)
        for i, (e, j) in enumerate(memory.refs):  # each entry is the stream's bag, as labelled
            x, y, _ = memory.bag(i)
            assert e <= t
            assert torch.equal(x, scenario.stream.train[e][j][0])
            assert y == scenario.stream.train[e].targets[j]
        tasks = {e for e, _ in memory.refs}
        classes = {memory.bag(i)[1] for i in range(len(memory))}
        if policy == "experience_balanced":
            assert tasks == set(range(t + 1))
        if policy == "class_balanced":
            assert classes == set(range(2 * (t + 1)))


def test_er_step_is_the_current_bag_plus_memory_bags(scenario):
    def expect(strategy: Any, inputs: list[torch.Tensor]) -> torch.Tensor:
        model = strategy.model
        loss = ce(model(inputs[0]), strategy.mb_y.item())
        if len(inputs) > 1:
            memory = strategy.memory
            replay = [ce(model(x), memory.bag(find_in_memory(memory, x))[1]) for x in inputs[1:]]
            loss = loss + torch.stack(replay).mean()
        return loss

    recorder = Recorder(expect)
    strategy = build(MILER, plugins=[recorder], mem_size=4, replay_bags=2)
    for experience in scenario.train_stream:
        strategy.train(experience)
    for step in recorder.steps:
        inputs = step["inputs"]
        assert torch.equal(inputs[0], step["x"])  # the current bag comes first
        if step["exp"] == 0:  # nothing to replay during the first task
            assert len(inputs) == 1
        else:  # two distinct memory bags, from earlier tasks only
            assert len(inputs) == 3
            assert not (inputs[1].shape == inputs[2].shape and torch.equal(inputs[1], inputs[2]))
        assert step["loss"] == pytest.approx(step["expected"], rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------- DER++
def test_derpp_stores_the_logits_of_insertion_and_keeps_them(scenario):
    stream = scenario.train_stream
    strategy = build(MILDERpp, mem_size=4)
    strategy.train(stream[0])
    at_insertion = {}
    for i, ref in enumerate(strategy.memory.refs):
        logits, _ = strategy.bag_outputs(strategy.memory.bag(i)[0])
        assert torch.equal(strategy.stored_logits[ref], logits)
        at_insertion[ref] = logits
    assert set(strategy.stored_logits) == set(strategy.memory.refs)
    strategy.train(stream[1])
    assert set(strategy.stored_logits) == set(strategy.memory.refs)
    for i, ref in enumerate(strategy.memory.refs):
        now, _ = strategy.bag_outputs(strategy.memory.bag(i)[0])
        if ref in at_insertion:  # kept from task 0, though the model has moved since
            assert torch.equal(strategy.stored_logits[ref], at_insertion[ref])
            assert not torch.allclose(now[:2], at_insertion[ref], atol=1e-6)
        else:  # stored after task 1, with the head of 4 classes
            assert ref[0] == 1 and torch.equal(strategy.stored_logits[ref], now)


@pytest.mark.parametrize("same_bag", [True, False])
def test_derpp_step_loss(scenario, same_bag):
    alpha, beta = 0.7, 0.3

    def expect(strategy: Any, inputs: list[torch.Tensor]) -> torch.Tensor:
        model, memory = strategy.model, strategy.memory
        loss = ce(model(inputs[0]), strategy.mb_y.item())
        if len(inputs) > 1:
            out = model(inputs[1])[0]
            _, y, ref = memory.bag(find_in_memory(memory, inputs[1]))
            z = strategy.stored_logits[ref]
            loss = loss + alpha * F.mse_loss(out[: len(z)], z)
            if not same_bag:
                out = model(inputs[2])[0]
                y = memory.bag(find_in_memory(memory, inputs[2]))[1]
            loss = loss + beta * ce(out, y)
        return loss

    recorder = Recorder(expect)
    strategy = build(MILDERpp, [recorder], mem_size=4, alpha=alpha, beta=beta, same_bag=same_bag)
    for experience in scenario.train_stream:
        strategy.train(experience)
    replaying = [s for s in recorder.steps if s["exp"] > 0]
    assert all(len(s["inputs"]) == (2 if same_bag else 3) for s in replaying)
    assert all(len(s["inputs"]) == 1 for s in recorder.steps if s["exp"] == 0)
    for step in recorder.steps:
        assert step["loss"] == pytest.approx(step["expected"], rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------ EWC
def test_ewc_importances_come_from_the_bags(scenario):
    strategy = build(MILEWC, ewc_lambda=2.0)
    strategy.train(scenario.train_stream[0])
    model = strategy.model
    model.eval()
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    bags = scenario.stream.train[0]
    for i in range(len(bags)):  # empirical Fisher: squared gradients of each bag's CE
        model.zero_grad()
        x, y = bags[i]
        ce(model(x.unsqueeze(0)), y).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.detach() ** 2 / len(bags)
    importances = strategy.ewc.importances[0]
    assert float(importances["backbone.fc.weight"].data.abs().sum()) > 0
    for n, imp in expected.items():
        torch.testing.assert_close(importances[n].data, imp, rtol=1e-4, atol=1e-8)


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_with_a_change(scenario):
    lam = 2.0
    strategy = build(MILEWC, ewc_lambda=lam)
    strategy.train(scenario.train_stream[0])
    strategy.train(scenario.train_stream[1])

    def penalty() -> float:
        strategy.loss = torch.zeros(())
        strategy.ewc.before_backward(strategy)
        return float(strategy.loss)

    assert penalty() == 0.0  # the weights are the anchor just saved
    weight = strategy.model.backbone.fc.weight
    importance = strategy.ewc.importances[1]["backbone.fc.weight"].data
    with torch.no_grad():
        weight += 0.1
    assert penalty() == pytest.approx(lam * float((importance * 0.01).sum()), rel=1e-4)
    assert penalty() > 0


# ------------------------------------------------------------------------ LwF
def test_lwf_distils_the_previous_models_logits_on_old_classes(scenario):
    alpha, temperature = 0.5, 2.0
    teachers: list[nn.Module] = []

    def expect(strategy: Any, inputs: list[torch.Tensor]) -> torch.Tensor:
        loss = ce(strategy.mb_output, strategy.mb_y.item())
        if teachers:
            with torch.no_grad():
                old = teachers[-1](strategy.mb_x)[:, :2]
            log_p = F.log_softmax(strategy.mb_output[:, :2] / temperature, dim=1)
            q = F.softmax(old / temperature, dim=1)
            loss = loss + alpha * F.kl_div(log_p, q, reduction="batchmean")
        return loss

    recorder = Recorder(expect)
    strategy = build(MILLwF, [recorder], dropout=0.25, alpha=alpha, temperature=temperature)
    stream = scenario.train_stream
    strategy.train(stream[0])
    teacher = abmil(ABMILConfig(in_dim=D, hidden=8, attn_dim=4)).classifier(NAMES)
    teacher.head.grow(2)
    teacher.load_state_dict(copy.deepcopy(strategy.model.state_dict()))
    teachers.append(teacher.eval())
    strategy.train(stream[1])
    first, second = ([s for s in recorder.steps if s["exp"] == e] for e in (0, 1))
    assert all(s["loss"] == pytest.approx(s["expected"], rel=1e-5) for s in second)
    assert all(s["loss"] == pytest.approx(float(ce(s["out"], s["y"])), rel=1e-6) for s in first)
    assert any(s["expected"] > float(ce(s["out"], s["y"])) + 1e-6 for s in second)


# ---------------------------------------------------------------- LoRA family
def test_lora_targets_every_aggregator_linear_and_not_the_head():
    for cls in (MILLoRA, MILOLoRA, MILInfLoRA):
        strategy = build(cls, rank=4)
        model = strategy.model
        assert set(lora_layers(model.backbone)) == ABMIL_LINEARS
        assert set(lora_layers(model)) == {f"backbone.{n}" for n in ABMIL_LINEARS}
        assert not isinstance(model.head.fc, LoRALinear)


def _base_weights(strategy: Any) -> dict[str, torch.Tensor]:
    return {n: m.base.weight.detach().clone() for n, m in lora_layers(strategy.model).items()}


@pytest.mark.parametrize("full_first_task", [True, False])
def test_mil_lora_trains_only_lora_and_head(scenario, full_first_task):
    stream = scenario.train_stream
    strategy = build(MILLoRA, rank=4, merge_after_task=False, full_first_task=full_first_task)
    initial = _base_weights(strategy)
    strategy.train(stream[0])
    after_first = _base_weights(strategy)
    changed = [not torch.equal(initial[n], after_first[n]) for n in initial]
    assert all(changed) if full_first_task else not any(changed)
    for experience in list(stream)[1:]:
        strategy.train(experience)
        trainable = {id(p) for p in strategy.optimizer.param_groups[0]["params"]}
        adapters = {id(p) for b in strategy.new_blocks for p in (b.A, b.B)}
        head = {id(p) for p in strategy.model.head.parameters()}
        assert trainable == adapters | head
    final = _base_weights(strategy)
    assert all(torch.equal(after_first[n], final[n]) for n in final)  # bit-identical
    assert all(float(b.B.abs().sum()) > 0 for b in strategy.new_blocks)  # the LoRA trained


def test_mil_lora_merges_each_tasks_lora_into_the_frozen_base(scenario):
    stream = scenario.train_stream
    strategy = build(MILLoRA, rank=4)  # defaults: full first task, merge after each task
    strategy.train(stream[0])
    strategy.train(stream[1])
    layers = lora_layers(strategy.model)
    merged = {n: m.base.weight.detach() + m.delta_weight().detach() for n, m in layers.items()}
    strategy.train(stream[2])
    for n, m in lora_layers(strategy.model).items():
        assert torch.equal(m.base.weight, merged[n])
        assert len(m.blocks) == 1 and m.blocks[0] in strategy.new_blocks


def test_mil_olora_adds_a_frozen_lora_per_task(scenario):
    strategy = build(MILOLoRA, rank=4)
    for experience in scenario.train_stream:
        strategy.train(experience)
    for layer in lora_layers(strategy.model).values():
        assert len(layer.blocks) == TASKS - 1  # none during the full first task
        assert [b.A.requires_grad for b in layer.blocks] == [False] * (TASKS - 2) + [True]
    assert float(strategy.orthogonality()) > 0


def test_mil_inflora_designs_frozen_a_in_the_free_subspace(scenario):
    stream = scenario.train_stream
    strategy = build(MILInfLoRA, rank=4)
    strategy.train(stream[0])
    assert all(len(m.blocks) == 0 for m in lora_layers(strategy.model).values())
    strategy.train(stream[1])
    first_a = {n: m.blocks[0].A.detach().clone() for n, m in lora_layers(strategy.model).items()}
    gpm = copy.deepcopy(strategy.gpm.state())  # the subspaces task 2's A_t is designed against
    strategy.train(stream[2])
    trained = []
    for name, layer in lora_layers(strategy.model).items():
        assert len(layer.blocks) == 2
        assert all(not b.A.requires_grad for b in layer.blocks)
        assert torch.equal(layer.blocks[0].A, first_a[name])  # A_1 did not move during task 2
        a, u = layer.blocks[1].A.detach(), gpm["basis"][name]
        used = a @ u if gpm["mode"][name] == "remove" else a - (a @ u) @ u.T
        # no component in the protected subspace (a layer whose 6 input directions are all
        # protected after two tasks gets A_2 = 0: it cannot move)
        assert float(used.abs().max()) < 1e-5, name
        trained.append(float(layer.blocks[1].B.abs().sum()) > 0)
        assert trained[-1] == (float(a.abs().max()) > 1e-5), name
    assert any(trained)  # B_2 trained where A_2 has free directions


def test_mil_inflora_refuses_a_rank_above_an_input_width():
    with pytest.raises(ConfigError, match=r"strategy\.rank"):
        build(MILInfLoRA, rank=D + 1)


# ------------------------------------------------------------------- resuming
@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (MILER, {"mem_size": 4, "buffer_policy": "class_balanced"}),
        (MILDERpp, {"mem_size": 4, "same_bag": False}),
        (MILEWC, {}),
        (MILLwF, {}),
        (MILInfLoRA, {"rank": 4}),
    ],
)
def test_a_checkpoint_after_a_task_resumes_exactly(scenario, tmp_path, cls, options):
    stream = scenario.train_stream
    first = build(cls, dropout=0.25, **options)
    first.train(stream[0])
    first.train(stream[1])
    path = tmp_path / "state.safetensors"
    statefile.save(path, first.checkpoint_state())
    second = build(cls, dropout=0.25, **options)
    second.restore_checkpoint_state(statefile.load(path))
    for strategy in (first, second):
        torch.manual_seed(7)
        strategy.train(stream[2])
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if hasattr(first, "memory"):
        assert first.memory.refs == second.memory.refs


# --------------------------------------------------------------------- config
MIL_YAMLS = {
    "mil_er": MILER,
    "mil_derpp": MILDERpp,
    "mil_ewc": MILEWC,
    "mil_lwf": MILLwF,
    "mil_lora": MILLoRA,
    "mil_olora": MILOLoRA,
    "mil_inflora": MILInfLoRA,
    "mil_finetune": None,
    "mil_joint": None,
}


def test_every_mil_yaml_composes_and_validates():
    from clbench.strategies.mil import MILConfig, MILJointConfig

    from clbench.config import compose, typed

    for name, cls in MIL_YAMLS.items():
        cfg = typed("strategy", compose(["scenario=digit_bags", f"strategy={name}"]).strategy)
        schema = cls.Config if cls else (MILJointConfig if name == "mil_joint" else MILConfig)
        assert type(cfg) is schema and cfg.name == name
        assert cfg.batch_size == cfg.eval_batch_size == 1
        if name in ("mil_lora", "mil_olora", "mil_inflora"):
            assert cfg.targets == ["linear"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("strategy.batch_size=2", "strategy.batch_size"),
        ("strategy.buffer_policy=fifo", "strategy.buffer_policy"),
        ("strategy.mem_size=0", "strategy.mem_size"),
    ],
)
def test_bad_options_are_one_line_config_errors(override, key):
    from clbench.config import compose, typed

    node = compose(["scenario=digit_bags", "strategy=mil_er", override]).strategy
    with pytest.raises(ConfigError, match=re.escape(key)) as err:
        typed("strategy", node)
    assert "\n" not in str(err.value)
