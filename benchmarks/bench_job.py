"""Wall time of the whole default job: ``clbench run progress=false`` vs a hand-written script.

A is ``clbench run progress=false`` (the embedded default: split_digits x lora x micro_vit,
results.json, one MLflow run), B is ``python benchmarks/handwritten_job.py``, the same work
written by hand. Runs alternate A B A B ..., each a subprocess timed by this process
(``time.perf_counter`` around ``subprocess.run``); a failed run (or a clbench run whose
MLflow logging failed) stops the benchmark. Two settings:

- warm: the pretrained checkpoint cached (one CLBENCH_CACHE_DIR made first with
  ``clbench pretrain``) and each side's MLflow store existing (one untimed run of each
  first); every run of a side in that side's working directory;
- cold: an empty CLBENCH_CACHE_DIR and an empty working directory for every run, so each
  run includes the micro ViT's pretraining and the creation of its MLflow store.

Both log to the same kind of store: clbench to MLflow's default (``tracking.uri`` null:
the store MLflow resolves in the working directory, a SQLite file ``mlflow.db`` with
MLflow 3), the hand-written script to the store MLflow resolves in its own working
directory, given as ``--tracking-uri``. MLFLOW_TRACKING_URI is removed from every run's
environment; ``--env KEY=VALUE`` is added to it (both sides, and ``clbench pretrain``).

Reported per setting: every sample (seconds, final accuracy, torch threads), the medians
and the ratio clbench / hand-written of the medians; with the machine (cores available,
load average), the versions and the git commit. ``--hog`` keeps one busy-loop process
running throughout (one core saturated).

    python benchmarks/bench_job.py [--repeats 5] [--cold-repeats 5] [--settings warm,cold]
        [--clbench-args "threads=1"] [--env OMP_NUM_THREADS=1]... [--hog] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[1]
HANDWRITTEN = ROOT / "benchmarks" / "handwritten_job.py"
CLBENCH = Path(sys.executable).with_name("clbench")
SIDES = ("clbench", "handwritten")
SETTINGS = {
    "warm": "checkpoint cached, MLflow store existing",
    "cold": "empty cache and working directory per run: pretraining and store creation",
}


def fail(what: str, cmd: list[str], cwd: Path, proc: subprocess.CompletedProcess) -> NoReturn:
    out = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
    sys.exit(f"{what} (exit {proc.returncode}): {shlex.join(cmd)}\n  in {cwd}\n" + "\n".join(out))


def execute(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """Run ``cmd``; its wall seconds and stdout. Exits with its output if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        fail("run failed", cmd, cwd, proc)
    return seconds, proc.stdout


class Jobs:
    """The two jobs, run in given working and cache directories."""

    def __init__(self, env: dict[str, str], clbench_args: list[str], probe: Path) -> None:
        self.env = env
        self.clbench_args = clbench_args
        self.store = self.default_store(probe)

    def default_store(self, probe: Path) -> str:
        """MLflow's default store URI in ``probe`` with the directory as ``{dir}``."""
        cmd = [sys.executable, "-c", "import mlflow; print(mlflow.get_tracking_uri())"]
        uri = execute(cmd, probe, self.env)[1].strip().splitlines()[-1]
        if str(probe) not in uri:
            sys.exit(f"MLflow's default store {uri!r} is not in the working directory {probe}")
        return uri.replace(str(probe), "{dir}")

    def env_for(self, cache: Path) -> dict[str, str]:
        return {**self.env, "CLBENCH_CACHE_DIR": str(cache)}

    def pretrain(self, cache: Path) -> None:
        execute([str(CLBENCH), "pretrain"], cache, self.env_for(cache))

    def clbench(self, work: Path, cache: Path) -> dict[str, Any]:
        cmd = [str(CLBENCH), "run", "progress=false", *self.clbench_args]
        seconds, out = execute(cmd, work, self.env_for(cache))
        run_dir = [ln for ln in out.splitlines() if ln.startswith("run directory: ")][-1]
        record = json.loads((work / run_dir.partition(": ")[2] / "results.json").read_text())
        if (record.get("tracking") or {}).get("status") != "ok":
            sys.exit(f"clbench's MLflow logging failed in {work}: {record.get('tracking')}")
        threads = record["tags"]["hardware"].split()[-2]
        return sample(seconds, record["metrics"]["final_accuracy"], threads)

    def handwritten(self, work: Path, cache: Path) -> dict[str, Any]:
        out = work / f"out{len(list(work.glob('out*')))}"
        uri = self.store.replace("{dir}", str(work))
        cmd = [sys.executable, str(HANDWRITTEN), "--out", str(out), "--tracking-uri", uri]
        seconds, _ = execute(cmd, work, self.env_for(cache))
        record = json.loads((out / "results.json").read_text())
        return sample(seconds, record["metrics"]["final_accuracy"], record["params"]["threads"])

    def run(self, side: str, work: Path, cache: Path) -> dict[str, Any]:
        return getattr(self, side)(work, cache)


def sample(seconds: float, final_accuracy: float, threads: object) -> dict[str, Any]:
    return {"seconds": seconds, "final_accuracy": final_accuracy, "threads": int(threads)}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def bench_warm(jobs: Jobs, root: Path, repeats: int) -> dict[str, list[dict[str, Any]]]:
    cache, dirs = root / "cache", {side: root / side for side in SIDES}
    for d in (cache, *dirs.values()):
        d.mkdir(parents=True)
    log("warm: clbench pretrain, then one untimed run of each")
    jobs.pretrain(cache)
    for side in SIDES:
        jobs.run(side, dirs[side], cache)
    samples: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for i in range(repeats):
        for side in SIDES:
            samples[side].append(jobs.run(side, dirs[side], cache))
            log(f"warm {i + 1}/{repeats} {side}: {samples[side][-1]['seconds']:.2f}s")
    return samples


