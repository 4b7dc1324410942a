"""Boards do not pool different configurations: one entry per (scenario, strategy,
backbone, configuration), labelled with what tells it from the others; bookkeeping keys
do not split an entry; committed boards still render from their JSON."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from test_reliability_boards import EVIL, _check_html, _check_markdown

from clbench.config import compose, to_container
from clbench.leaderboard import (
    BOOKKEEPING_KEYS,
    TrackedRun,
    build_boards,
    config_labels,
    publish,
    render_html,
    render_markdown,
    run_configuration,
)
from clbench.record import RunRecord

BOARDS = Path(__file__).resolve().parents[1] / "leaderboards"


@pytest.fixture(scope="module")
def lora_config() -> dict:
    """The resolved configuration of ``clbench run strategy=lora`` (as results.json holds it)."""
    return to_container(compose(["strategy=lora"]))


def _config(base: dict, *overrides: str) -> dict:
    """``base`` with ``a.b=value`` overrides applied (values parsed as JSON when they can be)."""
    config = copy.deepcopy(base)
    for o in overrides:
        key, value = o.split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        try:
            node[leaf] = json.loads(value)
        except json.JSONDecodeError:
            node[leaf] = value
    return config


def _run(config: dict, seed: int, final: float, start: int, run_id: str = "") -> TrackedRun:
    config = _config(config, f"seed={seed}")
    record = RunRecord(
        clbench_version="0.1.0",
        run_name=f"{config['strategy']['name']}_s{seed}_{start}",
        run_dir=f"/runs/{start}",
        scenario=config["scenario"]["name"],
        kind="class_incremental",
        strategy=config["strategy"]["name"],
        backbone=config["backbone"]["name"],
        seed=seed,
        uses_task_id=False,
        config=config,
        class_names=[str(c) for c in range(10)],
        tags={"git_commit": "abc", "clbench_version": "0.1.0", "hardware": "cpu"},
        metrics={"final_accuracy": final, "forgetting": 0.1, "forgetting_incl_final": 0.2},
        steps=[{"accuracy_seen": 0.9}, {"accuracy_seen": final}],
        efficiency={"trainable_params": 10, "seconds_per_step": 0.01},
        fields={"accuracy_matrix": [[0.9, 0.0], [0.5, 0.8]]},
    )
    return TrackedRun(run_id or f"id{start}", start, record)


def _two_lrs(lora_config: dict) -> list[TrackedRun]:
    """lora at its shipped lr (seeds 0-2) and at lr=0.01 (seeds 0, 1)."""
    default = [_run(lora_config, s, 0.8 + s / 100, start=s) for s in (0, 1, 2)]
    fast = _config(lora_config, "strategy.lr=0.01")
    return default + [_run(fast, s, 0.5 + s / 10, start=10 + s) for s in (0, 1)]


def test_two_learning_rates_are_two_labelled_entries_with_their_own_seeds(lora_config, tmp_path):
    board = build_boards(_two_lrs(lora_config))["split_digits"]
    entries = {e["config_label"]: e for e in board["entries"]}
    assert set(entries) == {"strategy.lr=0.0003", "strategy.lr=0.01"}
    default, fast = entries["strategy.lr=0.0003"], entries["strategy.lr=0.01"]
    assert default["seeds"] == [0, 1, 2] and default["n"] == 3
    assert default["metrics"]["final_accuracy"]["mean"] == pytest.approx(0.81)
    assert fast["seeds"] == [0, 1] and fast["n"] == 2
    assert fast["metrics"]["final_accuracy"]["mean"] == pytest.approx(0.55)
    assert [e["rank"] for e in board["entries"]] == [1, 2]
    assert default["config_id"] != fast["config_id"]
    md = render_markdown(board)
    assert "| 1 | lora \\(strategy.lr=0.0003\\) | micro\\_vit |" in md
    assert "| 2 | lora \\(strategy.lr=0.01\\) | micro\\_vit |" in md
    assert "- lora \\(strategy.lr=0.01\\) / micro\\_vit: seeds 0, 1;" in md
    page = render_html({"split_digits": board})
    assert '<td class="s">lora (strategy.lr=0.01)</td>' in page
    # both forgetting conventions side by side, labelled
    head = next(line for line in md.splitlines() if line.startswith("| rank"))
    assert "| forgetting (max excl. final row) | forgetting (max incl. final row: PILOT, " in head


def test_bookkeeping_keys_do_not_split_an_entry(lora_config):
    assert set(BOOKKEEPING_KEYS) >= {"seed", "runs_dir", "progress", "device", "checkpoint"}
    bookkeeping = ["runs_dir=/elsewhere", "progress=false", "device=cuda", "checkpoint=false"]
    bookkeeping += ["tracking.uri=http://mlflow:5000", "tracking.experiment=x"]
    runs = [
        _run(lora_config, 0, 0.8, start=0),
        _run(_config(lora_config, *bookkeeping), 1, 0.9, start=1),
    ]
    (entry,) = build_boards(runs)["split_digits"]["entries"]
    assert entry["seeds"] == [0, 1] and entry["config_label"] == ""
    flat = run_configuration(lora_config)
    assert "strategy.lr" in flat and "backbone.pretrained" in flat
    assert not [k for k in flat if k.split(".")[0] in BOOKKEEPING_KEYS]


def test_a_record_from_before_a_later_key_counts_as_its_default(lora_config):
    """Runs published before ``precision`` / ``deterministic`` existed share the entry of
    new runs with the defaults; another precision is its own labelled entry."""
    old = {k: v for k, v in lora_config.items() if k not in ("precision", "deterministic")}
    runs = [
        _run(old, 0, 0.8, start=0),
        _run(_config(lora_config, "threads=1", "scenario.num_workers=3"), 1, 0.9, start=1),
        _run(_config(lora_config, "precision=bf16"), 2, 0.7, start=2),
    ]
    entries = build_boards(runs)["split_digits"]["entries"]
    by_label = {e["config_label"]: e["seeds"] for e in entries}
    assert by_label == {"precision=fp32": [0, 1], "precision=bf16": [2]}


def test_the_latest_run_per_seed_counts_within_its_group(lora_config):
    runs = _two_lrs(lora_config)
    fast = _config(lora_config, "strategy.lr=0.01")
    runs.append(_run(fast, 0, 0.1, start=99))  # a later lr=0.01 seed 0 replaces the first
    board = build_boards(runs)["split_digits"]
    entries = {e["config_label"]: e for e in board["entries"]}
    assert entries["strategy.lr=0.01"]["seeds"] == [0, 1]
    assert entries["strategy.lr=0.01"]["metrics"]["final_accuracy"]["mean"] == pytest.approx(0.35)
    assert entries["strategy.lr=0.0003"]["metrics"]["final_accuracy"]["mean"] == pytest.approx(0.81)


def test_labels_name_every_differing_key_and_other_strategies_stay_unlabelled(lora_config):
    finetune = to_container(compose(["strategy=finetune"]))
    runs = _two_lrs(lora_config)
    runs.append(_run(_config(lora_config, "strategy.lr=0.01", "strategy.rank=4"), 0, 0.6, 20))
    runs.append(_run(finetune, 0, 0.2, start=30))
    board = build_boards(runs)["split_digits"]
    labels = sorted(e["config_label"] for e in board["entries"])
    assert labels == [
        "",
        "strategy.lr=0.0003, strategy.rank=8",
        "strategy.lr=0.01, strategy.rank=4",
        "strategy.lr=0.01, strategy.rank=8",
    ]
    assert next(e for e in board["entries"] if e["strategy"] == "finetune")["config_label"] == ""
    a, b = {"s.t": ["qkv", "proj"], "s.x": True}, {"s.t": ["qkv"]}
    assert config_labels({"a": a, "b": b}) == {
        "a": "s.t=[qkv,proj], s.x=true",
        "b": "s.t=[qkv], s.x unset",
    }
    assert config_labels({"a": {"k": "1"}, "b": {"k": 1}}) == {
        "a": "k=1, config a",
        "b": "k=1, config b",
    }


def test_grouped_boards_are_deterministic_and_escape_config_values(lora_config, tmp_path):
    runs = _two_lrs(lora_config)
    runs.append(_run(_config(lora_config, f"strategy.note={EVIL}"), 0, 0.7, start=40))
    written = publish(runs, tmp_path / "a")
    again = publish(list(reversed(runs)), tmp_path / "b")
    for x, y in zip(written, again, strict=True):
        assert x.read_bytes() == y.read_bytes(), x.name
    board = json.loads((tmp_path / "a" / "split_digits.json").read_text(encoding="utf-8"))
    labels = {e["config_label"] for e in board["entries"]}
    assert f"strategy.lr=0.0003, strategy.note={EVIL}" in labels  # exact in the JSON
    _check_markdown((tmp_path / "a" / "split_digits.md").read_text(encoding="utf-8"), _named(board))
    _check_html((tmp_path / "a" / "index.html").read_text(encoding="utf-8"), [_named(board)])


def _named(board: dict) -> dict:
    """The board with each entry's strategy as its cell shows it (name and config label)."""
    out = copy.deepcopy(board)
    for e in out["entries"]:
        if e["config_label"]:
            e["strategy"] = f"{e['strategy']} ({e['config_label']})"
    return out


def test_committed_boards_render_from_their_json():
    """The committed boards' Markdown is exactly what their JSON renders to."""
    names = sorted(p.stem for p in BOARDS.glob("*.json"))
    assert {"split_digits", "digits_c"} <= set(names)
    boards = {n: json.loads((BOARDS / f"{n}.json").read_text()) for n in names}
    for n, board in boards.items():
        assert render_markdown(board) == (BOARDS / f"{n}.md").read_text(), n
    assert render_html(boards).count('<tr class="entry">') == sum(
        len(b["entries"]) for b in boards.values()
    )
