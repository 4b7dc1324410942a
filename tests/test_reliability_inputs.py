"""Every bad input is one line on stderr (``error: ...``), exit code 2, no traceback and no
partial file: out-of-range values, a tracking URI MLflow has no store for, a runs_dir that
cannot be written, a full disk, a corrupt cache or data file, a results.json that is not
JSON, a launcher that cannot start. The checks of the configuration run before any job."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers import FAST, run_cli

NO_TRAINING = [o for o in FAST if not o.startswith("backbone.")]


def one_error_line(capsys) -> str:
    """The run's only stderr line (asserted), without its ``error: `` prefix."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0], err[0]
    return err[0].removeprefix("error: ")


def no_partial_files(root: Path) -> None:
    found = [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name == "results.json"]
    assert not found, found


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("strategy.dropout=2", "invalid value for strategy.dropout: 2.0; must be in [0, 1)"),
        (
            "seed=99999999999999999999",
            "invalid value for seed: 99999999999999999999; a seed must be in [0, 4294967295]",
        ),
        ("seed=-1", "invalid value for seed: -1; a seed must be in [0, 4294967295]"),
        ("scenario.class_order_seed=-1", "scenario.class_order_seed: -1; a seed must be in [0, "),
        ("scenario.split_seed=-1", "invalid value for scenario.split_seed: -1; a seed must be"),
        ("tracking.retries=-1", "invalid value for tracking.retries: -1; must be >= 0"),
        (
            "tracking.uri=garbage://x",
            "invalid value for tracking.uri: 'garbage://x'; MLflow has no tracking store for "
            "scheme 'garbage': valid are a local path, file:, sqlite:, postgresql:, mysql:, "
            "mssql:, http:, https:, databricks",
        ),
    ],
)
def test_bad_value_is_one_line_before_any_job(tmp_path, capsys, override, expected):
    runs = tmp_path / "runs"
    assert run_cli(["run", *FAST, f"runs_dir={runs}", override]) == 2
    assert expected in one_error_line(capsys)
    assert not runs.exists()  # caught before Hydra made a run directory


def test_conventional_fields_of_any_component_are_checked(capsys):
    """``*_seed`` and ``*_dropout`` keys of every group, by name (plug-ins' too)."""
    from clbench.checks import check_seed
    from clbench.config import check_conventional_fields, compose, validate

    check_seed("seed", 2**32 - 1)  # the bounds are valid
    check_seed("seed", 0)
    typed = validate(compose(["strategy=moe_adapters", "strategy.adapter_dropout=0"]))
    check_conventional_fields("strategy", typed["strategy"])
    assert run_cli(["run", "strategy=moe_adapters", "strategy.adapter_dropout=1"]) == 2
    assert "strategy.adapter_dropout: 1.0; must be in [0, 1)" in one_error_line(capsys)
    assert run_cli(["run", "backbone=wrn_16_2", "backbone.init_seed=4294967296"]) == 2
    assert "backbone.init_seed: 4294967296; a seed must be in" in one_error_line(capsys)


@pytest.mark.parametrize(
    "uri",
    [
        "mlruns",
        "/abs/mlruns",
        "file:///abs/mlruns",
        "sqlite:///x/mlflow.db",
        "postgresql://u@h/db",
        "postgresql+psycopg2://u@h/db",
        "mysql+pymysql://u@h/db",
        "mssql://u@h/db",
        "http://h:5000",
        "HTTPS://h",
        "databricks",
        "databricks://profile",
        "databricks-uc",
        "uc",
        "C:\\mlruns",
    ],
)
def test_tracking_uris_mlflow_takes_are_accepted(uri):
    from clbench.checks import check_tracking_uri

    check_tracking_uri("tracking.uri", uri)