def bench_cold(jobs: Jobs, root: Path, repeats: int) -> dict[str, list[dict[str, Any]]]:
    samples: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for i in range(repeats):
        for side in SIDES:
            work, cache = root / f"{side}{i}" / "work", root / f"{side}{i}" / "cache"
            work.mkdir(parents=True)
            cache.mkdir()
            samples[side].append(jobs.run(side, work, cache))
            shutil.rmtree(work.parent)
            log(f"cold {i + 1}/{repeats} {side}: {samples[side][-1]['seconds']:.2f}s")
    return samples


def summarise(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    medians = {s: statistics.median(x["seconds"] for x in samples[s]) for s in SIDES}
    return {
        "samples": samples,
        "median_seconds": medians,
        "ratio_clbench_over_handwritten": medians["clbench"] / medians["handwritten"],
    }


def git(*args: str) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def report_text(report: dict[str, Any]) -> str:
    m, o = report["machine"], report["options"]
    lines = [
        "clbench run progress=false (A) vs benchmarks/handwritten_job.py (B), wall seconds",
        f"machine: {m['cores_available']} cores available, load average before "
        + " ".join(f"{v:.2f}" for v in m["load_average_before"])
        + ", after "
        + " ".join(f"{v:.2f}" for v in m["load_average_after"])
        + f", busy-loop hog: {'yes' if o['hog'] else 'no'}",
        f"python {m['python']}, torch {m['torch']}, mlflow {m['mlflow']}, {m['platform']}",
        f"commit {report['commit']}{' (uncommitted changes)' if report['dirty'] else ''}",
        f"clbench args: {shlex.join(o['clbench_args']) or '-'}; "
        f"env: {' '.join(f'{k}={v}' for k, v in o['env'].items()) or '-'}",
    ]
    for name, res in report["settings"].items():
        a, b = res["samples"]["clbench"], res["samples"]["handwritten"]
        lines += ["", f"{name} ({SETTINGS[name]}), {len(a)} runs each", "  run  clbench  hand"]
        lines += [
            f"  {i + 1:>3}  {x['seconds']:7.2f}  {y['seconds']:5.2f}"
            for i, (x, y) in enumerate(zip(a, b, strict=True))
        ]
        med = res["median_seconds"]
        lines.append(f"  med  {med['clbench']:7.2f}  {med['handwritten']:5.2f}")
        lines.append(
            f"  ratio clbench / hand of the medians: {res['ratio_clbench_over_handwritten']:.2f}"
        )
        acc = {s: sorted({round(x["final_accuracy"], 4) for x in res["samples"][s]}) for s in SIDES}
        threads = {s: sorted({x["threads"] for x in res["samples"][s]}) for s in SIDES}
        lines.append(f"  final accuracy: clbench {acc['clbench']}, hand {acc['handwritten']}")
        lines.append(
            f"  torch threads: clbench {threads['clbench']}, hand {threads['handwritten']}"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="warm runs of each (default 5)")
    parser.add_argument("--cold-repeats", type=int, default=5, help="cold runs of each")
    parser.add_argument("--settings", default="warm,cold", help="warm, cold or warm,cold")
    parser.add_argument("--clbench-args", default="", help='overrides, e.g. "threads=1"')
    parser.add_argument("--hog", action="store_true", help="one busy-loop process throughout")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON")
    args = parser.parse_args()
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not args.settings or any(s not in SETTINGS for s in args.settings):
        parser.error(f"--settings: a comma-separated list of {', '.join(SETTINGS)}")
    if min(args.repeats, args.cold_repeats) < 1:
        parser.error("--repeats and --cold-repeats must be at least 1")
    if any("=" not in e or e.startswith("=") for e in args.env):
        parser.error("--env takes KEY=VALUE")
    args.env = dict(e.split("=", 1) for e in args.env)
    return args


def main() -> None:
    args = parse_args()
    if not CLBENCH.is_file():
        sys.exit(f"no clbench executable next to {sys.executable}")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | args.env
    report: dict[str, Any] = {
        "machine": {
            "cores_available": len(os.sched_getaffinity(0)),
            "load_average_before": list(os.getloadavg()),
            "python": platform.python_version(),
            "torch": version("torch"),
            "mlflow": version("mlflow"),
            "platform": platform.platform(),
        },
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "options": {
            "repeats": args.repeats,
            "cold_repeats": args.cold_repeats,
            "clbench_args": shlex.split(args.clbench_args),
            "env": args.env,
            "hog": args.hog,
        },
        "settings": {},
    }
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.hog else None
    root = Path(tempfile.mkdtemp(prefix="bench_job_")).resolve()
    try:
        (root / "probe").mkdir()
        jobs = Jobs(env, report["options"]["clbench_args"], root / "probe")
        for name in args.settings:
            if name == "warm":
                samples = bench_warm(jobs, root / "warm", args.repeats)
            else:
                samples = bench_cold(jobs, root / "cold", args.cold_repeats)
            report["settings"][name] = summarise(samples)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        shutil.rmtree(root, ignore_errors=True)
    report["machine"]["load_average_after"] = list(os.getloadavg())
    print(report_text(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
