"""A diverging test-time run stops with one line naming the domain and the batch (issue 16)."""

from __future__ import annotations

import pytest
import torch
from clbench.scenarios.tta import DigitsCConfig

from clbench.backbones.micro_vit import build_micro_vit
from clbench.errors import ClbenchError
from clbench.models import ClassifierModel
from clbench.protocols.tta import run_tta
from clbench.registry import SCENARIOS, STRATEGIES
from helpers import run_cli


@pytest.fixture(scope="module")
def stream():
    """Two corrupted domains of 64 digits each, with the clean test set."""
    return SCENARIOS.get("digits_c")(
        DigitsCConfig(corruptions=["gaussian_noise", "fog"], n_per_domain=64)
    )


def _strategy(name: str, stream, **cfg):
    """``name`` on a random-init micro ViT with a 10-class head (no source training)."""
    torch.manual_seed(0)
    model = ClassifierModel(build_micro_vit(), 64)
    model.head.grow(10)
    cls = STRATEGIES.get(name)
    strategy = cls(model=model, cfg=cls.Config(**cfg), seed=0, stream=stream.stream)
    strategy.setup(None)
    return strategy


class Poisoned:
    """A fake strategy with finite logits, except adapt() at ``at`` = (domain, batch),
    1-based, or predict() once it has adapted (``after_stream``)."""

    def __init__(
        self, at: tuple[int, int] | None, value: float = float("nan"), after_stream: bool = False
    ) -> None:
        self.device = torch.device("cpu")
        self.at, self.value, self.after_stream = at, value, after_stream
        self.domain, self.batch, self.adapted = 1, 0, 0

    def reset(self) -> None:
        pass

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 10)
        if self.after_stream and self.adapted:
            logits[0, 3] = self.value
        return logits

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.batch += 1
        self.adapted += 1
        logits = torch.zeros(len(x), 10)
        if (self.domain, self.batch) == self.at:
            logits[-1, 0] = self.value
        return logits

    def modules(self) -> list:
        return []

    def state_tensors(self) -> list:
        return []


def _run(stream, strategy) -> str:
    """The one-line error of running ``strategy`` along ``stream``."""

    def next_domain(t: int, domain: str, error: float) -> None:
        if isinstance(strategy, Poisoned):
            strategy.domain, strategy.batch = t + 2, 0

    with pytest.raises(ClbenchError) as e:
        run_tta(stream, strategy, seed=0, batch_size=16, on_domain=next_domain)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 3e7])
def test_a_bad_logit_names_the_domain_and_the_batch_1_based(stream, value):
    message = _run(stream, Poisoned(at=(2, 3), value=value))
    shown = {3e7: "reached 3e+07 (beyond 1e+06: diverged)"}.get(value, f"became {abs(value)}")
    assert message == f"logits {shown} at domain 2 (fog-5), batch 3; check the data and the model"


def test_a_bad_prediction_on_the_clean_set_after_the_stream_is_caught(stream):
    # e.g. the update after the last batch broke the weights: no next batch shows it
    message = _run(stream, Poisoned(at=None, after_stream=True))
    assert message == (
        "logits became nan on the clean test set after the stream, batch 1; "
        "check the data and the model"
    )


@pytest.mark.parametrize(
    ("name", "cfg", "expected"),
    [
        # Adam at lr 1e9 on LayerNorm affines: every value stays finite but the logits
        # jump from ~1 to ~1e7-1e10 (entropy 0, the model predicts one class)
        ("tent", {"lr": 1e9}, "logits reached "),
        # a mean teacher on every parameter: the student's weights become NaN
        ("cotta", {"lr": 1e9, "n_augmentations": 2}, "logits became nan "),
    ],
)
def test_a_diverging_strategy_stops_at_the_next_batch(stream, name, cfg, expected):
    message = _run(stream, _strategy(name, stream, **cfg))
    assert message.startswith(expected)
    assert message.endswith(
        "at domain 1 (gaussian_noise-5), batch 2; lower strategy.lr or check the data"
    )


def test_a_healthy_adapting_run_passes_the_check(stream):
    result = run_tta(stream, _strategy("tent", stream), seed=0, batch_size=16)
    assert result.steps == 8 and all(0 <= e <= 1 for e in result.online_error)


def test_the_cli_gives_one_line_and_exit_code_2(tmp_path, capsys):
    args = ["run", "scenario=digits_c", "strategy=tent", "strategy.lr=1e9"]
    args += ["backbone.pretrained=none", "scenario.corruptions=[fog,contrast]"]
    args += ["scenario.n_per_domain=64", "scenario.batch_size=32", "scenario.source_epochs=1"]
    args += ["tracking=none", "progress=false", f"runs_dir={tmp_path}"]
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: logits reached ")
    assert err[-1].endswith("at domain 1 (fog-5), batch 2; lower strategy.lr or check the data")
    assert not list(tmp_path.rglob("results.json"))
