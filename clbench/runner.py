"""One run: compose -> build scenario, backbone, strategy -> protocol -> run record -> MLflow."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import clbench
from clbench import plots, tracking
from clbench.config import resolve_device, to_container, validate
from clbench.errors import ClbenchError, first_line
from clbench.models import ClassifierModel, ClipClassifier
from clbench.pretrain.source import source_classifier
from clbench.progress import ProgressPlugin
from clbench.protocols.class_incremental import ClassIncrementalResult, run_class_incremental
from clbench.protocols.tta import TTAResult, run_tta
from clbench.registry import BACKBONES, SCENARIOS, STRATEGIES
from clbench.resources import peak_rss_mb
from clbench.seeding import rng_state, seed_everything, set_rng_state

HEADLINE = (
    "final_accuracy",
    "final_accuracy_task_avg",
    "average_incremental_accuracy",
    "forgetting",
    "bwt",
    "fwt",
    "plasticity",
)


def git_commit() -> str:
    """The commit of the clbench source tree, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(clbench.__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def input_shapes(backbone: Any) -> list[tuple[int | None, ...]]:
    """The (C, H, W) input shapes a backbone declares (``None``: any size)."""
    return [tuple(s) for s in backbone.meta.get("input_shapes", [backbone.input_shape])]


def accepts_input(backbone: Any, shape: tuple[int, ...]) -> bool:
    """Whether ``backbone`` takes one input of ``shape``."""
    return any(
        len(s) == len(shape) and all(a is None or a == b for a, b in zip(s, shape, strict=True))
        for s in input_shapes(backbone)
    )


def describe_input_shapes(backbone: Any) -> str:
    shapes = [
        "(" + ", ".join("any" if d is None else str(d) for d in s) + ")"
        for s in input_shapes(backbone)
    ]
    return " or ".join(shapes)


def build_model(backbone: Any, scenario: Any) -> nn.Module:
    """The classifier strategies train: a text-embedding head on CLIP, else a linear head."""
    if backbone.meta.get("kind") == "clip":
        return ClipClassifier(
            backbone.module,
            backbone.meta["tokenizer"],
            scenario.class_names,
            template=backbone.meta["template"],
            input_adapter=backbone.meta.get("input_adapter"),
        )
    return ClassifierModel(backbone.module, backbone.feature_dim)


CHECKPOINT = "checkpoint.pt"
CHECKPOINT_INFO = "checkpoint.json"


def execute(
    cfg: DictConfig, run_dir: Path, sweep_id: str | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run one configured job into ``run_dir``; returns the run record (results.json).

    ``sweep_id`` (a multirun's sweep directory name) becomes the ``sweep_id`` tag. After
    each experience the whole learner state (the strategy with its model, the results so
    far and every RNG state) is checkpointed into ``run_dir``; with ``resume`` the run
    continues from that checkpoint and ends as the uninterrupted run would have.
    """
    wall0 = time.perf_counter()
    typed = validate(cfg)
    device = resolve_device(cfg.device)
    seed_everything(int(cfg.seed))
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = bool(cfg.progress)

    scenario = SCENARIOS.get(cfg.scenario.name)(typed["scenario"])
    backbone = BACKBONES.get(cfg.backbone.name)(typed["backbone"])
    if not accepts_input(backbone, scenario.input_shape):
        raise ClbenchError(
            f"backbone {backbone.name!r} takes inputs {describe_input_shapes(backbone)} but "
            f"scenario {scenario.name!r} gives {tuple(scenario.input_shape)}; pick a matching "
            "backbone"
        )
    strategy_cls = STRATEGIES.get(cfg.strategy.name)
    if scenario.kind not in strategy_cls.protocols:
        raise ClbenchError(
            f"strategy {cfg.strategy.name!r} does not support {scenario.kind!r} scenarios; "
            f"it supports: {', '.join(strategy_cls.protocols)}"
        )
    seed_everything(int(cfg.seed))  # building the scenario/backbone must not shift the seed
    backbone.meta["params"] = sum(p.numel() for p in backbone.module.parameters())
    if scenario.kind == "test_time":
        if resume:
            raise ClbenchError(
                f"nothing to resume in {run_dir}: test-time runs are not checkpointed; "
                "start it again"
            )
        record = execute_tta(
            cfg, typed, run_dir, scenario, backbone, strategy_cls, device, wall0
        )
        return finish(cfg, record, run_dir, sweep_id, progress)
    progress_plugin = ProgressPlugin(scenario.num_experiences, enabled=progress)
    resumed: ClassIncrementalResult | None = None
    if resume:
        strategy, resumed, sweep_id = load_checkpoint(cfg, run_dir, progress_plugin, device)
    else:
        strategy = strategy_cls(
            model=build_model(backbone, scenario),
            cfg=typed["strategy"],
            seed=int(cfg.seed),
            device=device,
            plugins=[progress_plugin],
            in_memory=scenario.in_memory,
            n_experiences=scenario.num_experiences,
        )

    def on_checkpoint(t: int, result: ClassIncrementalResult) -> None:
        save_checkpoint(cfg, run_dir, strategy, result, sweep_id)

    def on_step(t: int, agnostic: list[float], aware: list[float]) -> None:
        if progress:
            seen = agnostic[: t + 1]
            print(
                f"  after experience {t + 1}: accuracy on seen experiences "
                + " ".join(f"{a:.3f}" for a in seen),
                file=sys.stderr,
            )

    resumed_after = len(resumed.accuracy_matrix) if resumed is not None else None
    result = run_class_incremental(
        scenario,
        strategy,
        on_step=on_step,
        resume_from=resumed,
        on_checkpoint=on_checkpoint if cfg.get("checkpoint", True) else None,
    )
    record = build_record(cfg, run_dir, scenario, backbone, strategy, result, wall0)
    if resumed_after is not None:
        record["resumed_after_experience"] = resumed_after
    return finish(cfg, record, run_dir, sweep_id, progress)


def finish(
    cfg: DictConfig, record: dict[str, Any], run_dir: Path, sweep_id: str | None, progress: bool
) -> dict[str, Any]:
    """Write the run directory, track it, drop the checkpoint and print the summary."""
    if sweep_id:
        record["tags"]["sweep_id"] = sweep_id
    write_run_dir(record, run_dir)
    record["tracking"] = track(cfg, record, run_dir)
    (run_dir / "results.json").write_text(_dumps(record))
    for name in (CHECKPOINT, CHECKPOINT_INFO):  # finished: the record is the result
        (run_dir / name).unlink(missing_ok=True)
    if progress:
        print(format_summary(record))
    print(f"run directory: {run_dir}")
    return record


def execute_tta(
    cfg: DictConfig,
    typed: dict[str, Any],
    run_dir: Path,
    scenario: Any,
    backbone: Any,
    strategy_cls: Any,
    device: torch.device,
    wall0: float,
) -> dict[str, Any]:
    """A continual test-time-adaptation run: source model, strategy, online protocol."""
    progress = bool(cfg.progress)
    model = source_classifier(backbone, scenario, progress=progress)
    seed_everything(int(cfg.seed))  # a source model trained just now must not shift it
    strategy = strategy_cls(
        model=model,
        cfg=typed["strategy"],
        seed=int(cfg.seed),
        device=device,
        scenario_meta=scenario.meta,
    )
    setup0 = time.perf_counter()
    source = scenario.benchmark.streams.get("source")
    strategy.setup(source[0].dataset if source is not None else None)
    setup_seconds = time.perf_counter() - setup0

    def on_domain(t: int, domain: str, error: float) -> None:
        if progress:
            print(f"  domain {t + 1:>2} {domain:<22} online error {error:.3f}", file=sys.stderr)

    result = run_tta(scenario, strategy, seed=int(cfg.seed), on_domain=on_domain)
    return build_tta_record(
        cfg, run_dir, scenario, backbone, strategy, result, wall0, setup_seconds
    )


def save_checkpoint(
    cfg: DictConfig,
    run_dir: Path,
    strategy: Any,
    result: ClassIncrementalResult,
    sweep_id: str | None,
) -> None:
    """Atomically write the learner state after an experience (then a small JSON beside it)."""
    done = len(result.accuracy_matrix)
    state = {
        "format": 1,
        "config": to_container(cfg),
        "experiences_done": done,
        "strategy": strategy,  # the model, adapters and method state travel with it
        "result": result,
        "rng": rng_state(),
        "sweep_id": sweep_id,
    }
    tmp = run_dir / f".{CHECKPOINT}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, run_dir / CHECKPOINT)
    info = {"experiences_done": done, "of": len(result.test_sizes)}
    (run_dir / CHECKPOINT_INFO).write_text(json.dumps(info) + "\n")


def load_checkpoint(
    cfg: DictConfig, run_dir: Path, progress_plugin: Any, device: Any
) -> tuple[Any, ClassIncrementalResult, str | None]:
    """The strategy, results so far and sweep id of ``run_dir``'s checkpoint; RNGs restored.

    The checkpoint is a pickle: resume only run directories you made yourself.
    """
    path = run_dir / CHECKPOINT
    if not path.is_file():
        if (run_dir / "results.json").is_file():
            raise ClbenchError(f"nothing to resume: {run_dir} has finished (results.json)")
        raise ClbenchError(
            f"nothing to resume in {run_dir}: no checkpoint (the run stopped before its "
            "first experience ended); start it again"
        )
    state = torch.load(path, map_location=device, weights_only=False)
    if state.get("config") != to_container(cfg):
        raise ClbenchError(
            f"the checkpoint in {run_dir} was made with another configuration; "
            "resume with the run's own config (clbench resume RUN_DIR)"
        )
    strategy = state["strategy"]
    keep = [p for p in strategy.plugins if not isinstance(p, ProgressPlugin)]
    strategy.plugins = [progress_plugin, *keep]
    strategy.device = device
    strategy.model.to(device)
    set_rng_state(state["rng"])
    print(f"resuming {run_dir} after experience {state['experiences_done']}", file=sys.stderr)
    return strategy, state["result"], state.get("sweep_id")


def build_record(
    cfg: DictConfig,
    run_dir: Path,
    scenario: Any,
    backbone: Any,
    strategy: Any,
    result: ClassIncrementalResult,
    wall0: float,
) -> dict[str, Any]:
    metrics = result.metrics()
    steps_total = sum(result.train_steps)
    train_total = sum(result.train_seconds)
    per_step = []
    for t, row in enumerate(result.accuracy_matrix):
        sizes = result.test_sizes[: t + 1]
        seen = sum(a * n for a, n in zip(row[: t + 1], sizes, strict=True)) / sum(sizes)
        per_step.append(
            {
                "accuracy_seen": seen,
                "accuracy_current": row[t],
                "train_seconds": result.train_seconds[t],
            }
        )
    return {
        **_identity(cfg, run_dir, scenario, backbone, strategy),
        "classes_per_experience": result.classes_per_experience,
        "test_sizes": result.test_sizes,
        "accuracy_matrix": result.accuracy_matrix,
        "accuracy_matrix_task_aware": result.accuracy_matrix_task_aware,
        "initial_accuracy": result.initial_accuracy,
        "initial_accuracy_task_aware": result.initial_accuracy_task_aware,
        "metrics": metrics,
        "steps": per_step,
        "efficiency": {
            "trainable_params": max(result.trainable_params),
            "inference_params": strategy.num_inference_parameters(),
            "backbone_params": backbone.meta["params"],
            "train_steps": steps_total,
            "seconds_per_step": train_total / max(steps_total, 1),
            "passes_per_train_sample": result.passes_per_train_sample,
            "passes_per_prediction": result.passes_per_prediction,
            "train_seconds": train_total,
            "eval_seconds": sum(result.eval_seconds),
            "wall_seconds": time.perf_counter() - wall0,
            "peak_rss_mb": peak_rss_mb(),
        },
    }


def _identity(
    cfg: DictConfig, run_dir: Path, scenario: Any, backbone: Any, strategy: Any
) -> dict[str, Any]:
    """The part of a run record every protocol shares: what ran, where, and its tags."""
    tags = {
        "scenario": scenario.name,
        "scenario_kind": scenario.kind,
        "strategy": cfg.strategy.name,
        "backbone": backbone.name,
        "backbone_source": backbone.source,
        "seed": str(cfg.seed),
        "git_commit": git_commit(),
        "clbench_version": clbench.__version__,
        "hardware": f"{platform.machine()} {torch.get_num_threads()} threads",
    }
    return {
        "clbench_version": clbench.__version__,
        "run_name": run_dir.name,
        "run_dir": str(run_dir),
        "scenario": scenario.name,
        "kind": scenario.kind,
        "strategy": cfg.strategy.name,
        "backbone": backbone.name,
        "seed": int(cfg.seed),
        "uses_task_id": bool(getattr(strategy, "uses_task_id", False)),
        "config": to_container(cfg),
        "class_names": scenario.class_names,
        "tags": tags,
    }


MB = 1024 * 1024


def build_tta_record(
    cfg: DictConfig,
    run_dir: Path,
    scenario: Any,
    backbone: Any,
    strategy: Any,
    result: TTAResult,
    wall0: float,
    setup_seconds: float,
) -> dict[str, Any]:
    images = sum(result.domain_sizes)
    return {
        **_identity(cfg, run_dir, scenario, backbone, strategy),
        "mode": result.mode,
        "domains": result.domains,
        "domain_sizes": result.domain_sizes,
        "online_error": result.online_error,
        "metrics": result.metrics(),
        "steps": [{"online_error": e} for e in result.online_error],
        "method_stats": strategy.stats(),
        "efficiency": {
            "trainable_params": strategy.num_trainable_parameters(),
            "inference_params": strategy.num_inference_parameters(),
            "backbone_params": backbone.meta["params"],
            "adapt_steps": result.steps,
            "adapt_seconds": result.adapt_seconds,
            "seconds_per_step": result.adapt_seconds / max(result.steps, 1),
            "images_per_second": images / max(result.adapt_seconds, 1e-9),
            "setup_seconds": setup_seconds,
            "backward_cache_mb": result.backward_cache_bytes / MB,
            "state_mb": result.state_bytes / MB,
            "adapt_memory_mb": (result.backward_cache_bytes + result.state_bytes) / MB,
            "cuda_peak_mb": None if result.cuda_peak_bytes is None else result.cuda_peak_bytes / MB,
            "wall_seconds": time.perf_counter() - wall0,
            "peak_rss_mb": peak_rss_mb(),
        },
    }


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(_clean(record), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_run_dir(record: dict[str, Any], run_dir: Path) -> None:
    """results.json, the resolved config and the plots."""
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(record["config"])))
    title = f"{record['strategy']} on {record['scenario']} (seed {record['seed']})"
    if record["kind"] == "test_time":
        plots.online_error_bars(
            record["domains"], record["online_error"], run_dir / "online_error.png", title
        )
        (run_dir / "results.json").write_text(_dumps(record))
        return
    plots.accuracy_heatmap(record["accuracy_matrix"], run_dir / "accuracy_matrix.png", title)
    plots.accuracy_curve(
        [s["accuracy_seen"] for s in record["steps"]], run_dir / "accuracy_curve.png", title
    )
    (run_dir / "results.json").write_text(_dumps(record))


def track(cfg: DictConfig, record: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Log to MLflow; a failure is reported in one line and never loses the run."""
    if not cfg.tracking.enabled:
        return {"status": "disabled"}
    uri = cfg.tracking.uri
    attempts = 1 + max(int(cfg.tracking.get("retries", 0)), 0)
    for attempt in range(attempts):
        try:
            run_id = tracking.log_run(record, run_dir, uri, cfg.tracking.experiment)
            return {"status": "ok", "uri": uri, "run_id": run_id}
        except Exception as e:  # any tracking failure: keep the run directory, say so
            first = first_line(e)
            if attempt + 1 < attempts:
                time.sleep(2.0**attempt)
    print(
        f"warning: MLflow tracking failed ({first}); the run directory is kept; upload it "
        f"later with: clbench sync {run_dir}",
        file=sys.stderr,
    )
    return {"status": "failed", "error": first, "uri": uri}


def sync_run_dir(
    run_dir: Path, uri: str | None = None, experiment: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Upload a finished run directory to MLflow (a run whose tracking failed or was off).

    ``uri`` / ``experiment`` default to the run's own tracking config. A run already
    tracked is left alone unless ``force``. On failure the directory is unchanged and a
    ClbenchError says why; on success results.json records the new MLflow run id.
    """
    path = run_dir / "results.json"
    if not path.is_file():
        raise ClbenchError(f"not a finished run directory (no results.json): {run_dir}")
    original = path.read_text()
    record = json.loads(original)
    status = record.get("tracking") or {}
    if status.get("status") == "ok" and not force:
        return {**status, "skipped": True}
    conf = (record.get("config") or {}).get("tracking") or {}
    uri = uri or conf.get("uri") or None
    experiment = experiment or conf.get("experiment") or "clbench"
    clean = {k: v for k, v in record.items() if k != "tracking"}
    path.write_text(_dumps(clean))  # the artifact is the record as an untroubled run logs it
    try:
        run_id = tracking.log_run(clean, run_dir, uri, experiment)
    except Exception as e:
        path.write_text(original)
        first = first_line(e)
        where = uri or "the default store"
        raise ClbenchError(f"sync of {run_dir} to {where} failed: {first}") from None
    record["tracking"] = {"status": "ok", "uri": uri, "run_id": run_id, "synced": True}
    path.write_text(_dumps(record))
    return record["tracking"]


def format_tta_summary(record: dict[str, Any]) -> str:
    """Online error per domain, the mean, clean accuracy kept, and the cost."""
    lines = [f"online error per domain ({record['mode']})"]
    for d, e in zip(record["domains"], record["online_error"], strict=True):
        lines.append(f"  {d:<24} {e:.4f}")
    for k, v in record["metrics"].items():
        lines.append(f"{k:>30}: {v:.4f}" if isinstance(v, float) else f"{k:>30}: n/a")
    e = record["efficiency"]
    lines.append(f"{'images per second':>30}: {e['images_per_second']:.1f}")
    lines.append(f"{'adaptation memory (MiB)':>30}: {e['adapt_memory_mb']:.2f}")
    return "\n".join(lines)


def format_summary(record: dict[str, Any]) -> str:
    """The accuracy matrix and the headline metrics as text."""
    if record["kind"] == "test_time":
        return format_tta_summary(record)
    a = record["accuracy_matrix"]
    n = len(a[0])
    lines = ["accuracy matrix R[t][i] (rows: after experience t, columns: test experience i)"]
    lines.append("      " + " ".join(f"{j + 1:>6}" for j in range(n)))
    for i, row in enumerate(a):
        lines.append(f"{i + 1:>5} " + " ".join(f"{v:6.3f}" for v in row))
    m = record["metrics"]
    for k in HEADLINE:
        v = m.get(k)
        lines.append(
            f"{k:>30}: {v:.4f}" if isinstance(v, float) and math.isfinite(v) else f"{k:>30}: n/a"
        )
    e = record["efficiency"]
    lines.append(f"{'trainable params':>30}: {e['trainable_params']}")
    lines.append(f"{'train seconds':>30}: {e['train_seconds']:.1f}")
    return "\n".join(lines)
