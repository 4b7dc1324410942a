"""Mixed precision (``precision``) and deterministic algorithms (``deterministic``)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from clbench.strategies.lora import LoRAConfig, SequentialLoRA
from clbench.strategies.tta import Tent
from torch import nn

from clbench import runner
from clbench.adapters.owlora import orthonormality_penalty
from clbench.adapters.prompts import PromptPool
from clbench.backbones.micro_vit import build_micro_vit
from clbench.errors import ConfigError
from clbench.models import ClassifierModel
from clbench.precision import Precision, apply_precision, full_precision
from clbench.protocols.tta import DomainStream
from helpers import FAST, only_run_dir, results_of, run_cli


@pytest.fixture
def restore_determinism():
    """Put the process's deterministic settings back after a test that runs a job."""
    state = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state[2], state[3]


def linear_dtypes(monkeypatch) -> list[torch.dtype]:
    """Record the output dtype of every nn.Linear of the learner a run builds (hooks put
    on once the runner has given the learner its precision)."""
    seen: list[torch.dtype] = []
    apply = runner.apply_precision

    def apply_and_hook(learner, name):
        apply(learner, name)
        for m in learner.model.modules():
            if isinstance(m, nn.Linear):
                m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))

    monkeypatch.setattr(runner, "apply_precision", apply_and_hook)
    return seen


