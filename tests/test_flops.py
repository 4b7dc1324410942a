"""Training FLOPs (clbench.flops) equal hand counts, on a two-layer model and through the
class-incremental protocol (a resumed run too); a sparse model's counts follow its masks."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from clbench import statefile
from clbench.adapters.sparse import MaskedLayer, MaskSet, mask_layers
from clbench.flops import TrainingFlops, layer_forward_flops
from clbench.leaderboard import TrackedRun, build_boards, render_markdown
from clbench.models import ClassifierModel
from clbench.protocols.class_incremental import (
    ClassIncremental,
    ClassIncrementalResult,
    run_class_incremental,
)
from clbench.record import RunRecord
from clbench.registry import SCENARIOS, STRATEGIES
from clbench.seeding import seed_everything
from helpers import FAST, only_run_dir, run_cli

# the two-layer model: Conv2d(1->4, 3x3, stride 2, pad 1) on 1x16x16, then Linear(256 -> 5)
BATCH = 3
CONV_OUT = 4 * 8 * 8  # output elements per sample
CONV = 2 * BATCH * CONV_OUT * 1 * 3 * 3  # 2 * output elements * in_channels * kh * kw
LIN = 2 * BATCH * 5 * 256  # 2 * output elements * in_features


def two_layer() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(256, 5))


def test_layer_forward_flops_by_hand():
    x = torch.randn(BATCH, 1, 16, 16)
    model = two_layer()
    h = model[0](x)
    assert layer_forward_flops(model[0], h) == CONV == 13_824
    assert layer_forward_flops(model[2], model[2](h.flatten(1))) == LIN == 7_680
    grouped = nn.Conv2d(4, 6, (3, 1), groups=2)  # 2 input channels per group
    out = grouped(torch.randn(2, 4, 5, 5))
    assert out.shape == (2, 6, 3, 5)
    assert layer_forward_flops(grouped, out) == 2 * (2 * 6 * 3 * 5) * 2 * 3 * 1
    with pytest.raises(TypeError, match="Linear and Conv2d"):
        layer_forward_flops(nn.ReLU(), out)


def test_two_layer_model_counts_by_hand():
    model, x = two_layer(), torch.randn(BATCH, 1, 16, 16)
    with TrainingFlops(model) as f, torch.no_grad():  # no graph: the forward only
        model(x)
    assert f.flops == f.dense_flops == CONV + LIN
    assert f.layers == {"0": CONV, "2": LIN}

    with TrainingFlops(model) as f:  # a training step: the first layer needs no input gradient
        model(x).square().sum().backward()
    assert f.layers == {"0": 2 * CONV, "2": 3 * LIN}
    assert f.flops == f.dense_flops == 2 * CONV + 3 * LIN == 50_688

    with TrainingFlops(model) as f:  # a graph, but no backward ran: the forward only
        model(x)
    assert f.flops == CONV + LIN

    model[0].requires_grad_(False)  # frozen: no backward through it, nor into its output
    with TrainingFlops(model) as f:
        model(x).sum().backward()
    assert f.layers == {"0": CONV, "2": 2 * LIN}

    f = TrainingFlops(model)  # a copy (a teacher) counts nothing; a layer put in counts
    copy.deepcopy(model)(x)
    assert f.flops == 0
    model[2] = nn.Linear(256, 7)
    model(x)
    f.close()
    model(x)  # closed: nothing more
    assert f.layers == {"0": CONV, "2": 2 * BATCH * 7 * 256}


def test_masked_layer_counts_by_its_densities():
    model, x = two_layer(), torch.randn(BATCH, 1, 16, 16)
    layers = mask_layers(model, where=lambda name, m: isinstance(m, nn.Linear))
    assert list(layers) == ["2"]
    masked = layers["2"]
    assert isinstance(masked, MaskedLayer)
    with torch.no_grad():
        mask = torch.zeros(5, 256, dtype=torch.bool)
        mask.view(-1)[:320] = True  # 320 of 1280 weights: density 0.25
        masked.mask.copy_(mask)
    assert masked.flop_density() == (0.25, 0.25)  # default: the active weights' gradients
    masked.grad_density = 0.5
    assert masked.flop_density() == (0.25, 0.5)

    with TrainingFlops(model) as f, torch.no_grad():
        model(x)
    assert f.layers == {"0": CONV, "2": LIN * 0.25}  # the base is not counted again
    assert f.dense_layers == {"0": CONV, "2": LIN}

    with TrainingFlops(model) as f:
        model(x).sum().backward()
    assert f.layers == {"0": 2 * CONV, "2": LIN * (2 * 0.25 + 0.5)}
    assert f.dense_flops == 2 * CONV + 3 * LIN


# ---------------------------------------------------------------- the protocol
class Masked(STRATEGIES.get("finetune")):
    """Fine-tuning with the backbone's convolution at density 1/4 (a fixed random mask)."""

    def prepare_model(self, model: ClassifierModel) -> None:
        self.masks = MaskSet(mask_layers(model.backbone), torch.Generator().manual_seed(0))
        self.masks.randomize({name: 0.25 for name in self.masks.layers})

    def sparsity_report(self) -> dict:
        return self.masks.report()


