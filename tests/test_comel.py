"""CoMEL (strategies/comel.py, clbench/adapters/owlora.py): the truncated SVD, the gradient
projection, the orthonormality penalty and the trainable set of OWLoRA; BPPL's gating,
pseudo-labels and tau2; a 3-task binary run where earlier LoRAs stay bit-identical."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin
from clbench.scenarios.bags import Bags, MILStream, mil_scenario
from clbench.strategies.comel import (
    CoMEL,
    CoMELConfig,
    bppl_loss,
    bppl_pseudo_labels,
    instance_probabilities,
    next_tau2,
)
from torch import nn

from clbench import statefile
from clbench.adapters.lora import LoRALinear
from clbench.adapters.owlora import OWLoRA, orthonormality_penalty
from clbench.backbones.mil import ABMILConfig, abmil
from clbench.errors import ConfigError
from clbench.registry import STRATEGIES

D = 8  # instance feature size of the tiny scenarios
ADAPTED = ("fc", "attention_a", "attention_b")  # ABMIL's linears with more than one output


# ------------------------------------------------------------------ tiny scenarios
def _bags(
    n_bags: int, keys: list[torch.Tensor | None], gen: torch.Generator, offset: int = 0
) -> Bags:
    """``n_bags`` per entry of ``keys``: label = ``offset`` + its index; a bag with a key
    vector holds 1-3 planted copies of it (the instance labels) among N(0, 1) fillers."""
    feats, labels, inst = [], [], []
    for label, key in enumerate(keys):
        for _ in range(n_bags):
            n = int(torch.randint(6, 11, (1,), generator=gen))
            x = torch.randn(n, D, generator=gen)
            is_key = torch.zeros(n, dtype=torch.long)
            if key is not None:
                k = int(torch.randint(1, 4, (1,), generator=gen))
                x[:k] = key + 0.1 * torch.randn(k, D, generator=gen)
                is_key[:k] = 1
            order = torch.randperm(n, generator=gen)
            feats.append(x[order])
            inst.append(is_key[order])
            labels.append(offset + label)
    return Bags(feats, labels, instance_labels=inst)


def _scenario(setting: str, n_tasks: int) -> Any:
    gen = torch.Generator().manual_seed(0)
    train, test, classes = [], [], []
    for t in range(n_tasks):
        if setting == "binary":
            keys: list[torch.Tensor | None] = [None, 3.0 * torch.randn(D, generator=gen)]
            classes.append((0, 1))
        else:
            keys = [3.0 * torch.randn(D, generator=gen) for _ in range(2)]
            classes.append((2 * t, 2 * t + 1))
        offset = classes[-1][0]
        train.append(_bags(6, keys, gen, offset))
        test.append(_bags(3, keys, gen, offset))
    stream = MILStream(
        setting=setting,
        task_names=tuple(f"task{t}" for t in range(n_tasks)),
        task_classes=tuple(classes),
        train=tuple(train),
        test=tuple(test),
    )
    names = ["negative", "positive"] if setting == "binary" else [str(c) for c in range(4)]
    return mil_scenario("tiny_bags", stream, names, D)


def _strategy(plugins: list[Any] = (), n_experiences: int = 3, **overrides: Any) -> CoMEL:  # type: ignore[assignment]
    torch.manual_seed(0)
    model = abmil(ABMILConfig(in_dim=D, hidden=32, attn_dim=16, dropout=0.0)).classifier([])
    cfg = CoMELConfig(name="comel", **{"epochs": 2, **overrides})
    return CoMEL(
        model=model,
        cfg=cfg,
        seed=0,
        device="cpu",
        plugins=list(plugins),
        in_memory=False,
        n_experiences=n_experiences,
    )


def _layers(strategy: CoMEL) -> dict[str, LoRALinear]:
    return {n: m for n, m in strategy.model.backbone.named_modules() if isinstance(m, LoRALinear)}


class Recorder(SupervisedPlugin):
    """Per epoch: the trainable parameter names; during the last epoch of the task: each
    bag's softmax confidence and whether it was right (for tau2)."""

    def __init__(self) -> None:
        super().__init__()
        self.trainable: list[set[str]] = []
        self.epoch_bags: list[tuple[float, bool]] = []

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        names = {n for n, p in strategy.model.named_parameters() if p.requires_grad}
        self.trainable.append(names)
        self.epoch_bags = []

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        conf, pred = torch.softmax(strategy.mb_output.detach()[0], dim=-1).max(dim=-1)
        self.epoch_bags.append((float(conf), int(pred) == int(strategy.mb_y[0])))


