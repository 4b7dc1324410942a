"""The command line: the main job's outputs, overrides, sweeps and one-line errors."""

from __future__ import annotations

import json

import pytest

from helpers import FAST, only_run_dir, results_of, run_cli


def test_run_writes_run_directory(tmp_path, capsys):
    code = run_cli(["run", *FAST, f"runs_dir={tmp_path}", "progress=true"])
    out = capsys.readouterr().out
    assert code == 0
    run_dir = only_run_dir(tmp_path)
    assert out.strip().splitlines()[-1] == f"run directory: {run_dir}"
    assert "accuracy matrix" in out
    res = results_of(run_dir)
    assert len(res["accuracy_matrix"]) == 2 and len(res["accuracy_matrix"][0]) == 2
    for key in ("final_accuracy", "average_incremental_accuracy", "forgetting", "bwt"):
        assert isinstance(res["metrics"][key], float)
    assert res["metrics"]["fwt"] is None  # growing head: not available (docs/protocols.md)
    assert f"{'fwt':>30}: n/a" in out
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "accuracy_matrix.png").stat().st_size > 1000
    assert res["efficiency"]["trainable_params"] > 0


def test_overrides_reach_the_run(tmp_path):
    code = run_cli(
        [
            "run",
            *FAST,
            f"runs_dir={tmp_path}",
            "strategy=finetune",
            "scenario=split_digits",
            "seed=3",
            "strategy.lr=0.01",
        ]
    )
    assert code == 0
    res = results_of(only_run_dir(tmp_path))
    assert res["strategy"] == "finetune" and res["seed"] == 3
    assert res["config"]["strategy"]["lr"] == 0.01


def test_multirun_runs_every_job(tmp_path):
    code = run_cli(
        ["run", "-m", *FAST, f"runs_dir={tmp_path}", "strategy=finetune,lora", "seed=0,1"]
    )
    assert code == 0
    runs = sorted(p.parent for p in tmp_path.rglob("results.json"))
    assert len(runs) == 4
    jobs = {(results_of(r)["strategy"], results_of(r)["seed"]) for r in runs}
    assert jobs == {("finetune", 0), ("finetune", 1), ("lora", 0), ("lora", 1)}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("strategy=nope", "unknown strategy 'nope'; valid choices: "),
        ("scenario=nope", "unknown scenario 'nope'; valid choices: "),
        ("backbone=nope", "unknown backbone 'nope'; valid choices: "),
        ("strategy.lrr=0.1", "unknown key 'strategy.lrr'; valid keys: "),
        ("strategy.lr=abc", "invalid value for strategy.lr: 'abc'; expected float"),
        ("device=tpu", "invalid value for device: 'tpu'; valid choices"),
        ("strategy.lr=-1", "invalid value for strategy.lr: -1.0; must be > 0"),
        ("strategy.optimizer=rmsprop", "invalid value for strategy.optimizer: 'rmsprop'; valid"),
        ("scenario.n_experiences=3", "invalid value for scenario.n_experiences: 3"),
        ("seed=abc", "invalid value for seed: 'abc'; expected integer"),
        ("tracking.enabled=maybe", "tracking.enabled: 'maybe'; expected a boolean"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, override, expected):
    code = run_cli(["run", *FAST, f"runs_dir={tmp_path}", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and expected in err[0], err[0]
    assert "Traceback" not in err[0]
    assert not list(tmp_path.rglob("results.json"))


def test_valid_choices_are_listed(capsys):
    assert run_cli(["run", "strategy=nope"]) == 2
    line = capsys.readouterr().err
    for name in ("finetune", "joint", "linear_probe", "lora"):
        assert name in line


def test_bad_sweep_value_is_caught_before_any_job(tmp_path, capsys):
    code = run_cli(["run", "-m", *FAST, f"runs_dir={tmp_path}", "strategy=finetune,nope"])
    assert code == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    assert not list(tmp_path.rglob("results.json"))


def test_unknown_command(capsys):
    assert run_cli(["fly"]) == 2
    assert "valid commands: run, list, pretrain" in capsys.readouterr().err


def test_list_names_every_kind(capsys):
    assert run_cli(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    kinds = {line.split()[0] for line in out}
    assert kinds == {"strategy", "scenario", "backbone", "kind"}
    names = {line.split()[1] for line in out}
    assert {"finetune", "linear_probe", "joint", "lora", "split_digits", "micro_vit"} <= names


def test_results_json_is_strict_json(tmp_path):
    assert run_cli(["run", *FAST, f"runs_dir={tmp_path}"]) == 0
    text = (only_run_dir(tmp_path) / "results.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_multirun_with_cfg_is_one_line(capsys):
    assert run_cli(["run", "-m", "strategy=lora", "--cfg", "hydra"]) == 2
    assert "cannot be combined" in capsys.readouterr().err