def test_a_bad_tracking_uri_of_sync_and_publish_is_one_line(tmp_path, capsys):
    assert run_cli(["sync", str(tmp_path), "--tracking-uri", "garbage://x"]) == 2
    assert "invalid value for --tracking-uri: 'garbage://x'" in one_error_line(capsys)
    assert run_cli(["leaderboard", "publish", "--tracking-uri", "sqlitex:///m.db"]) == 2
    assert "no tracking store for scheme 'sqlitex'" in one_error_line(capsys)


# ---------------------------------------------------------------------------- runs_dir
def test_runs_dir_that_is_a_file_or_under_one(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert run_cli(["run", *FAST, f"runs_dir={afile}"]) == 2
    assert one_error_line(capsys) == (
        f"invalid value for runs_dir: '{afile}' is a file, not a directory; give runs_dir=DIR "
        "(a directory, made if missing)"
    )
    assert run_cli(["run", "-m", *FAST, f"runs_dir={afile / 'sub'}", "seed=0,1"]) == 2
    line = one_error_line(capsys)
    assert f"runs_dir: '{afile / 'sub'}'; '{afile}' is a file" in line
    assert afile.read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_unwritable_runs_dir(tmp_path, capsys, monkeypatch):
    """Root writes through chmod 000, so the refusal (EACCES, a read-only mount) is simulated
    on ``os.access`` for this test's directory only."""
    real = os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: not str(p).startswith(str(locked)) and real(p, mode)
    )
    assert run_cli(["run", *FAST, f"runs_dir={locked / 'runs'}"]) == 2
    assert one_error_line(capsys) == (
        f"invalid value for runs_dir: '{locked / 'runs'}' is not writable ('{locked}', where it "
        "would be made); give runs_dir=DIR on a writable disk"
    )
    assert not list(locked.iterdir())


def test_runs_dir_on_a_full_disk(tmp_path, capsys, monkeypatch):
    import shutil

    real = shutil.disk_usage

    def usage(p):
        full = str(p).startswith(str(tmp_path))
        return real(p)._replace(free=4096) if full else real(p)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    assert run_cli(["run", *FAST, f"runs_dir={tmp_path / 'runs'}"]) == 2
    assert one_error_line(capsys) == (
        f"invalid value for runs_dir: the disk of '{tmp_path / 'runs'}' ('{tmp_path}', where it "
        "would be made) is full (4096 bytes free); free space or give runs_dir=DIR on another disk"
    )
    assert not list(tmp_path.iterdir())


def test_full_disk_while_writing_the_run_directory(tmp_path, capsys, monkeypatch):
    """ENOSPC at the flush of a run-directory file: one line naming it, no temporary file,
    no results.json."""
    real_fsync = os.fsync

    def full(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    assert run_cli(["run", *FAST, f"runs_dir={tmp_path}", "checkpoint=false"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"cannot write {tmp_path}") and line.endswith(
        "config.yaml: No space left on device (free space on that disk and run again)"
    )
    no_partial_files(tmp_path)


def test_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from clbench.errors import ClbenchError
    from clbench.record import write_text_atomic

    path = tmp_path / "results.json"
    write_text_atomic(path, "old\n")
    assert path.read_text() == "old\n" and oct(path.stat().st_mode & 0o777) != "0o600"

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ClbenchError, match="No space left on device"):
        write_text_atomic(path, "new\n")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_disk_error_of_any_write_in_a_run_is_one_line(capsys):
    from clbench.cli import disk_errors
    from clbench.errors import ClbenchError

    with pytest.raises(ClbenchError) as e, disk_errors():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/accuracy_matrix.png")
    assert str(e.value) == (
        "/runs/x/accuracy_matrix.png: No space left on device (free space on that disk and "
        "run again)"
    )
    with pytest.raises(FileNotFoundError), disk_errors():  # not the disk's fault: unchanged
        raise FileNotFoundError(errno.ENOENT, "gone")


# ------------------------------------------------------------------- results.json, sync
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"{not json", "not valid JSON (Expecting property name enclosed in double quotes"),
        (b"\x80\x03garbage", "not valid JSON (not UTF-8 text: byte 0)"),
    ],
)
def test_sync_of_a_results_json_that_is_not_json(tmp_path, capsys, content, expected):
    """One line naming the file; sync's exit code for a run it could not upload is 1."""
    (tmp_path / "results.json").write_bytes(content)
    assert run_cli(["sync", str(tmp_path), "--tracking-uri", str(tmp_path / "mlruns")]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"{tmp_path / 'results.json'}: {expected}"), line
    assert (tmp_path / "results.json").read_bytes() == content
    assert not (tmp_path / "mlruns").exists()


