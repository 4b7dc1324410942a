"""``clbench leaderboard publish --merge`` and ``clbench leaderboard render``: a board grows by
new runs without its old ones (whose store may be gone), the index lists every board of the
folder, the committed boards render from their JSON byte for byte, and a bad folder is one
error line that writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import clbench.leaderboard
from clbench.errors import ClbenchError
from clbench.leaderboard import TrackedRun, publish
from clbench.record import RunRecord
from helpers import run_cli

BOARDS = Path(__file__).resolve().parents[1] / "leaderboards"
OLD, NEW = "old1111", "new2222"  # the git commits of the old and the new runs


def _run(
    strategy: str,
    backbone: str,
    final: float,
    start: int,
    commit: str,
    seed: int = 0,
    lr: float = 0.01,
    scenario: str = "split_digits",
) -> TrackedRun:
    """A finished class-incremental run whose final accuracy is ``final``."""
    config = {
        "scenario": {"name": scenario},
        "strategy": {"name": strategy, "lr": lr},
        "backbone": {"name": backbone},
        "seed": seed,
    }
    record = RunRecord(
        clbench_version="0.1.0",
        run_name=f"{strategy}-s{seed}-{start}",
        run_dir=f"/runs/{start}",
        scenario=scenario,
        kind="class_incremental",
        strategy=strategy,
        backbone=backbone,
        seed=seed,
        uses_task_id=False,
        config=config,
        class_names=[str(c) for c in range(4)],
        tags={"git_commit": commit, "clbench_version": "0.1.0", "hardware": "cpu"},
        metrics={"final_accuracy": final, "forgetting": 0.1, "forgetting_incl_final": 0.2},
        steps=[{"accuracy_seen": 0.9}, {"accuracy_seen": final}],
        efficiency={"trainable_params": 10, "train_seconds": 1.0},
        fields={"accuracy_matrix": [[0.9, 0.0], [0.5, final]]},
    )
    return TrackedRun(f"{commit}-{start}", start, record)


def _old_runs() -> list[TrackedRun]:
    """The runs of a store that is gone: ranked lora/micro_vit 0.70, finetune 0.52 (two
    seeds), lora/wrn 0.40, ewc lr=0.1 0.35, ewc lr=0.01 0.30."""
    return [
        _run("finetune", "wrn_16_2", 0.50, 1, OLD, seed=0),
        _run("finetune", "wrn_16_2", 0.54, 2, OLD, seed=1),
        _run("lora", "micro_vit", 0.70, 3, OLD),
        _run("lora", "wrn_16_2", 0.40, 4, OLD),
        _run("ewc", "wrn_16_2", 0.30, 5, OLD, lr=0.01),
        _run("ewc", "wrn_16_2", 0.35, 6, OLD, lr=0.1),
    ]


def _new_runs() -> list[TrackedRun]:
    """New runs: lora/micro_vit and ewc/wrn again (one configuration), replay for the
    first time."""
    return [
        _run("lora", "micro_vit", 0.20, 101, NEW),
        _run("replay", "wrn_16_2", 0.90, 102, NEW),
        _run("ewc", "wrn_16_2", 0.60, 103, NEW, lr=0.01),
    ]


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _without_rank(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "rank"}


def test_merge_keeps_absent_pairs_replaces_present_ones_and_ranks_again(tmp_path):
    out = tmp_path / "boards"
    publish(_old_runs(), out)
    entries = _read(out / "split_digits.json")["entries"]
    old = {(e["strategy"], e["backbone"], e["config_label"]): e for e in entries}
    assert [(e["strategy"], e["backbone"], e["rank"]) for e in entries] == [
        ("lora", "micro_vit", 1),
        ("finetune", "wrn_16_2", 2),
        ("lora", "wrn_16_2", 3),
        ("ewc", "wrn_16_2", 4),
        ("ewc", "wrn_16_2", 5),
    ]

    written = publish(_new_runs(), out, merge=True)
    assert [p.name for p in written] == ["split_digits.json", "split_digits.md", "index.html"]
    board = _read(out / "split_digits.json")
    got = [(e["strategy"], e["backbone"], e["rank"]) for e in board["entries"]]
    assert got == [
        ("replay", "wrn_16_2", 1),  # 0.90, new
        ("ewc", "wrn_16_2", 2),  # 0.60, new: replaces both old ewc configurations
        ("finetune", "wrn_16_2", 3),  # 0.52, kept (was rank 2)
        ("lora", "wrn_16_2", 4),  # 0.40, kept (was rank 3): another backbone than the new lora
        ("lora", "micro_vit", 5),  # 0.20, new: replaces the old 0.70
    ]
    entries = {(e["strategy"], e["backbone"]): e for e in board["entries"]}
    for pair in [("finetune", "wrn_16_2"), ("lora", "wrn_16_2")]:  # kept exactly as they were
        assert _without_rank(entries[pair]) == _without_rank(old[(*pair, "")])
    finetune = entries[("finetune", "wrn_16_2")]
    assert finetune["metrics"]["final_accuracy"]["mean"] == pytest.approx(0.52)
    assert finetune["provenance"]["git_commits"] == [OLD]
    assert [r["run_id"] for r in finetune["provenance"]["runs"]] == [f"{OLD}-1", f"{OLD}-2"]
    lora = entries[("lora", "micro_vit")]
    assert lora["metrics"]["final_accuracy"]["mean"] == pytest.approx(0.20)
    assert lora["provenance"]["git_commits"] == [NEW] and lora["seeds"] == [0]
    ewc = entries[("ewc", "wrn_16_2")]
    assert ewc["config_label"] == "" and ewc["curve"] == [0.9, 0.6]
    text = (out / "split_digits.json").read_text(encoding="utf-8")
    for replaced in (3, 5, 6):  # the old lora/micro_vit and both old ewc runs are gone
        assert f'"{OLD}-{replaced}"' not in text

    md = (out / "split_digits.md").read_text(encoding="utf-8")
    assert "| 1 | replay | wrn\\_16\\_2 | 0.900 ± 0.000 |" in md
    assert "| 3 | finetune | wrn\\_16\\_2 | 0.520 ± 0.028 |" in md
    assert "| 5 | lora | micro\\_vit | 0.200 ± 0.000 |" in md
    # provenance per entry: each names its own runs and commit
    prov = {line.split(" / ")[0]: line for line in md.splitlines() if line.startswith("- ")}
    assert (
        f"runs finetune-s0-1 (`{OLD}-1`), finetune-s1-2 (`{OLD}-2`); git {OLD};"
        in (prov["- finetune"])
    )
    assert f"runs replay-s0-102 (`{NEW}-102`); git {NEW};" in prov["- replay"]
    assert md.count(f"git {OLD};") == 2 and md.count(f"git {NEW};") == 3
    page = (out / "index.html").read_text(encoding="utf-8")
    assert page.count('<tr class="entry">') == 5

    # merging the same runs again changes nothing
    before = _snapshot(out)
    publish(_new_runs(), out, merge=True)
    assert _snapshot(out) == before
    # without --merge the board is the new runs' only, as before
    publish(_new_runs(), out)
    assert {e["strategy"] for e in _read(out / "split_digits.json")["entries"]} == {
        "lora",
        "replay",
        "ewc",
    }


def test_merge_into_a_folder_without_that_board_is_a_plain_publish(tmp_path):
    publish(_new_runs(), tmp_path / "plain")
    publish(_new_runs(), tmp_path / "merged", merge=True)
    assert _snapshot(tmp_path / "plain") == _snapshot(tmp_path / "merged")


def test_index_lists_the_boards_already_in_the_folder(tmp_path):
    out = tmp_path / "boards"
    shutil.copytree(BOARDS, out)
    committed = _snapshot(out)
    scenarios = sorted(_read(p)["scenario"] for p in BOARDS.glob("*.json"))
    n_committed = sum(len(_read(p)["entries"]) for p in BOARDS.glob("*.json"))
    assert len(scenarios) >= 5

    runs = [_run("replay", "wrn_16_2", 0.8, 1, NEW, scenario="split_letters")]
    runs.append(_run("finetune", "wrn_16_2", 0.3, 2, NEW, scenario="split_letters"))
    written = publish(runs, out)
    assert [p.name for p in written] == ["split_letters.json", "split_letters.md", "index.html"]
    page = (out / "index.html").read_text(encoding="utf-8")
    for scenario in [*scenarios, "split_letters"]:
        assert f'<section class="board" id="{scenario}">' in page
    assert page.count('<tr class="entry">') == n_committed + 2
    after = _snapshot(out)
    for name, data in committed.items():  # the other boards themselves are untouched
        if name != "index.html":
            assert after[name] == data, name


def test_render_reproduces_the_committed_boards_byte_for_byte(tmp_path, capsys):
    out = tmp_path / "boards"
    out.mkdir()
    names = sorted(p.stem for p in BOARDS.glob("*.json"))
    assert {"split_digits", "digits_c"} <= set(names)
    for n in names:
        shutil.copy(BOARDS / f"{n}.json", out)
    assert run_cli(["leaderboard", "render", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [str(out / f"{n}.md") for n in names] + [str(out / "index.html")]
    for n in names:
        assert (out / f"{n}.md").read_bytes() == (BOARDS / f"{n}.md").read_bytes(), n
    assert (out / "index.html").read_bytes() == (BOARDS / "index.html").read_bytes()
    assert (out / "split_digits.json").read_bytes() == (BOARDS / "split_digits.json").read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "{tmp}/absent"], "no leaderboard folder"),
        (["--out", "{tmp}"], "no board JSON in"),
        (["--out", "{tmp}", "--merge"], "--merge: only for publish"),
        (["--tracking-uri", "sqlite:///x.db"], "--tracking-uri: only for publish"),
    ],
)
def test_render_errors_are_one_line(tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert run_cli(["leaderboard", "render", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "index.html").exists()


def _board_of(kind_file: str) -> str:
    """A committed board of another scenario, renamed to split_digits."""
    board = _read(BOARDS / kind_file)
    board["scenario"] = "split_digits"
    return json.dumps(board)


def _entry_without_metrics() -> str:
    board = _read(BOARDS / "split_digits.json")
    del board["entries"][0]["metrics"]
    return json.dumps(board)


BROKEN = {  # name: (file, content, what the error says)
    "not_json": ("split_digits.json", "{ nope", "not a board JSON (invalid JSON"),
    "not_an_object": ("split_digits.json", "[1, 2]", "a JSON object is expected"),
    "not_a_board": ("split_digits.json", '{"a": 1}', "no 'scenario'"),
    "entry_incomplete": ("split_digits.json", _entry_without_metrics(), "entry 1 has no 'metrics'"),
    "other_kind": ("split_digits.json", _board_of("digits_c.json"), "are of kind 'test_time'"),
    "misnamed_copy": (
        "old.json",
        _board_of("split_digits.json"),
        "whose file is split_digits.json",
    ),
    "other_not_a_board": ("notes.json", '{"a": 1}', "every *.json of a leaderboard folder"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_merge_errors_are_one_line_and_leave_the_folder_unchanged(tmp_path, case):
    out = tmp_path / "boards"
    publish(_old_runs(), out)
    name, content, message = BROKEN[case]
    (out / name).write_text(content, encoding="utf-8")
    before = _snapshot(out)
    with pytest.raises(ClbenchError) as info:
        publish(_new_runs(), out, merge=True)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(out / name)) and message in text, text
    assert _snapshot(out) == before


def test_a_bad_other_board_stops_a_plain_publish_too_but_its_own_old_board_does_not(tmp_path):
    out = tmp_path / "boards"
    out.mkdir()
    (out / "split_digits.json").write_text("{ nope", encoding="utf-8")  # replaced: not read
    publish(_new_runs(), out)
    assert len(_read(out / "split_digits.json")["entries"]) == 3
    (out / "notes.json").write_text("{ nope", encoding="utf-8")
    before = _snapshot(out)
    with pytest.raises(ClbenchError, match=r"notes\.json: not a board JSON"):
        publish(_new_runs(), out)
    assert _snapshot(out) == before


def test_publish_merge_cli(tmp_path, capsys, monkeypatch):
    out = tmp_path / "boards"
    publish(_old_runs(), out)
    monkeypatch.setattr(clbench.leaderboard, "read_runs", lambda uri, experiment: _new_runs())
    assert run_cli(["leaderboard", "publish", "--out", str(out), "--merge"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [str(out / n) for n in ("split_digits.json", "split_digits.md", "index.html")]
    assert len(_read(out / "split_digits.json")["entries"]) == 5
    (out / "split_digits.json").write_text(_board_of("digits_c.json"), encoding="utf-8")
    before = _snapshot(out)
    assert run_cli(["leaderboard", "publish", "--out", str(out), "--merge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "cannot merge" in err
    assert _snapshot(out) == before