@pytest.fixture(scope="module")
def binary_run() -> dict[str, Any]:
    """Three binary tasks trained with ``strategy.train``, snapshots after each."""
    scenario = _scenario("binary", 3)
    recorder = Recorder()
    strategy = _strategy([recorder])
    record: dict[str, Any] = {"strategy": strategy, "trainable": [], "tau2": []}
    for t, experience in enumerate(scenario.benchmark.train_stream):
        strategy.train(experience)
        layers = _layers(strategy)
        record["trainable"].append(recorder.trainable[-1])
        quality = sum(c for c, right in recorder.epoch_bags if right)
        record["tau2"].append((strategy.tau2, quality, len(recorder.epoch_bags)))
        record[f"weights{t}"] = {n: m.base.weight.detach().clone() for n, m in layers.items()}
        record[f"biases{t}"] = {n: m.base.bias.detach().clone() for n, m in layers.items()}
        record[f"blocks{t}"] = {
            n: [{k: v.detach().clone() for k, v in b.named_parameters()} for b in m.blocks]
            for n, m in layers.items()
        }
        record[f"scenario_test{t}"] = scenario.stream.test[t]
    return record


# ------------------------------------------------------------------ OWLoRA: the SVD
def test_base_weights_are_their_truncated_svd_from_task_1_on(binary_run):
    strategy = binary_run["strategy"]
    truncated_somewhere = False
    for name, w0 in binary_run["weights0"].items():
        w1 = binary_run["weights1"][name]
        if name not in ADAPTED:  # the attention scorer Linear(D, 1): left as trained
            assert name == "attention_c" and torch.equal(w1, w0)
            continue
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)
        energy = (s**2).cumsum(0) / (s**2).sum()
        k = next(i + 1 for i in range(len(s)) if energy[i] >= 0.99)
        assert strategy.owlora.svd_ranks[name] == k
        expected = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        assert torch.allclose(w1, expected, atol=1e-5), name
        truncated_somewhere |= k < len(s)
        # frozen from task 1 on: the same bits after task 2, biases untouched
        assert torch.equal(binary_run["weights2"][name], w1)
        assert torch.equal(binary_run["biases1"][name], binary_run["biases0"][name])
    assert truncated_somewhere  # 99% energy dropped a direction of some layer


def test_only_the_newest_lora_its_scales_and_the_head_train(binary_run):
    strategy = binary_run["strategy"]
    every = {n for n, _ in strategy.model.named_parameters()}
    head = {"head.fc.weight", "head.fc.bias"}
    # task 0: the whole aggregator and the head (no LoRA yet)
    assert (
        binary_run["trainable"][0] == {n for n in every if ".blocks." not in n}
        and binary_run["trainable"][0] >= head
    )
    for t in (1, 2):
        newest = {
            f"backbone.{layer}.blocks.{t - 1}.{p}" for layer in ADAPTED for p in ("A", "B", "gate")
        }
        assert binary_run["trainable"][t] == newest | head
    for name in ADAPTED:  # one block per task from task 1 on, rank 16, scale 1
        blocks = _layers(strategy)[name].blocks
        assert len(blocks) == 2 and all(b.rank == 16 and b.scale == 1.0 for b in blocks)


