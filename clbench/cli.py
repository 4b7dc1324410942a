"""The ``clbench`` command: run, list, pretrain, resume, sync, leaderboard, wsi.

``clbench run [OVERRIDES...]`` is a Hydra application (conf/config.yaml), so sweeps
(``-m strategy=a,b seed=0,1``) and launchers work as in any Hydra app. Overrides are
validated first: a mistake is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from clbench.errors import ClbenchError

USAGE = """usage: clbench COMMAND [ARGS]

commands:
  run [-m] [KEY=VALUE ...]   train and evaluate a strategy on a scenario (Hydra overrides)
  list                       registered strategies, scenarios, backbones and scenario kinds
  pretrain [--seed N] [--steps N] [--threads N] [--force]
                             make the embedded micro ViT's offline source checkpoint
  resume RUN_DIR             continue a killed run from its last finished experience
  sync RUN_DIR... [--tracking-uri URI] [--experiment NAME] [--force]
                             upload run directories whose tracking failed (or was off)
  leaderboard publish [--tracking-uri URI]... [--experiment NAME] [--out DIR] [--merge]
                             leaderboards/<scenario>.md/.json + index.html from tracked runs
                             (--merge: keep a board's entries that have no new run)
  leaderboard render [--out DIR]
                             write DIR/*.md and index.html again from DIR/*.json
  wsi tile SLIDES... --out DIR [--patch-size 256 --step 256 --preset default|tcga ...]
                             tissue patches of whole slides (CLAM's patches/<slide>.h5)
  wsi features DIR --encoder stain|resnet50_trunc [--weights FILE --slides-dir DIR]
                             patch features (CLAM's h5_files/ and pt_files/)

options for run: -m/--multirun (sweep), --verbose (tracebacks), --cfg job (print config)
examples:
  clbench run
  clbench run strategy=finetune scenario=split_digits seed=3 strategy.lr=0.01
  clbench run -m strategy=finetune,lora seed=0,1
"""


def _verbose(args: list[str]) -> bool:
    return "--verbose" in args or os.environ.get("HYDRA_FULL_ERROR") == "1"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    from clbench.resources import configure_openmp

    configure_openmp()  # libgomp reads it when torch loads it
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = args[0], args[1:]
    commands = {
        "run": cmd_run,
        "list": cmd_list,
        "pretrain": cmd_pretrain,
        "resume": cmd_resume,
        "sync": cmd_sync,
        "leaderboard": cmd_leaderboard,
        "wsi": cmd_wsi,
    }
    if cmd not in commands:
        print(
            f"error: unknown command {cmd!r}; valid commands: {', '.join(commands)}",
            file=sys.stderr,
        )
        return 2
    try:
        return commands[cmd](rest)
    except ClbenchError as e:
        if _verbose(rest):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (clbench list | head): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit must not fail
        return 1


#: errno of a write the disk refused: full, over quota, read-only, no permission
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


@contextlib.contextmanager
def disk_errors() -> Iterator[None]:
    """A run's OSError from the disk (a full disk while writing the run directory) as one
    ClbenchError line naming the file; writes clbench makes atomically leave no temporary
    file behind (:func:`clbench.record.write_text_atomic`)."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        from clbench.record import describe_os_error

        where = f"{e.filename}: " if e.filename else ""
        raise ClbenchError(f"{where}{describe_os_error(e)}") from None


def cmd_run(args: list[str]) -> int:
    from clbench.checks import check_writable_dir
    from clbench.config import CONF_DIR, check_overrides, register_plugin_configs

    verbose = _verbose(args)
    hydra_args = [a for a in args if a != "--verbose"]
    overrides = [a for a in hydra_args if not a.startswith("-") and "=" in a]
    bad = [a for a in hydra_args if not a.startswith("-") and "=" not in a]
    if bad and not any(a in ("--cfg", "-c", "--package", "-p", "--info", "-i") for a in hydra_args):
        raise ClbenchError(
            f"bad argument {bad[0]!r}; overrides look like KEY=VALUE "
            "(e.g. strategy=finetune seed=3)"
        )
    modes = [a for a in hydra_args if a in ("-m", "--multirun", "--cfg", "-c", "--info", "-i")]
    if any(a in ("-m", "--multirun") for a in modes) and len(modes) > 1:
        raise ClbenchError(
            f"{' and '.join(modes)} cannot be combined: Hydra runs one mode at a time; "
            "drop -m to print the configuration"
        )
    register_plugin_configs()
    configs = check_overrides(overrides)
    multirun = "-m" in modes or "--multirun" in modes
    if not any(a in ("--cfg", "-c", "--info", "-i") for a in hydra_args):  # jobs will run
        for runs_dir in sorted({str(c.runs_dir) for c in configs}):
            check_writable_dir("runs_dir", runs_dir)
        check_launcher(overrides, multirun)
    if multirun:
        # parallel jobs must not race to create (and migrate) a fresh local store
        from clbench.tracking import prepare_local_store

        for uri, experiment in sorted(
            {(c.tracking.uri, c.tracking.experiment) for c in configs if c.tracking.enabled},
            key=str,
        ):
            prepare_local_store(uri, experiment)

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    def task(cfg: DictConfig) -> None:
        from clbench.runner import execute

        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        # every job of one sweep (any launcher: basic, joblib, Ray, submitit) shares it
        sweep_id = Path(str(hc.sweep.dir)).name if hc.mode == RunMode.MULTIRUN else None
        try:
            with disk_errors():
                execute(cfg, run_dir, sweep_id=sweep_id)
        except ClbenchError as e:
            if verbose:
                traceback.print_exc()
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(e.exit_code) from None

    app = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(task)
    saved = sys.argv
    sys.argv = ["clbench", *hydra_args]
    try:
        app()
    finally:
        sys.argv = saved
    return 0


def check_launcher(overrides: list[str], multirun: bool) -> None:
    """A launcher override composes; and, for a sweep, fail fast in one line where its
    launcher cannot start: a Ray cluster that does not answer (Ray would wait for
    minutes), SLURM commands that are not here."""
    if not any(o.lstrip("+~").startswith("hydra/launcher=") for o in overrides):
        return
    from clbench.config import compose_hydra

    hydra_overrides = [o for o in overrides if o.lstrip("+~").startswith("hydra")]
    launcher = compose_hydra(hydra_overrides).launcher
    if not multirun:  # a single job runs in this process: no launcher is used
        return
    choice = [o.partition("=")[2] for o in overrides if "hydra/launcher=" in o][-1]
    target = str(launcher.get("_target_", ""))
    if target.endswith(".SlurmLauncher"):
        missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
        if missing:
            raise ClbenchError(
                f"hydra/launcher={choice} submits SLURM jobs, but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not on PATH; run the sweep on a SLURM "
                "login node, or use hydra/launcher=joblib (or submitit_local) on this machine"
            )
    elif target.endswith(".RayLauncher"):
        init = launcher.get("ray", {}).get("init", {}) or {}
        _check_ray_address(choice, init.get("address"))


def _check_ray_address(choice: str, address: str | None) -> None:
    """The Ray cluster the launcher connects to (``ray.init(address=...)``) answers."""
    from clbench.checks import tcp_unreachable

    key = "hydra.launcher.ray.init.address"
    if address in (None, "", "local"):  # Ray starts a local instance
        return
    address = str(address)
    if address == "auto":  # RAY_ADDRESS, else the cluster `ray start` made on this machine
        try:
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:  # another Ray: let it resolve "auto" itself
            return
        try:
            address = canonicalize_bootstrap_address("auto") or ""
        except (ConnectionError, ValueError) as e:
            raise ClbenchError(
                f"hydra/launcher={choice}: {key}=auto finds no running Ray cluster "
                f"({str(e).split('. ')[0]}); start one (ray start --head) or give "
                f"{key}=HOST:PORT (its GCS address)"
            ) from None
        if not address:
            return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ClbenchError(
            f"invalid value for {key}: {address!r}; expected HOST:PORT (the Ray head's GCS "
            "address, e.g. 10.0.0.5:6379), ray://HOST:PORT, auto or local"
        )
    why = tcp_unreachable(host.strip("[]"), int(port))
    if why:
        raise ClbenchError(
            f"hydra/launcher={choice}: no Ray cluster answers at {key}={address} ({why}); "
            "start it (ray start --head --port=PORT) or give the head's HOST:PORT"
        )


def cmd_list(args: list[str]) -> int:
    """Every registered component, read without importing any (see clbench.registry)."""
    from clbench.registry import PROTOCOLS, REGISTRIES

    for kind, reg in REGISTRIES.items():
        for e in reg:
            extra = ""
            if kind == "strategy":
                scenario_kind = e.scenario_kind
                extra = f" [{scenario_kind}]" if scenario_kind else ""
            src = "" if e.source == "builtin" else f" (from {e.source})"
            print(f"{kind:<9} {e.name:<16} {e.summary}{extra}{src}")
    for e in PROTOCOLS:  # one protocol per scenario kind
        src = "" if e.source == "builtin" else f" (from {e.source})"
        print(f"{'kind':<9} {e.name:<16} {e.summary}{src}")
    return 0


def cmd_pretrain(args: list[str]) -> int:
    from clbench.checks import check_seed
    from clbench.errors import first_line
    from clbench.pretrain.train import (
        DEFAULT_STEPS,
        corrupt_cache_fix,
        default_checkpoint_path,
        ensure_pretrained,
        read_metadata,
    )

    p = _Parser(
        prog="clbench pretrain",
        description="make the micro ViT's offline source checkpoint (cached in the user cache dir)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--force", action="store_true", help="remake it even if cached")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    ns = p.parse_args(args)
    check_seed("--seed", ns.seed)
    if ns.steps < 1:
        raise ClbenchError(f"invalid value for --steps: {ns.steps}; must be >= 1")
    if ns.threads is not None and ns.threads < 1:
        raise ClbenchError(f"invalid value for --threads: {ns.threads}; must be >= 1")
    from clbench.resources import set_threads

    set_threads(ns.threads)
    path = default_checkpoint_path(ns.seed, ns.steps)
    if ns.force and path.exists():
        path.unlink()
    elif path.is_file():
        try:
            read_metadata(path)
        except ValueError as e:
            raise ClbenchError(f"{first_line(e)}; {corrupt_cache_fix(ns.seed, ns.steps)}") from None
    print(ensure_pretrained(ns.seed, ns.steps, progress=True))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one ClbenchError line (exit 2) like every other command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ClbenchError(f"{self.prog}: {message}")


def cmd_resume(args: list[str]) -> int:
    from omegaconf import OmegaConf

    from clbench.config import register_plugin_configs
    from clbench.runner import execute

    p = _Parser(prog="clbench resume", description="continue a run from its checkpoint")
    p.add_argument("run_dir", type=Path)
    ns = p.parse_args(args)
    config = ns.run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        raise ClbenchError(f"not a clbench run directory (no .hydra/config.yaml): {ns.run_dir}")
    register_plugin_configs()
    with disk_errors():
        execute(OmegaConf.load(config), ns.run_dir, resume=True)
    return 0


def cmd_sync(args: list[str]) -> int:
    from clbench.checks import check_tracking_uri
    from clbench.tracking import sync_run_dir

    p = _Parser(prog="clbench sync", description="upload run directories to MLflow")
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--tracking-uri", default=None, help="default: the run's tracking.uri")
    p.add_argument("--experiment", default=None, help="default: the run's tracking.experiment")
    p.add_argument("--force", action="store_true", help="upload again even if already tracked")
    ns = p.parse_args(args)
    check_tracking_uri("--tracking-uri", ns.tracking_uri)
    failed = 0
    for run_dir in ns.run_dirs:
        try:
            status = sync_run_dir(run_dir, ns.tracking_uri, ns.experiment, ns.force)
        except ClbenchError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        word = "already tracked" if status.get("skipped") else "synced"
        print(f"{word}: {run_dir} (MLflow run {status.get('run_id')})")
    return ClbenchError.exit_code if failed else 0  # each failure was one line


LEADERBOARD_EPILOG = """actions:
  publish  build boards from the finished runs of MLflow stores and write DIR/<scenario>.json,
           DIR/<scenario>.md and DIR/index.html (the index lists every board JSON in DIR)
  render   write every DIR/*.md and DIR/index.html again from DIR/*.json (no store needed)

examples:
  clbench leaderboard publish --tracking-uri sqlite:///mlflow.db --out leaderboards
  clbench leaderboard publish --tracking-uri sqlite:///new.db --merge   # add to old boards
  clbench leaderboard render --out leaderboards"""


def cmd_leaderboard(args: list[str]) -> int:
    from clbench.checks import check_tracking_uri
    from clbench.leaderboard import publish, read_runs, render

    p = _Parser(
        prog="clbench leaderboard",
        description="publish leaderboards from tracked runs, or render them again from JSON",
        epilog=LEADERBOARD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=["publish", "render"], help="see the actions below")
    p.add_argument(
        "--tracking-uri",
        action="append",
        default=None,
        metavar="URI",
        help="publish: default MLflow's (MLFLOW_TRACKING_URI); repeat to publish runs of "
        "several stores",
    )
    p.add_argument(
        "--experiment",
        default=None,
        metavar="NAME",
        help="publish: the MLflow experiment (default: clbench)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("leaderboards"),
        metavar="DIR",
        help="the boards' folder (default: leaderboards)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="publish: keep the entries of a board already in --out whose strategy and "
        "backbone have no new run (their runs may come from a store that is gone); the "
        "others are replaced, and all are ranked again",
    )
    ns = p.parse_args(args)
    if ns.action == "render":
        given = [
            flag
            for flag, value in (
                ("--tracking-uri", ns.tracking_uri),
                ("--experiment", ns.experiment),
                ("--merge", ns.merge),
            )
            if value
        ]
        if given:
            raise ClbenchError(
                f"{', '.join(given)}: only for publish; render reads the board JSONs of --out "
                "(clbench leaderboard render --out DIR)"
            )
        written = render(ns.out)
    else:
        for uri in ns.tracking_uri or []:
            check_tracking_uri("--tracking-uri", uri)
        experiment = ns.experiment or "clbench"
        runs = [r for uri in ns.tracking_uri or [None] for r in read_runs(uri, experiment)]
        written = publish(runs, ns.out, merge=ns.merge)
    for path in written:
        print(path)
    return 0


WSI_USAGE = """usage: clbench wsi {tile,features} ...

  tile SLIDES... --out DIR   segment tissue and write patch coordinates (CLAM layout)
  features DIR --encoder E   encode the patches of DIR/patches/*.h5
run `clbench wsi tile --help` or `clbench wsi features --help` for the options"""


def cmd_wsi(args: list[str]) -> int:
    """``clbench wsi tile`` / ``clbench wsi features`` (CLAM's create_patches_fp.py and
    extract_features_fp.py; docs/wsi.md)."""
    if not args or args[0] in ("-h", "--help", "help"):
        print(WSI_USAGE)
        return 0
    sub, rest = args[0], args[1:]
    if sub == "tile":
        return _wsi_tile(rest)
    if sub == "features":
        return _wsi_features(rest)
    raise ClbenchError(f"unknown wsi command {sub!r}; valid commands: tile, features")


def _wsi_tile(args: list[str]) -> int:
    from clbench.wsi.tiling import PRESETS, TilingParams

    p = _Parser(
        prog="clbench wsi tile",
        description="segment tissue and write level-0 patch coordinates: DIR/patches/<id>.h5, "
        "DIR/masks/<id>.png, DIR/process_list_autogen.csv (CLAM's layout; resumable)",
    )
    p.add_argument("slides", nargs="+", type=Path, help="slide files or folders of slides")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--patch-size", type=int, default=256, help="patch side in pixels at --level")
    p.add_argument("--step", type=int, default=None, help="grid step at --level (default: size)")
    p.add_argument("--level", type=int, default=0, help="pyramid level patches are read at")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--seg-level", default="auto", help="auto (about 64x) or a level index")
    p.add_argument("--sthresh", type=int, default=None, help="saturation threshold (0-255)")
    p.add_argument("--use-otsu", action="store_true", default=None, help="Otsu's threshold")
    p.add_argument("--mthresh", type=int, default=None, help="median blur kernel (odd)")
    p.add_argument("--close", type=int, default=None, help="closing kernel (0: none)")
    p.add_argument("--a-t", type=float, default=None, help="min tissue area, in 512^2 patches")
    p.add_argument("--a-h", type=float, default=None, help="min hole area, in 512^2 patches")
    p.add_argument("--max-holes", type=int, default=None, help="holes kept per contour")
    p.add_argument("--workers", type=int, default=1, help="slides tiled in parallel")
    p.add_argument("--force", action="store_true", help="redo slides already tiled")
    ns = p.parse_args(args)
    values = dict(PRESETS[ns.preset])
    given = {
        "sthresh": ns.sthresh,
        "use_otsu": ns.use_otsu,
        "mthresh": ns.mthresh,
        "close": ns.close,
        "a_t": ns.a_t,
        "a_h": ns.a_h,
        "max_n_holes": ns.max_holes,
    }
    values.update({k: v for k, v in given.items() if v is not None})
    if ns.seg_level == "auto":
        seg_level = None
    elif ns.seg_level.isdigit():
        seg_level = int(ns.seg_level)
    else:
        raise ClbenchError(
            f"invalid value for --seg-level: {ns.seg_level!r}; expected auto or a level index"
        )
    if ns.workers < 1:
        raise ClbenchError(f"invalid value for --workers: {ns.workers}; must be >= 1")
    params = TilingParams(
        patch_size=ns.patch_size,
        step_size=ns.patch_size if ns.step is None else ns.step,
        patch_level=ns.level,
        seg_level=seg_level,
        preset=ns.preset,
        **values,
    )
    from clbench.wsi.slide import expand_slides
    from clbench.wsi.tiling import tile_slides

    slides = expand_slides(ns.slides)
    with disk_errors():
        results = tile_slides(slides, ns.out, params, workers=ns.workers, force=ns.force)
    failed = [r for r in results if r.status.startswith("failed")]
    done = sum(r.status == "processed" for r in results)
    print(
        f"tiled {done}, skipped {len(results) - done - len(failed)}, failed {len(failed)} "
        f"slide(s) into {ns.out}",
        file=sys.stderr,
    )
    return ClbenchError.exit_code if failed else 0


def _wsi_features(args: list[str]) -> int:
    p = _Parser(
        prog="clbench wsi features",
        description="encode the patches of DIR/patches/*.h5 into DIR/h5_files/<id>.h5 and "
        "DIR/pt_files/<id>.pt (CLAM's layout; resumable)",
    )
    p.add_argument("dir", type=Path, help="the --out folder of clbench wsi tile")
    p.add_argument("--encoder", default="stain", help="stain (offline) or resnet50_trunc")
    p.add_argument("--slides-dir", type=Path, default=None, help="where the slides are now")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: DIR)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--weights", type=Path, default=None, help="local weights (.safetensors/.pt)")
    p.add_argument("--target-patch-size", type=int, default=224, help="resize for CNN encoders")
    p.add_argument("--force", action="store_true", help="redo slides already encoded")
    ns = p.parse_args(args)
    if not ns.dir.is_dir():
        raise ClbenchError(f"no such folder: {ns.dir}")
    if ns.target_patch_size < 1:
        raise ClbenchError(
            f"invalid value for --target-patch-size: {ns.target_patch_size}; must be >= 1"
        )
    from clbench.wsi.features import ENCODERS, extract_features

    if ns.encoder not in ENCODERS:
        from clbench.errors import unknown_choice

        raise unknown_choice("encoder", ns.encoder, ENCODERS)
    with disk_errors():
        extract_features(
            ns.dir,
            ns.encoder,
            slides_dir=ns.slides_dir,
            out=ns.out,
            batch_size=ns.batch_size,
            device=ns.device,
            weights=ns.weights,
            target_patch_size=ns.target_patch_size,
            force=ns.force,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