def test_bf16_run_forwards_in_bfloat16_and_fp32_is_the_default(
    tmp_path, monkeypatch, restore_determinism
):
    seen = linear_dtypes(monkeypatch)
    args = ["run", *FAST, "checkpoint=false"]
    mixed = ["precision=bf16", "deterministic=false"]
    assert run_cli([*args, f"runs_dir={tmp_path / 'bf16'}", *mixed]) == 0
    bf16 = results_of(only_run_dir(tmp_path / "bf16"))
    assert torch.bfloat16 in seen and torch.float32 not in seen  # every linear: autocast
    assert all(math.isfinite(v) for v in bf16["metrics"].values() if v is not None)
    assert bf16["config"]["precision"] == "bf16" and bf16["tags"]["precision"] == "bf16"
    # deterministic=false: PyTorch's defaults, cuDNN autotuned
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark

    seen.clear()
    assert run_cli([*args, f"runs_dir={tmp_path / 'default'}"]) == 0
    assert set(seen) == {torch.float32}
    assert torch.are_deterministic_algorithms_enabled()  # deterministic: true (default)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"]
    assert run_cli([*args, f"runs_dir={tmp_path / 'fp32'}", "precision=fp32"]) == 0
    default = results_of(only_run_dir(tmp_path / "default"))
    fp32 = results_of(only_run_dir(tmp_path / "fp32"))
    assert default["config"]["precision"] == "fp32"
    for key in ("metrics", "accuracy_matrix", "accuracy_matrix_task_aware"):
        assert fp32[key] == default[key]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("precision=fp16", "precision=fp16 needs a CUDA device (device=cpu); use precision=bf16"),
        ("precision=fp8", "invalid value for precision: 'fp8'; valid choices: fp32, bf16, fp16"),
        ("deterministic=maybe", "invalid value for deterministic: 'maybe'; expected a boolean"),
    ],
)
def test_bad_precision_is_one_line_and_exit_2(tmp_path, capsys, override, expected):
    code = run_cli(["run", *FAST, f"runs_dir={tmp_path}", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not list(tmp_path.rglob("results.json"))


def test_fp16_with_auto_device_on_a_cpu_machine_names_both(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("auto resolves to CUDA here")
    assert run_cli(["run", *FAST, f"runs_dir={tmp_path}", "precision=fp16", "device=auto"]) == 2
    assert "(device=auto, here cpu)" in capsys.readouterr().err


def test_loss_scaler_unscales_before_hooks_and_steps_like_fp32():
    """The fp16 path (GradScaler) on CPU's scaler: after backward the gradients are the
    unscaled ones, the step equals a plain step, a step without gradients is skipped."""
    torch.manual_seed(0)
    ref, mixed = nn.Linear(4, 3), nn.Linear(4, 3)
    mixed.load_state_dict(ref.state_dict())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(mixed.parameters(), lr=0.1)
    nn.functional.cross_entropy(ref(x), y).backward()
    opt_ref.step()

    precision = Precision("bf16", "cpu")
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    precision.backward(nn.functional.cross_entropy(mixed(x), y), opt)
    assert torch.allclose(mixed.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-7)
    precision.step(opt)
    assert torch.allclose(mixed.weight, ref.weight, rtol=1e-5, atol=1e-7)

    idle = nn.Linear(2, 2)  # no gradient: no step, no scaler error, the scale unchanged
    idle_opt = torch.optim.SGD(idle.parameters(), lr=0.1)
    before = idle.weight.detach().clone()
    precision.backward(mixed(x).sum(), idle_opt)
    precision.step(idle_opt)
    assert torch.equal(idle.weight, before) and precision.scaler.get_scale() == 1024.0


def test_fp16_precision_needs_cuda_and_fp32_changes_nothing():
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        Precision("fp16", "cpu")
    fp32 = Precision("fp32", "cuda:1")
    assert not fp32.enabled and fp32.scaler is None and fp32.device_type == "cuda"
    with fp32.autocast():
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ConfigError, match="no set_precision"):
        apply_precision(object(), "bf16")
    apply_precision(object(), "fp32")  # nothing to set, nothing to refuse


def test_statistics_inside_a_forward_pass_stay_float32():
    """Under bf16 autocast a matrix product is bf16; full_precision() and the adapters'
    penalties / key matching built on it return float32, equal to their fp32 values."""
    torch.manual_seed(0)
    a, b = torch.randn(4, 32), torch.randn(32, 4)
    pool = PromptPool(pool_size=6, length=2, dim=32, top_k=2)
    query = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with full_precision():
            assert (a @ b).dtype == torch.float32
        assert (a @ b).dtype == torch.bfloat16  # back on after the block
        penalty = orthonormality_penalty(a, b)
        similarity = pool.similarity(query.bfloat16())
    assert penalty.dtype == torch.float32 and similarity.dtype == torch.float32
    assert torch.equal(penalty, orthonormality_penalty(a, b))
    assert torch.allclose(similarity, pool.similarity(query.bfloat16().float()))


def test_test_time_learner_adapts_in_bf16():
    torch.manual_seed(0)
    vit = build_micro_vit(depth=1, embed_dim=16, num_heads=2, img_size=8)
    model = ClassifierModel(vit, vit.num_features)
    model.head.grow(4)
    tent = Tent(
        model=model.eval(),
        cfg=Tent.Config(name="tent"),
        stream=DomainStream(domains=(), batch_size=8, value_range=(-1.0, 1.0)),
    )
    tent.setup(None)
    tent.set_precision("bf16")
    seen: list[torch.dtype] = []
    model.head.fc.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    before = {n: p.detach().clone() for n, p in tent.norm_params.items()}
    logits = tent.adapt(torch.randn(8, 1, 8, 8))
    assert seen == [torch.bfloat16] and logits.dtype == torch.float32
    assert any(not torch.equal(before[n], p) for n, p in tent.norm_params.items())
    assert all(p.dtype == torch.float32 for p in tent.norm_params.values())


def test_supervised_passes_wrap_once_and_unwrap():
    """precision_passes wraps forward/criterion for the block (an evaluation inside a
    training epoch keeps the outer wrapping) and leaves the class methods after it."""
    torch.manual_seed(0)
    vit = build_micro_vit(depth=1, embed_dim=16, num_heads=2, img_size=8)
    strategy = SequentialLoRA(
        model=ClassifierModel(vit, vit.num_features), cfg=LoRAConfig(name="lora")
    )
    with strategy.precision_passes():  # fp32: nothing wrapped
        assert "forward" not in vars(strategy)
    strategy.set_precision("bf16")
    with strategy.precision_passes():
        outer = strategy.forward
        with strategy.precision_passes():
            assert strategy.forward is outer
        assert strategy.forward is outer
    assert "forward" not in vars(strategy) and "criterion" not in vars(strategy)