def test_earlier_loras_stay_bit_identical_and_the_run_evaluates(binary_run):
    strategy = binary_run["strategy"]
    for name in ADAPTED:
        before, after = binary_run["blocks1"][name][0], binary_run["blocks2"][name][0]
        assert before.keys() == {"A", "B", "gate"}
        for key in before:
            assert torch.equal(before[key], after[key]), (name, key)
        # the task-1 block did learn (B left 0) and the task-2 block did too
        assert before["B"].abs().sum() > 0
        assert binary_run["blocks2"][name][1]["B"].abs().sum() > 0
    bags = binary_run["scenario_test2"]
    logits, attention = strategy.bag_outputs(bags[0][0])
    assert logits.shape == (2,) and attention is not None
    assert attention.shape == (bags[0][0].shape[0],)
    assert float(attention.sum()) == pytest.approx(1.0, abs=1e-5)


def test_a_checkpoint_restores_the_loras_the_truncation_and_tau2(binary_run, tmp_path):
    strategy = binary_run["strategy"]
    path = tmp_path / "state"
    statefile.save(path, strategy.checkpoint_state())
    fresh = _strategy()
    fresh.restore_checkpoint_state(statefile.load(path))
    assert fresh.owlora.svd_ranks == strategy.owlora.svd_ranks
    assert fresh.tau2 == strategy.tau2 and fresh.tasks_seen == 3
    assert [len(m.blocks) for m in _layers(fresh).values()] == [2, 2, 2, 0]
    bag = binary_run["scenario_test2"][0][0]
    assert torch.equal(fresh.bag_outputs(bag)[0], strategy.bag_outputs(bag)[0])


def test_tau2_follows_the_epoch_quality(binary_run):
    for tau2, quality, n in binary_run["tau2"]:
        assert n == 12
        assert tau2 == pytest.approx(0.5 * (1.0 + 0.5 * quality / n), abs=1e-6)
    assert next_tau2(0.5, 3.6, 4) == pytest.approx(0.5 * (1 + 0.5 * 0.9))
    assert next_tau2(0.5, 0.0, 10) == pytest.approx(0.5)
    assert next_tau2(0.2, 5.0, 5) == pytest.approx(0.6)


# ------------------------------------------------------------------ OWLoRA: projection
def _owlora(project_base: bool) -> tuple[nn.Module, OWLoRA]:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 9), nn.Tanh(), nn.Linear(9, 1))
    owlora = OWLoRA(net, rank=2, energy=0.6, project_base=project_base)
    owlora.truncate()
    return net, owlora


@pytest.mark.parametrize("project_base", [False, True])
def test_new_gradients_are_orthogonal_to_the_earlier_spaces(project_base):
    net, owlora = _owlora(project_base)
    assert set(owlora.layers) == {"0", "2"}  # the Linear(9, 1) is not adapted
    earlier = []
    for _ in range(2):  # two earlier tasks with random non-zero factors
        for block in owlora.add_task_blocks():
            with torch.no_grad():
                block.A.normal_()
                block.B.normal_()
                block.gate.uniform_(0.5, 1.5)
        earlier.append(owlora.newest_blocks())
    owlora.add_task_blocks()
    for block in owlora.newest_blocks().values():
        with torch.no_grad():
            block.B.normal_()  # a zero B would give A a zero gradient
    x = torch.randn(32, 12)
    loss = (net(x) ** 2).mean() + owlora.penalty()
    loss.backward()
    raw = {n: (b.A.grad.clone(), b.B.grad.clone()) for n, b in owlora.newest_blocks().items()}
    owlora.project_gradients()
    for name, block in owlora.newest_blocks().items():
        ins = [earlier[t][name].A.T for t in range(2)]
        outs = [earlier[t][name].B for t in range(2)]
        if project_base:
            u, _, vh = torch.linalg.svd(owlora.layers[name].base.weight.detach().double())
            k = owlora.svd_ranks[name]
            ins.append(vh[:k].T)
            outs.append(u[:, :k])
        q_in = torch.linalg.qr(torch.cat(ins, 1).double()).Q
        q_out = torch.linalg.qr(torch.cat(outs, 1).double()).Q
        if q_in.shape[1] >= q_in.shape[0]:  # full space: nothing left to learn
            assert block.A.grad.abs().max() < 1e-6
        # the raw gradients did have components in those spaces; the projected ones do not
        assert (q_in.T @ raw[name][0].T.double()).abs().max() > 1e-3
        assert (q_in.T @ block.A.grad.T.double()).abs().max() < 1e-5
        assert (q_out.T @ raw[name][1].double()).abs().max() > 1e-3
        assert (q_out.T @ block.B.grad.double()).abs().max() < 1e-5
        # ... and keep what is orthogonal to them
        a_raw = raw[name][0].double()
        expected_a = a_raw - (a_raw @ q_in) @ q_in.T
        assert torch.allclose(block.A.grad.double(), expected_a, atol=1e-5)
        assert block.A.grad.abs().max() > 0 or q_in.shape[1] >= q_in.shape[0]