def tiny_strategy(cls: type, epochs: int = 2):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Flatten())
    cfg = cls.Config(name="finetune", epochs=epochs, batch_size=64, lr=1e-2)
    return cls(model=ClassifierModel(backbone, 256), cfg=cfg)


def hand_count(
    scenario, epochs: int, conv_density: float = 1.0
) -> tuple[list[float], list[float], dict[str, float]]:
    """Training FLOPs per experience by hand (actual, dense) and per layer (actual): per
    sample, the convolution's forward and weight gradient (its input is the data: no input
    gradient) and the head's forward, input and weight gradients. A masked convolution's
    forward and weight gradient both count at its density (only the active weights'
    gradients are needed)."""
    conv = 2 * CONV_OUT * 9  # dense forward FLOPs of one sample
    actual, dense, layers = [], [], {"backbone.0": 0.0, "head.fc": 0.0}
    seen = 0
    for exp, classes in zip(scenario.train_stream, scenario.classes_per_experience, strict=True):
        seen += len(classes)  # the head has a unit per class seen
        samples = epochs * len(exp.dataset)
        head = 3 * 2 * seen * 256
        actual.append(samples * (conv * 2 * conv_density + head))
        dense.append(samples * (2 * conv + head))
        layers["backbone.0"] += samples * conv * 2 * conv_density
        layers["head.fc"] += samples * head
    return actual, dense, layers


def digits(n_experiences: int = 2):
    seed_everything(0)
    build = SCENARIOS.get("split_digits")
    return build(build.Config(n_experiences=n_experiences))


def test_a_run_counts_its_training_flops_and_keeps_them_on_resume(tmp_path):
    scenario = digits()
    expected, _, layers = hand_count(scenario, epochs=2)

    class Killed(Exception):
        pass

    def kill_after_first(t: int, result: ClassIncrementalResult) -> None:
        statefile.save(tmp_path / "state", dataclasses.asdict(result))  # as a checkpoint
        raise Killed

    strategy = tiny_strategy(STRATEGIES.get("finetune"))
    with pytest.raises(Killed):
        run_class_incremental(scenario, strategy, on_checkpoint=kill_after_first)
    saved = ClassIncrementalResult(**statefile.load(tmp_path / "state"))
    assert saved.train_flops_per_experience == expected[:1]
    result = run_class_incremental(scenario, strategy, resume_from=saved)
    # the evaluations after each experience are not counted
    assert result.train_flops_per_experience == expected
    assert result.train_flops_dense_per_experience == expected
    assert result.train_flops == sum(expected)
    assert result.train_flops_per_layer == layers
    assert result.sparsity is None
    part = ClassIncremental().record(None, strategy, result)  # ctx is not read
    assert part.efficiency["train_gflops"] == pytest.approx(sum(expected) / 1e9)
    assert part.efficiency["flops_vs_dense"] == 1.0
    assert "density" not in part.efficiency
    steps = [s["experience_train_gflops"] for s in part.steps]
    assert steps == pytest.approx([e / 1e9 for e in expected])


def test_a_sparse_run_records_its_density_and_fewer_flops():
    scenario = digits()
    strategy = tiny_strategy(Masked, epochs=1)
    result = run_class_incremental(scenario, strategy)
    expected, dense, layers = hand_count(scenario, epochs=1, conv_density=0.25)
    assert result.train_flops_per_experience == expected
    assert result.train_flops_dense_per_experience == dense
    assert result.train_flops_per_layer == layers
    assert result.sparsity["layers"] == {"0": 0.25}  # 9 of the convolution's 36 weights
    assert (result.sparsity["nonzero"], result.sparsity["total"]) == (9, 36)
    part = ClassIncremental().record(None, strategy, result)
    assert part.efficiency["density"] == 0.25
    assert part.efficiency["flops_vs_dense"] == pytest.approx(sum(expected) / sum(dense))
    assert part.efficiency["flops_vs_dense"] < 1.0
    assert part.fields["sparsity"] == result.sparsity


def test_results_and_board_carry_the_costs(tmp_path):
    """A run of the CLI writes the FLOPs to results.json; its board shows the cost columns."""
    args = ["run", *FAST, "scenario=split_digits", "strategy=finetune", f"runs_dir={tmp_path}"]
    assert run_cli(args) == 0
    record = RunRecord.load(only_run_dir(tmp_path) / "results.json")
    e = record.efficiency
    assert e["train_gflops"] > 0 and e["flops_vs_dense"] == 1.0 and "density" not in e
    per_exp = record["train_flops_per_experience"]
    assert len(per_exp) == 2 and sum(per_exp) == pytest.approx(e["train_gflops"] * 1e9)
    assert record["sparsity"] is None and record["train_flops_per_layer"]
    board = build_boards([TrackedRun("r", 0, record)])["split_digits"]
    md = render_markdown(board)
    head = next(line for line in md.splitlines() if line.startswith("| rank"))
    row = next(line for line in md.splitlines() if line.startswith("| 1 |"))
    cells = dict(zip(head.split(" | "), row.split(" | "), strict=True))
    assert cells["density"] == "n/a"  # a dense run has no density
    assert cells["FLOPs vs dense"] == "1.00"
    assert cells["train GFLOPs"] == f"{e['train_gflops']:.2f}"
    assert cells["train s"] == f"{e['train_seconds']:.2f}"
