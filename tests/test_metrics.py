"""Metrics on hand-computed matrices (docs/protocols.md definitions), the "not available"
convention (NaN / null / n/a) and the class-incremental protocol's refusal of a loss mask
that trains nothing."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from clbench import metrics
from clbench.errors import ConfigError
from clbench.protocols.class_incremental import (
    ClassIncremental,
    PredictionRecorder,
    check_loss_mask,
)
from clbench.record import RunRecord
from helpers import FAST, run_cli

# 3 experiences; test sizes 10, 20, 30.
R = [
    [0.9, 0.0, 0.0],
    [0.6, 0.8, 0.0],
    [0.5, 0.4, 0.7],
]
SIZES = [10, 20, 30]


def test_final_accuracy_is_sample_weighted():
    # (0.5*10 + 0.4*20 + 0.7*30) / 60 = (5 + 8 + 21) / 60
    assert metrics.final_accuracy(R, SIZES) == pytest.approx(34 / 60)


def test_final_accuracy_task_averaged():
    assert metrics.final_accuracy_task_avg(R) == pytest.approx((0.5 + 0.4 + 0.7) / 3)


def test_average_incremental_accuracy():
    a0 = 0.9
    a1 = (0.6 * 10 + 0.8 * 20) / 30
    a2 = 34 / 60
    assert metrics.average_incremental_accuracy(R, SIZES) == pytest.approx((a0 + a1 + a2) / 3)


def test_forgetting_excludes_final_row_by_default():
    # i=0: max(0.9, 0.6) - 0.5 = 0.4 ; i=1: max(0.0, 0.8) - 0.4 = 0.4
    assert metrics.forgetting(R) == pytest.approx(0.4)


def test_forgetting_variant_including_final_row():
    r = [[0.5, 0.0], [0.9, 0.8]]  # accuracy on exp 0 went *up* after exp 1
    assert metrics.forgetting(r) == pytest.approx(0.5 - 0.9)
    assert metrics.forgetting(r, include_final=True) == pytest.approx(0.0)


def test_bwt():
    # i=0: 0.5-0.9 ; i=1: 0.4-0.8
    assert metrics.bwt(R) == pytest.approx(((0.5 - 0.9) + (0.4 - 0.8)) / 2)


def test_fwt_against_initial_model():
    r = [[0.9, 0.3, 0.2], [0.6, 0.8, 0.5], [0.5, 0.4, 0.7]]
    b = [0.1, 0.1, 0.25]
    # i=1: 0.3-0.1 ; i=2: 0.5-0.25
    assert metrics.fwt(r, b) == pytest.approx((0.2 + 0.25) / 2)


def test_plasticity():
    assert metrics.plasticity(R) == pytest.approx((0.9 + 0.8 + 0.7) / 3)


def test_missing_entries_are_skipped():
    r = [[0.9, None], [0.7, 0.8]]
    assert math.isnan(metrics.fwt(r, [0.0, None]))
    assert metrics.plasticity(r) == pytest.approx(0.85)


def test_single_experience_has_no_forgetting_value():
    assert math.isnan(metrics.forgetting([[0.9]]))
    assert metrics.final_accuracy([[0.9]], [5]) == pytest.approx(0.9)


def test_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        metrics.as_matrix([[0.1, 0.2]])


# ------------------------------------------------------- FWT: not available, not 0
def test_fwt_is_not_available_when_no_initial_accuracy_was_measured():
    r = [[0.9, 0.0, 0.0], [0.6, 0.8, 0.0], [0.5, 0.4, 0.7]]
    growing_head = [None, None, None]  # the initial model had no output unit at all
    assert math.isnan(metrics.fwt(r, growing_head))
    summary = metrics.class_incremental_summary(r, SIZES, growing_head)
    assert math.isnan(summary["fwt"])
    assert summary["forgetting_incl_final"] == pytest.approx(0.4)
    # a pre-sized head measured b_1 but not b_2: only the measured term counts
    assert metrics.fwt([[0.9, 0.3, 0.0], [0.6, 0.8, 0.0], r[2]], [0.5, 0.1, None]) == (
        pytest.approx(0.2)
    )


def _batch(exp: int, logits: list[list[float]], y: list[int]) -> SimpleNamespace:
    return SimpleNamespace(
        experience=SimpleNamespace(current_experience=exp),
        mb_output=torch.tensor(logits),
        mb_y=torch.tensor(y),
    )


def test_the_initial_evaluation_marks_experiences_without_an_output_unit_unmeasured():
    rec = PredictionRecorder([[0, 1], [2, 3]])
    # a head with units for classes 0 and 1 only: experience 1 cannot be predicted
    rec.after_eval_iteration(_batch(0, [[2.0, 1.0], [0.0, 1.0]], [0, 0]))
    rec.after_eval_iteration(_batch(1, [[2.0, 1.0], [0.0, 1.0]], [2, 3]))
    agnostic, aware = rec.accuracies(2, initial=True)
    assert agnostic[0] == 0.5 and math.isnan(agnostic[1])
    assert aware[0] == 0.5 and math.isnan(aware[1])
    # after training, an unseen experience scores 0 in R (a row of the matrix)
    agnostic, _ = rec.accuracies(2)
    assert agnostic == [0.5, 0.0]


def _record(metric_values: dict) -> RunRecord:
    return RunRecord(
        clbench_version="0.1.0",
        run_name="r",
        run_dir="/r",
        scenario="split_digits",
        kind="class_incremental",
        strategy="lora",
        backbone="micro_vit",
        seed=0,
        uses_task_id=False,
        config={},
        class_names=["0", "1"],
        tags={},
        metrics=metric_values,
        steps=[],
        efficiency={"trainable_params": 10, "train_seconds": 1.0},
        fields={"accuracy_matrix": [[0.9, 0.0], [0.5, 0.8]]},
    )


def test_an_undefined_metric_is_null_in_results_json_and_n_a_in_the_summary():
    r = [[0.9, 0.0], [0.5, 0.8]]
    values = metrics.class_incremental_summary(r, [10, 10], [None, None])
    record = _record(values)
    stored = json.loads(record.dumps())["metrics"]
    assert stored["fwt"] is None and stored["forgetting"] == pytest.approx(0.4)
    back = RunRecord.loads(record.dumps(), "results.json")  # null reads back as a metric
    assert back.metrics["fwt"] is None
    lines = ClassIncremental().summary(back).splitlines()
    assert [line.split(":")[1].strip() for line in lines if line.strip().startswith("fwt:")] == [
        "n/a"
    ]
    assert any(line.strip().startswith("forgetting_incl_final: 0.4000") for line in lines)


# ----------------------------------------- loss_mask=current with one class each
def test_loss_mask_current_with_a_single_class_experience_is_refused():
    one_each = [[c] for c in range(10)]
    with pytest.raises(ConfigError) as e:
        check_loss_mask("current", one_each, "split_digits", has_n_experiences=True)
    msg = str(e.value)
    assert "\n" not in msg and "strategy.loss_mask=current trains nothing" in msg
    assert "every experience of scenario 'split_digits' holds one class" in msg
    assert "strategy.loss_mask=seen" in msg and "scenario.n_experiences" in msg
    with pytest.raises(ConfigError, match="experience 3 of scenario 's' holds one class"):
        check_loss_mask("current", [[0, 1], [2, 3], [4]], "s")
    check_loss_mask("seen", one_each, "split_digits")  # every seen logit: trains
    check_loss_mask("current", [[0, 1], [2, 3]], "split_digits")
    check_loss_mask(None, one_each, "split_digits")  # a strategy without a loss mask


def test_a_run_with_one_class_per_experience_and_loss_mask_current_stops_in_one_line(
    tmp_path, capsys
):
    # lora's shipped loss_mask is current (conf/strategy/lora.yaml)
    fast = [o for o in FAST if not o.startswith("scenario.n_experiences")]
    args = ["run", *fast, f"runs_dir={tmp_path}", "strategy=lora", "scenario.n_experiences=10"]
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: strategy.loss_mask=current trains nothing")
    assert not list(tmp_path.rglob("results.json"))
