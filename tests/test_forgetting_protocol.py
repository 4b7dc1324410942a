"""The continual-forgetting protocol: GS-LoRA's split, H and the group accuracies by hand,
and short end-to-end runs on glyph_forget (the pretrained glyph classifier)."""

from __future__ import annotations

import json
import math

import pytest
from clbench.strategies.erasure import ErasureRequest

from clbench.protocols.forgetting import (
    ForgettingResult,
    group_matrix,
    gs_lora_split,
    harmonic,
    request_values,
    summary_metrics,
)
from helpers import only_run_dir, results_of, run_cli

QUICK = ["scenario=glyph_forget", "strategy=finetune_retain", "strategy.epochs=1",
         "tracking=none", "progress=false"]  # fmt: skip


def test_split_follows_gs_lora_rule_on_a_hand_worked_example():
    # Python's random seeded 1337 shuffles range(10) to this order (GS-LoRA's code:
    # random.seed(SEED); random.shuffle(order_list))
    order, requests = gs_lora_split(10, first=6, per_request=4, n_requests=2, seed=1337)
    assert order == [0, 3, 7, 2, 1, 6, 4, 5, 8, 9]
    # request 0: remain order[0:6], forget order[6:10], old none
    assert requests[0] == ErasureRequest(forget=(4, 5, 8, 9), remain=(0, 3, 7, 2, 1, 6), old=())
    # request 1: remain order[0:2], forget order[2:6], old order[6:10]
    assert requests[1] == ErasureRequest(forget=(7, 2, 1, 6), remain=(0, 3), old=(4, 5, 8, 9))
    # the missing-class setting: the last retained classes of each request have no data
    _, missing = gs_lora_split(10, 6, 4, 2, 1337, n_missing=1)
    assert [r.missing for r in missing] == [(6,), (3,)]


@pytest.mark.parametrize(
    ("first", "per", "n"), [(5, 4, 1), (6, 4, 3), (8, 2, 0)]
)  # first + per != C; no retained class left; no request
def test_split_refuses_impossible_requests(first, per, n):
    with pytest.raises(ValueError):
        gs_lora_split(10, first, per, n)


def test_harmonic_mean_by_hand_and_zero_when_nothing_is_forgotten():
    assert harmonic(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert harmonic(0.0, 0.9) == 0.0
    assert harmonic(-0.1, 0.9) == 0.0  # forget accuracy went up: nothing forgotten
    assert math.isnan(harmonic(float("nan"), 0.9))


def test_request_values_and_group_matrix_by_hand():
    # 4 classes; request 1 forgets {3}, request 2 forgets {2}; class 1 has 2x the samples
    requests = [
        ErasureRequest(forget=(3,), remain=(0, 1, 2), old=()),
        ErasureRequest(forget=(2,), remain=(0, 1), old=(3,)),
    ]
    result = ForgettingResult(
        class_accuracy=[
            [0.9, 0.8, 0.7, 0.6],  # original model
            [0.9, 0.5, 0.7, 0.1],  # after request 1
            [0.6, 0.8, 0.2, 0.3],  # after request 2
        ],
        class_sizes=[10, 20, 10, 10],
        train_seconds=[1.0, 2.0],
    )
    first, second = request_values(result, requests)
    assert first["acc_r"] == pytest.approx((0.9 * 10 + 0.5 * 20 + 0.7 * 10) / 40)
    assert first["acc_f"] == pytest.approx(0.1)
    assert first["drop_f"] == pytest.approx(0.5)
    assert math.isnan(first["acc_o"])
    assert first["acc_r_original"] == pytest.approx((9 + 16 + 7) / 40)
    assert second["acc_r"] == pytest.approx((6 + 16) / 30)
    assert second["acc_f_before"] == pytest.approx(0.7)  # row 1, class 2
    assert second["drop_f"] == pytest.approx(0.5)
    assert second["acc_o"] == pytest.approx(0.3)
    assert second["H"] == pytest.approx(harmonic(0.5, 22 / 30))
    assert second["acc_r_drop"] == pytest.approx((9 + 16) / 30 - 22 / 30)
    names, matrix = group_matrix(result, requests)
    assert names == ["forget 1", "forget 2", "retained"]
    assert matrix[2] == pytest.approx([0.3, 0.2, (6 + 16) / 30])
    metrics = summary_metrics([first, second])
    assert metrics["H"] == pytest.approx(second["H"])
    assert metrics["mean_H"] == pytest.approx((first["H"] + second["H"]) / 2)
    assert metrics["max_acc_o"] == pytest.approx(0.3)


def test_glyph_forget_run_records_every_request(pretrained, tmp_path):
    assert run_cli(["run", *QUICK, "scenario.n_requests=2", f"runs_dir={tmp_path}"]) == 0
    run = only_run_dir(tmp_path)
    r = results_of(run)
    assert r["kind"] == "forgetting"
    assert len(r["steps"]) == 2 and len(r["requests"]) == 2
    assert r["requests"][0]["forget"] == r["class_order"][46:58]
    assert r["requests"][1]["old"] == r["class_order"][46:58]
    # the start model is the pretrained glyph classifier: it knows the glyphs
    original = r["steps"][0]["acc_r_original"]
    assert original > 0.7
    assert len(r["class_accuracy"]) == 3 and len(r["class_accuracy"][0]) == 58
    assert r["group_names"] == ["forget 1", "forget 2", "retained"]
    for key in ("H", "acc_r", "acc_f", "acc_o", "mean_H"):
        assert r["metrics"][key] is not None and 0.0 <= r["metrics"][key] <= 1.0
    # fine-tuning on retained data keeps them and makes the forgotten classes fade
    assert r["metrics"]["acc_r"] > 0.7
    assert (run / "forgetting_accuracies.png").is_file()
    json.dumps(r)  # strict JSON: no NaN


def test_single_step_variant(pretrained, tmp_path):
    """One request of 10 classes (GS-LoRA's single-step setting, F = C - 10)."""
    args = ["run", *QUICK, "scenario.n_requests=1", "scenario.per_request=10",
            f"runs_dir={tmp_path}"]  # fmt: skip
    assert run_cli(args) == 0
    r = results_of(only_run_dir(tmp_path))
    assert len(r["steps"]) == 1 and len(r["requests"][0]["forget"]) == 10
    assert r["metrics"]["acc_o"] is None  # nothing was forgotten earlier


def test_impossible_split_is_one_line_and_exit_2(tmp_path, capsys):
    args = ["run", *QUICK, "scenario.n_requests=9", f"runs_dir={tmp_path}"]
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "n_requests" in err[0], err


@pytest.mark.parametrize(
    ("scenario", "strategy", "theirs"),
    [("split_digits", "gs_lora", "forgetting"), ("glyph_forget", "lora", "class_incremental")],
)
def test_a_strategy_of_another_kind_is_refused(tmp_path, capsys, scenario, strategy, theirs):
    """An erasure strategy is a CLStrategy too: its kind, not only its base, decides."""
    args = ["run", f"scenario={scenario}", f"strategy={strategy}", "backbone.pretrained=none",
            "tracking=none", "progress=false", f"runs_dir={tmp_path}"]  # fmt: skip
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"it runs {theirs!r} scenarios" in err[0], err