# ------------------------------------------------------------------------- launchers
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_cluster_that_does_not_answer_fails_fast(tmp_path, capsys):
    address = f"127.0.0.1:{_closed_port()}"
    args = ["run", "-m", "hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address={address}"]
    assert run_cli([*args, *FAST, f"runs_dir={tmp_path / 'runs'}", "seed=0,1"]) == 2
    assert one_error_line(capsys) == (
        f"hydra/launcher=ray_cluster: no Ray cluster answers at hydra.launcher.ray.init.address="
        f"{address} (Connection refused); start it (ray start --head --port=PORT) or give the "
        "head's HOST:PORT"
    )
    assert not (tmp_path / "runs").exists()
    assert run_cli([*args[:3], "hydra.launcher.ray.init.address=nohost", *FAST]) == 2
    assert "expected HOST:PORT (the Ray head's GCS address" in one_error_line(capsys)


def test_slurm_without_its_commands_fails_fast(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    args = ["run", "-m", "hydra/launcher=slurm", *FAST, f"runs_dir={tmp_path / 'runs'}"]
    assert run_cli([*args, "seed=0,1"]) == 2
    assert one_error_line(capsys) == (
        "hydra/launcher=slurm submits SLURM jobs, but sbatch and srun are not on PATH; run the "
        "sweep on a SLURM login node, or use hydra/launcher=joblib (or submitit_local) on this "
        "machine"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["hydra/launcher=nope"], "unknown hydra/launcher 'nope'; valid choices: basic, joblib, "),
        (
            ["hydra/launcher=slurm", "hydra.launcher.nope=1"],
            "bad override: Could not override 'hydra.launcher.nope'. To append to your config "
            "use +hydra.launcher.nope=1",
        ),
    ],
)
def test_a_bad_launcher_override_is_one_line(tmp_path, capsys, overrides, expected):
    assert run_cli(["run", "-m", *overrides, *FAST, f"runs_dir={tmp_path}", "seed=0,1"]) == 2
    assert one_error_line(capsys).startswith(expected)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------- corrupt files
def test_corrupt_or_non_dict_wideresnet_checkpoint(tmp_path, capsys):
    import torch

    garbage, tensor = tmp_path / "garbage.pt", tmp_path / "tensor.pt"
    garbage.write_bytes(b"not a checkpoint\x00\x01")
    torch.save(torch.zeros(3), tensor)
    for path, expected in [
        (garbage, f"cannot read WideResNet checkpoint {garbage}: not a torch.save file of"),
        (tensor, f"{tensor} is not a WideResNet state dict (it holds a Tensor); expected a"),
    ]:
        args = ["run", *NO_TRAINING, "backbone=wrn_16_2", f"backbone.checkpoint={path}"]
        assert run_cli([*args, f"runs_dir={tmp_path / 'runs'}"]) == 2
        assert one_error_line(capsys).startswith(expected)
    no_partial_files(tmp_path)