def test_new_blocks_start_as_the_official_init():
    _, owlora = _owlora(False)
    blocks = owlora.add_task_blocks(torch.Generator().manual_seed(0))
    for block in blocks:
        assert torch.equal(block.B, torch.zeros_like(block.B))
        assert torch.equal(block.gate, torch.ones(2))
        assert block.scale == 1.0
    big = OWLoRA(nn.Sequential(nn.Linear(400, 300)), rank=16)
    (block,) = big.add_task_blocks(torch.Generator().manual_seed(0))
    assert float(block.A.std()) == pytest.approx(1 / 16, rel=0.02)  # N(0, std 1/r)


# ------------------------------------------------------------------ penalty
def test_orthonormality_penalty_by_hand_and_zero_when_orthonormal():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=gen), torch.randn(4, 3, generator=gen)
    total = 0.0
    for i in range(3):
        for j in range(3):
            aa = sum(float(a[i, m] * a[j, m]) for m in range(5))
            bb = sum(float(b[m, i] * b[m, j]) for m in range(4))
            eye = 1.0 if i == j else 0.0
            total += (aa - eye) ** 2 + (bb - eye) ** 2
    assert float(orthonormality_penalty(a, b)) == pytest.approx(total / 9, rel=1e-5)
    q5 = torch.linalg.qr(torch.randn(5, 3, generator=gen)).Q  # orthonormal columns
    q4 = torch.linalg.qr(torch.randn(4, 3, generator=gen)).Q
    assert float(orthonormality_penalty(q5.T, q4)) == pytest.approx(0.0, abs=1e-10)
    # OWLoRA's penalty sums the newest blocks' over layers
    _, owlora = _owlora(False)
    owlora.add_task_blocks()
    expected = sum(float(orthonormality_penalty(b.A, b.B)) for b in owlora.newest_blocks().values())
    assert float(owlora.penalty()) == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------ BPPL
def _hand_bag() -> tuple[torch.Tensor, torch.Tensor]:
    attention = torch.tensor([0.55, 0.25, 0.1, 0.1], requires_grad=True)
    instances = torch.tensor([[2.0, 0.2], [1.0, 1.0], [0.1, 2.0], [-0.5, 1.5]], requires_grad=True)
    return attention, instances


def _hand_pseudo_labels(a: list[float], h: list[list[float]], t: float) -> list[tuple[int, float]]:
    bag = [sum(a[i] * h[i][d] for i in range(4)) for d in range(2)]
    rest = [1 - v for v in a]
    rev = [sum(rest[i] * h[i][d] for i in range(4)) / sum(rest) for d in range(2)]

    def cos(u: list[float], v: list[float]) -> float:
        return (u[0] * v[0] + u[1] * v[1]) / math.hypot(*u) / math.hypot(*v)

    out = []
    for x in h:
        e_rev, e_bag = math.exp(cos(x, rev) / t), math.exp(cos(x, bag) / t)
        p_bag = e_bag / (e_rev + e_bag)
        out.append((1, p_bag) if p_bag > 0.5 else (0, 1 - p_bag))
    return out


