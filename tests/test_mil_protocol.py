"""The continual MIL kind: its metrics by hand, the embedded digit_bags scenario, a run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from clbench.scenarios.digit_bags import DigitBagsConfig, digit_bags
from sklearn.datasets import load_digits

from clbench.protocols.mil import bag_values, instance_values, scaled
from helpers import only_run_dir, results_of, run_cli

QUICK = [
    "scenario=digit_bags",
    "strategy=mil_finetune",
    "scenario.train_bags_per_class=8",
    "scenario.test_bags_per_class=4",
    "strategy.epochs=2",
    "progress=false",
]


def test_perfect_attention_localises_perfectly_and_reversed_attention_fails():
    labels = [torch.tensor([0, 1, 0, 0, 1]), torch.tensor([1, 0, 0]), torch.tensor([0, 0, 0])]
    perfect = [torch.tensor([0.05, 0.4, 0.05, 0.1, 0.4]), torch.tensor([0.8, 0.1, 0.1])]
    perfect.append(torch.tensor([0.2, 0.5, 0.3]))  # a bag with no key instance: not scored
    v = instance_values(perfect, labels)
    assert v["instance_auc"] == 1.0 and v["instance_accuracy"] == 1.0
    assert v["instance_f1"] == 1.0 and v["dice"] == 1.0
    reversed_ = [1 - a for a in perfect]
    assert instance_values(reversed_, labels)["instance_auc"] == 0.0


def test_attention_is_scaled_within_each_bag():
    assert scaled(torch.tensor([0.1, 0.3, 0.2])).tolist() == pytest.approx([0.0, 1.0, 0.5])
    assert scaled(torch.tensor([1.0])).tolist() == [1.0]


def test_masked_and_unmasked_accuracy_equal_the_hand_count():
    # task with classes (2, 3) on a 6-class head; bags labelled 2, 2, 3, 3
    logits = [
        torch.tensor([0.0, 0.0, 2.0, 1.0, 0.0, 0.0]),  # unmasked 2 (right), masked 2 (right)
        torch.tensor([5.0, 0.0, 1.0, 2.0, 0.0, 0.0]),  # unmasked 0 (wrong), masked 3 (wrong)
        torch.tensor([0.0, 9.0, 1.0, 3.0, 0.0, 0.0]),  # unmasked 1 (wrong), masked 3 (right)
        torch.tensor([0.0, 0.0, 0.0, 4.0, 0.0, 7.0]),  # unmasked 5 (wrong), masked 3 (right)
    ]
    v = bag_values(logits, [2, 2, 3, 3], (2, 3))
    assert v["accuracy"] == 0.25
    assert v["accuracy_masked"] == 0.75
    # F1 of class 3 from the masked predictions: tp 2, predicted 3, actual 2
    assert v["f1"] == pytest.approx(2 * 2 / (3 + 2))
    # masked AUC: scores p(3 | {2, 3}) = sigmoid(l3 - l2): bag0 -1, bag1 1, bag2 2, bag3 4
    assert v["auc_masked"] == pytest.approx(1.0)  # 3's bags (2, 4) vs 2's (-1, 1): all above
    # a task whose classes the head does not have yet is not scored
    assert math.isnan(bag_values([torch.zeros(2)], [2], (2, 3))["accuracy"])


def test_digit_bags_key_instances_are_the_key_digit_and_test_scans_are_unseen():
    cfg = DigitBagsConfig(train_bags_per_class=6, test_bags_per_class=3)
    scenario = digit_bags(cfg)
    stream = scenario.stream
    digits = load_digits()
    images = (digits.images.reshape(-1, 64) / 16.0).astype(np.float32)
    label_of = {img.tobytes(): int(d) for img, d in zip(images, digits.target, strict=True)}
    assert scenario.kind == "mil" and scenario.classes_per_experience == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
    ]
    keys_by_class: dict[int, set[int]] = {}
    fillers: set[int] = set()
    seen: dict[str, set[bytes]] = {"train": set(), "test": set()}
    for split, tasks in (("train", stream.train), ("test", stream.test)):
        for bags in tasks:
            for i in range(len(bags)):
                x, y = bags[i]
                lab = bags.instance_labels(i)
                assert 8 <= len(x) <= 24 and 1 <= int(lab.sum()) <= 4
                assert bags.coords(i).shape == (len(x), 2)
                for row, is_key in zip(x.numpy(), lab.tolist(), strict=True):
                    digit = label_of[row.tobytes()]  # a real scan, unchanged
                    seen[split].add(row.tobytes())
                    if is_key:
                        keys_by_class.setdefault(y, set()).add(digit)
                    else:
                        fillers.add(digit)
    # one key digit per class, eight distinct ones, never used as fillers
    assert all(len(v) == 1 for v in keys_by_class.values()) and len(keys_by_class) == 8
    key_digits = {d for v in keys_by_class.values() for d in v}
    assert len(key_digits) == 8 and not key_digits & fillers and len(fillers) == 2
    assert not seen["train"] & seen["test"]


def test_binary_setting_has_negative_bags_without_keys():
    scenario = digit_bags(DigitBagsConfig(setting="binary", n_tasks=3, train_bags_per_class=4,
                                          test_bags_per_class=2))  # fmt: skip
    assert scenario.classes_per_experience == [[0, 1]] * 3
    assert scenario.name == "digit_bags_binary"  # its own board
    for bags in scenario.stream.train:
        for i in range(len(bags)):
            assert (int(bags.instance_labels(i).sum()) > 0) == (bags.targets[i] == 1)


def test_a_mil_run_is_recorded_with_its_matrices_and_plots(tmp_path):
    assert run_cli(["run", *QUICK, "tracking=none", f"runs_dir={tmp_path}"]) == 0
    run = only_run_dir(tmp_path)
    r = results_of(run)
    assert r["kind"] == "mil" and r["setting"] == "new_classes"
    assert len(r["task_names"]) == 4 and r["task_classes"][1] == [2, 3]
    acc = r["matrices"]["accuracy"]
    assert len(acc) == 4 and all(len(row) == 4 for row in acc)
    # the growing head has no unit for a future task's classes: not scored
    assert acc[0][1] is None and acc[0][0] is not None
    assert r["metrics"]["final_accuracy"] == pytest.approx(np.mean(acc[-1]))
    assert r["metrics"]["final_instance_auc"] is not None
    assert r["efficiency"]["train_steps"] == 4 * 2 * 16  # tasks x epochs x bags (one per step)
    for name in ("accuracy_matrix.png", "bag_accuracy.png", "attention_maps.png"):
        assert (run / name).is_file()
    examples = json.loads((run / "attention_examples.json").read_text())
    assert len(examples) == 8 and all(len(e["attention"]) == len(e["coords"]) for e in examples)


@pytest.mark.parametrize("strategy", ["lora", "tent", "gs_lora"])
def test_a_strategy_of_another_kind_is_refused(tmp_path, capsys, strategy):
    args = ["run", "scenario=digit_bags", f"strategy={strategy}", "tracking=none",
            "progress=false", f"runs_dir={tmp_path}"]  # fmt: skip
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not support 'mil' scenarios" in err[0], err


def test_a_bag_batch_is_one_bag(tmp_path, capsys):
    args = ["run", *QUICK, "strategy.batch_size=4", "tracking=none", f"runs_dir={tmp_path}"]
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "strategy.batch_size=1" in err[0], err


def test_same_seed_same_metrics_other_seed_other_metrics(tmp_path):
    records = []
    for i, seed in enumerate((3, 3, 4)):
        out = tmp_path / str(i)
        assert run_cli(["run", *QUICK, "tracking=none", f"seed={seed}", f"runs_dir={out}"]) == 0
        records.append(results_of(only_run_dir(out)))
    assert records[0]["matrices"] == records[1]["matrices"]
    assert records[0]["matrices"] != records[2]["matrices"]