def test_corrupt_pretrained_cache_names_the_file_and_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    from clbench.pretrain.train import DEFAULT_STEPS, default_checkpoint_path

    path = default_checkpoint_path(0, DEFAULT_STEPS)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{half a header")
    fix = f"remake it with: clbench pretrain --seed 0 --steps {DEFAULT_STEPS} --force"
    assert run_cli(["run", *NO_TRAINING, f"runs_dir={tmp_path / 'runs'}"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"unreadable micro ViT checkpoint {path}: ") and line.endswith(fix)
    assert run_cli(["pretrain"]) == 2  # `clbench pretrain` does not call it cached either
    assert one_error_line(capsys) == line


def test_corrupt_cached_source_model_names_the_file_and_the_fix(tmp_path, capsys, monkeypatch):
    path = plant_source_model_cache(monkeypatch, b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    assert run_cli(["run", *SOURCE_MODEL_RUN, f"runs_dir={tmp_path / 'runs'}"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"the cached source model {path[0]} is corrupt (")
    assert line.endswith(f"delete it and run again: it is retrained (rm {path[0]})")


#: a test-time run that needs the trained source model of a random-init WRN-16-2
SOURCE_MODEL_RUN = [
    "scenario=digits_c",
    "scenario.corruptions=[gaussian_noise]",
    "backbone=wrn_16_2",
    "strategy=source",
    "tracking=none",
    "progress=false",
]


def plant_source_model_cache(monkeypatch, content: bytes) -> list[Path]:
    """Make the source model's cache file ``content`` when the run looks for it; returns a
    list that then holds the path."""
    import clbench.pretrain.source as source

    real, planted = source._cache_path, []

    def planting(*args):
        path = real(*args)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        planted.append(path)
        return path

    monkeypatch.setattr(source, "_cache_path", planting)
    return planted


def test_cifar_c_npy_of_objects_is_refused(tmp_path, capsys):
    root = tmp_path / "CIFAR-10-C"
    root.mkdir()
    np.save(root / "fog.npy", np.zeros((5, 32, 32, 3), np.uint8))
    np.save(root / "labels.npy", np.array([1, "a", None, 2, 3], dtype=object), allow_pickle=True)
    args = ["run", "tracking=none", "progress=false", "scenario=cifar10_c", f"scenario.root={root}"]
    assert run_cli([*args, "scenario.corruptions=[fog]", f"runs_dir={tmp_path / 'runs'}"]) == 2
    assert one_error_line(capsys) == (
        f"cannot read {root / 'labels.npy'}: it holds Python objects (a pickle), which are "
        "never loaded; expected a numeric .npy array"
    )


# ------------------------------------------------------------------- qpsolvers warning
def test_the_qpsolvers_import_warning_is_silenced_narrowly(tmp_path):
    """qpsolvers without a solver warns at import (Avalanche imports it for GEM): a stub
    that warns as it does is silent once clbench is imported; its other warnings are not."""
    stub = tmp_path / "qpsolvers" / "solvers"
    stub.mkdir(parents=True)
    (tmp_path / "qpsolvers" / "__init__.py").write_text("from .solvers import available_solvers\n")
    (stub / "__init__.py").write_text(
        textwrap.dedent(
            """
            import warnings
            available_solvers = []
            if not available_solvers:
                warnings.warn(
                    "no QP solver found on your system, you can install solvers from PyPI by "
                    "``pip install qpsolvers[open_source_solvers]``"
                )
            warnings.warn("another qpsolvers warning")
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def stderr_of(code: str) -> str:
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stderr

    assert "no QP solver found" in stderr_of("import qpsolvers")  # the stub warns
    err = stderr_of("import clbench, qpsolvers; qpsolvers.available_solvers")  # deferred: used
    assert "no QP solver found" not in err and "another qpsolvers warning" in err


def test_a_diverging_class_incremental_run_names_the_experience_from_1(tmp_path, capsys):
    args = ["run", *FAST, "strategy=finetune", "strategy.optimizer=sgd", "strategy.lr=1e20"]
    assert run_cli([*args, f"runs_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: training loss became nan at experience 1, step 2; lower strategy.lr or check "
        "the data"
    ]