def test_bppl_pseudo_labels_by_hand():
    attention, instances = _hand_bag()
    for temperature in (1.0, 0.2):
        labels, conf = bppl_pseudo_labels(attention, instances, temperature)
        expected = _hand_pseudo_labels(attention.tolist(), instances.tolist(), temperature)
        assert labels.tolist() == [lab for lab, _ in expected]
        assert conf.tolist() == pytest.approx([c for _, c in expected], abs=1e-6)
    assert labels.tolist() == [1, 1, 0, 0]  # near the bag prototype / the reverse one


def test_bppl_keeps_confident_instances_of_correct_confident_positive_bags():
    attention, instances = _hand_bag()
    temperature = 0.2
    expected = _hand_pseudo_labels(attention.tolist(), instances.tolist(), temperature)
    confs = sorted(c for _, c in expected)
    tau2 = (confs[1] + confs[2]) / 2  # keeps the two most confident instances
    confident = torch.tensor([-3.0, 3.0])  # class 1 at 0.9975
    loss, kept = bppl_loss(confident, 1, attention, instances, tau2, 0.95, temperature)
    assert kept == 2
    a = attention.tolist()
    p = [(v - min(a)) / (max(a) + 1e-10) for v in a]
    nll = [
        -math.log((p[i] if lab == 1 else 1 - p[i]) + 1e-10)
        for i, (lab, c) in enumerate(expected)
        if c > tau2
    ]
    assert float(loss) == pytest.approx((2 / 4) * sum(nll) / 2, rel=1e-5)
    loss.backward()  # the gradient goes to the attention (the instance classifier) only
    assert attention.grad is not None and attention.grad.abs().sum() > 0
    assert instances.grad is None
    # no kept instance above every confidence
    assert bppl_loss(confident, 1, attention, instances, 0.999, 0.95, temperature)[1] == 0
    # the gates: wrong prediction, a negative bag, an unconfident bag
    for logits, label in (
        (torch.tensor([3.0, -3.0]), 1),  # predicted 0, label 1
        (torch.tensor([3.0, -3.0]), 0),  # right and confident, but negative
        (torch.tensor([-1.1, 1.1]), 1),  # right, positive, confidence 0.90 <= 0.95
    ):
        loss, kept = bppl_loss(logits, label, attention, instances, tau2, 0.95, temperature)
        assert kept == 0 and float(loss) == 0.0 and not loss.requires_grad
    # class-incremental: label 3 (the second class of task 1) is positive, 2 is not
    four = torch.tensor([-3.0, -3.0, -3.0, 3.0])
    assert bppl_loss(four, 3, attention, instances, tau2, 0.95, temperature)[1] == 2
    assert bppl_loss(four[[0, 1, 3, 2]], 2, attention, instances, tau2, 0.95, temperature)[1] == 0


def test_instance_probabilities_are_the_official_min_max_attention():
    probs = instance_probabilities(torch.tensor([0.5, 0.3, 0.2]))
    p = torch.tensor([0.3 / (0.5 + 1e-10), 0.1 / (0.5 + 1e-10), 0.0])
    assert torch.allclose(probs, torch.stack([1 - p, p], 1))


# ------------------------------------------------------------------ class-incremental head
def test_new_classes_keeps_earlier_tasks_head_rows():
    scenario = _scenario("new_classes", 2)
    strategy = _strategy(n_experiences=2, epochs=1)
    experiences = list(scenario.benchmark.train_stream)
    strategy.train(experiences[0])
    fc = strategy.model.head.fc
    old = (fc.weight.detach().clone(), fc.bias.detach().clone())
    strategy.train(experiences[1])
    fc = strategy.model.head.fc
    assert fc.out_features == 4
    assert torch.equal(fc.weight[:2], old[0]) and torch.equal(fc.bias[:2], old[1])
    assert not torch.equal(fc.bias[2:], torch.zeros(2))  # the new rows trained


# ------------------------------------------------------------------ config
def test_registered_and_bad_values_are_config_errors():
    assert STRATEGIES.get("comel") is CoMEL
    for bad in ({"svd_energy": 0.0}, {"bag_conf": 1.5}, {"rank": 0}, {"batch_size": 2}):
        with pytest.raises(ConfigError):
            CoMELConfig(name="comel", **bad)
