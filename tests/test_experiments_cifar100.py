"""The paper configurations on Split CIFAR-100 (conf/experiment/*_cifar100.yaml): each
composes with the papers' settings intact and runs, shrunk, on a CIFAR-100 fixture in
torchvision's layout; every class-incremental strategy has its configurations; and
benchmarks/summarize_runs.py --papers prints the runs beside the published numbers."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from experiment_runs import EXCLUDED, EXPERIMENTS, check_composes, check_smoke_run, names
from test_image_scenarios import write_cifar100

NAMES = names("cifar100")
SUMMARIZE = Path(__file__).resolve().parents[1] / "benchmarks" / "summarize_runs.py"


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """100 classes, 1 training and 1 test image each."""
    return write_cifar100(tmp_path_factory.mktemp("cifar"), n_train=1)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experiment_runs")


def test_every_class_incremental_strategy_has_both_experiments():
    from clbench.registry import STRATEGIES

    kinds = {e.name: e.scenario_kind for e in STRATEGIES}
    expected = {n for n, kind in kinds.items() if kind == "class_incremental"} - set(EXCLUDED)
    assert set(EXCLUDED) <= set(kinds)  # an exclusion names a registered strategy
    for benchmark in ("cifar100", "imagenet_r"):
        have = {n.removesuffix(f"_{benchmark}") for n in names(benchmark)}
        assert have == expected, benchmark
    assert len(list(EXPERIMENTS.glob("*.yaml"))) == 2 * len(expected)


def test_unknown_or_unprefixed_experiment_is_one_line(capsys):
    from helpers import run_cli

    assert run_cli(["run", "+experiment=inflora_cifar10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown experiment 'inflora_cifar10'; ")
    assert "inflora_cifar100" in err[0] and "sdlora_imagenet_r" in err[0]
    assert run_cli(["run", "experiment=inflora_cifar100"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: 'experiment=inflora_cifar100': an experiment is added with a leading +, "
        "e.g. +experiment=inflora_cifar100"
    )


@pytest.mark.parametrize("name", NAMES)
def test_composes_with_the_paper_settings(name, cifar_root):
    check_composes(name, cifar_root)


@pytest.mark.parametrize("name", NAMES)
def test_runs_on_a_fixture(name, cifar_root, runs_dir):
    check_smoke_run(name, cifar_root, 100, runs_dir)


def summarize(*args: str) -> str:
    """benchmarks/summarize_runs.py ARGS in-process; returns what it exits with."""
    argv = sys.argv
    sys.argv = [str(SUMMARIZE), *args]
    try:
        runpy.run_path(str(SUMMARIZE), run_name="__main__")
    except SystemExit as e:
        return str(e.code)
    finally:
        sys.argv = argv
    return ""


def test_summarize_prints_ours_beside_the_published_numbers(cifar_root, runs_dir, capsys):
    ran = {}
    for name in ("inflora_cifar100", "finetune_cifar100"):
        found = list((runs_dir / name).rglob("results.json"))  # made by test_runs_on_a_fixture
        ran[name] = (
            json.loads(found[0].read_text())
            if found
            else check_smoke_run(name, cifar_root, 100, runs_dir)  # this test alone (-k)
        )
    capsys.readouterr()
    roots = [str(runs_dir / "inflora_cifar100"), str(runs_dir / "finetune_cifar100")]
    assert summarize(*roots, "--papers") == ""
    out = capsys.readouterr().out
    table = out[out.index("beside the published numbers") :].splitlines()
    inflora = ran["inflora_cifar100"]["metrics"]
    ours_last = 100 * inflora["final_accuracy"]
    ours_bar = 100 * inflora["average_incremental_accuracy"]
    backbone = ran["inflora_cifar100"]["backbone"]
    rows = [r for r in table if r.startswith(f"| split_cifar100 | {backbone} | inflora |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[3] == "1" and cells[4] == f"{ours_last:.3f} ± 0.000"
    assert cells[6:9] == [
        f"86.50 ({ours_last - 86.5:+.2f})",
        f"91.70 ({ours_bar - 91.7:+.2f})",
        "paper",
    ]
    # the official log's numbers on the next row, under the same run
    log_row = table[table.index(rows[0]) + 1]
    log_cells = [c.strip() for c in log_row.strip("|").split("|")]
    assert log_cells[:6] == [""] * 6 and log_cells[8] == "official log"
    assert log_cells[6] == f"86.95 ({ours_last - 86.95:+.2f})"
    assert "no published number for: split_cifar100/finetune" in out


def test_summarize_refuses_a_bad_papers_file(tmp_path):
    bad = tmp_path / "papers.json"
    bad.write_text('{"split_cifar100": {"inflora": [{"A_last": 1}]}}')
    assert summarize(str(tmp_path), f"--papers={bad}") == (
        f"error: {bad}: split_cifar100.inflora: a reference lacks kind, A_bar, source"
    )
    bad.write_text("{")
    assert summarize(str(tmp_path), f"--papers={bad}").startswith(f"error: {bad}: not JSON")
