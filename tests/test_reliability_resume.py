"""Kill-and-resume for every registered class-incremental strategy.

A run is snapshotted right after its checkpoint of experience 2 of 5 (its run directory
as a SIGKILL at that moment would leave it) and goes on to the end; the snapshot is then
resumed from its data-only checkpoint (rebuilt from the config, nothing unpickled) and
must end with the uninterrupted run's accuracy matrices and metrics. The real SIGKILL
of a subprocess is tests/test_resume.py's.
"""

from __future__ import annotations

import json

import pytest

from helpers import results_of, run_cli, snapshot_after

ARGS = [
    "backbone.pretrained=none",
    "scenario.n_experiences=5",
    "strategy.epochs=1",
    "tracking=none",
    "progress=false",
]

#: small settings that keep every strategy's state non-trivial and the test quick
EXTRA = {
    "moe_adapters": ["strategy.experts=4", "strategy.ae_steps=10"],
    "lora": ["strategy.merge_after_task=true"],
    # SparCL masks a CNN's convolutions but its stem: a small WideResNet (random init)
    "sparcl": ["backbone=wrn_16_2", "backbone.depth=10", "backbone.widen_factor=1"],
}


def class_incremental_strategies() -> list[str]:
    from clbench.strategies.base import CLStrategy

    from clbench.registry import STRATEGIES

    return sorted(
        n
        for n in STRATEGIES.names()
        if issubclass(STRATEGIES.get(n), CLStrategy)
        and STRATEGIES.get(n).kind == "class_incremental"
    )


#: (strategy, its extra overrides): every registered strategy, plus recipes with other state
CASES = [(name, EXTRA.get(name, [])) for name in class_incremental_strategies()] + [
    ("moe_adapters", ["strategy.recipe=mtil", "strategy.experts=4", "strategy.ae_steps=10"]),
]


@pytest.mark.parametrize(("strategy", "extra"), CASES)
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, strategy, extra):
    from clbench.protocols import class_incremental as ci

    snapshot = tmp_path / "killed"
    other_backbone = any(e.startswith("backbone=") for e in extra)
    args = [a for a in ARGS if not (other_backbone and a.startswith("backbone."))]
    run = ["run", *args, f"strategy={strategy}", *extra]
    with snapshot_after(2, snapshot):
        assert run_cli([*run, f"runs_dir={tmp_path / 'straight'}"]) == 0
    (straight,) = (tmp_path / "straight").iterdir()
    expected = results_of(straight)

    assert not (snapshot / "results.json").exists()
    assert json.loads((snapshot / ci.CHECKPOINT_INFO).read_text())["experiences_done"] == 2
    raw = (snapshot / ci.CHECKPOINT).read_bytes()  # safetensors: u64 header size, JSON header
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert json.loads(header["__metadata__"]["tree"])["experiences_done"] == 2

    assert run_cli(["resume", str(snapshot)]) == 0
    resumed = results_of(snapshot)
    assert resumed["resumed_after_experience"] == 2
    assert resumed["accuracy_matrix"] == expected["accuracy_matrix"]
    assert resumed["accuracy_matrix_task_aware"] == expected["accuracy_matrix_task_aware"]
    assert json.dumps(resumed["metrics"]) == json.dumps(expected["metrics"])
    assert not (snapshot / ci.CHECKPOINT).exists()


class Payload:
    """A pickle that, if ever unpickled, creates a marker file (stands for any code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["checkpoint.safetensors", "checkpoint.pt"])
def test_a_planted_checkpoint_is_refused_in_one_line_and_never_executed(tmp_path, capsys, name):
    import torch

    from helpers import FAST

    marker = tmp_path / "executed"
    assert run_cli(["run", *FAST, "checkpoint=false", f"runs_dir={tmp_path / 'runs'}"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    (run_dir / "results.json").unlink()  # looks unfinished: resume will read the checkpoint
    torch.save({"strategy": Payload(str(marker))}, run_dir / name)  # torch.save pickles
    capsys.readouterr()
    assert run_cli(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert name in err[0]
    assert not marker.exists()


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_temporary_file(
    tmp_path, capsys, monkeypatch
):
    import errno

    import safetensors.torch

    from helpers import FAST

    def full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert run_cli(["run", *FAST, f"runs_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write "), err
    assert "checkpoint.safetensors: No space left on device" in err[0]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
