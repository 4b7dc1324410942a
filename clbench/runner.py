"""One run: config -> scenario, backbone, strategy -> protocol -> run record -> MLflow.

The runner knows no scenario kind: the scenario's kind picks its protocol from
:data:`clbench.registry.PROTOCOLS`, and the protocol builds and runs the learner and
makes its part of the run record, its plots and its summary.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import clbench
from clbench import tracking
from clbench.config import resolve_device, to_container, validate
from clbench.errors import ClbenchError
from clbench.precision import apply_precision, set_deterministic
from clbench.protocols.base import Protocol, RunContext, protocol_for
from clbench.record import RunRecord, write_text_atomic
from clbench.registry import BACKBONES, SCENARIOS, STRATEGIES
from clbench.resources import peak_rss_mb, set_threads
from clbench.seeding import seed_everything


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


def execute(
    cfg: DictConfig, run_dir: Path, sweep_id: str | None = None, resume: bool = False
) -> RunRecord:
    """Run one configured job into ``run_dir``; returns its run record (results.json).

    ``sweep_id`` (a multirun's sweep directory name) becomes the ``sweep_id`` tag. With
    ``resume`` a resumable protocol continues from the checkpoint in ``run_dir`` and ends
    as the uninterrupted run would have.
    """
    wall0 = time.perf_counter()
    typed = validate(cfg)
    set_threads(cfg.get("threads"))
    device = resolve_device(cfg.device)
    # before any CUDA work of the job (cuBLAS reads its workspace setting at its first call)
    set_deterministic(bool(cfg.get("deterministic", True)))
    seed_everything(int(cfg.seed))
    run_dir.mkdir(parents=True, exist_ok=True)

    scenario = SCENARIOS.get(cfg.scenario.name)(typed["scenario"])
    backbone = BACKBONES.get(cfg.backbone.name)(typed["backbone"])
    if scenario.configure_inputs(backbone.data_config):
        backbone.use_prepared_inputs()
    if not backbone.accepts(scenario.input_shape):
        raise ClbenchError(
            f"backbone {backbone.name!r} takes inputs {backbone.describe_inputs()} but "
            f"scenario {scenario.name!r} gives {tuple(scenario.input_shape)}; pick a matching "
            "backbone"
        )
    protocol = protocol_for(scenario.kind, scenario.name)
    strategy_cls = STRATEGIES.get(cfg.strategy.name)
    protocol.check_strategy(cfg.strategy.name, strategy_cls)
    seed_everything(int(cfg.seed))  # building the scenario/backbone must not shift the seed
    ctx = RunContext(
        cfg=cfg,
        typed=typed,
        scenario=scenario,
        backbone=backbone,
        strategy_cls=strategy_cls,
        run_dir=run_dir,
        device=device,
        seed=int(cfg.seed),
        progress=bool(cfg.progress),
        checkpoint=bool(cfg.get("checkpoint", True)) and protocol.resumable,
        sweep_id=sweep_id,
    )
    if resume:
        learner, resumed = protocol.resume(ctx)
    else:
        learner, resumed = protocol.build(ctx), None
    # the protocol built the learner (and ran its setup: source training, Fisher... in
    # float32); its training and evaluation passes run in the configured precision
    apply_precision(learner, str(cfg.get("precision", "fp32")))
    result = protocol.run(ctx, learner, resumed)
    part = protocol.record(ctx, learner, result)
    record = RunRecord(
        **identity(ctx, learner),
        metrics=part.metrics,
        steps=part.steps,
        efficiency={
            **part.efficiency,
            "backbone_params": backbone.num_parameters(),
            "wall_seconds": time.perf_counter() - wall0,
            "peak_rss_mb": peak_rss_mb(),
        },
        fields=part.fields,
    )
    return finish(ctx, protocol, record)


def hardware(device: torch.device) -> str:
    """The ``hardware`` tag: the CPU architecture and torch threads, and the GPU's name
    when the run uses one (``x86_64 16 threads, NVIDIA H100 80GB HBM3``)."""
    text = f"{platform.machine()} {torch.get_num_threads()} threads"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def identity(ctx: RunContext, learner: Any) -> dict[str, Any]:
    """The part of a run record every protocol shares: what ran, where, and its tags."""
    cfg, scenario, backbone = ctx.cfg, ctx.scenario, ctx.backbone
    tags = {
        "scenario": scenario.name,
        "scenario_kind": scenario.kind,
        "strategy": cfg.strategy.name,
        "backbone": backbone.name,
        "backbone_source": backbone.source,
        "seed": str(cfg.seed),
        "git_commit": git_commit(),
        "clbench_version": clbench.__version__,
        "hardware": hardware(ctx.device),
        "precision": str(cfg.get("precision", "fp32")),
    }
    if ctx.sweep_id:
        tags["sweep_id"] = ctx.sweep_id
    return {
        "clbench_version": clbench.__version__,
        "run_name": ctx.run_dir.name,
        "run_dir": str(ctx.run_dir),
        "scenario": scenario.name,
        "kind": scenario.kind,
        "strategy": cfg.strategy.name,
        "backbone": backbone.name,
        "seed": int(cfg.seed),
        "uses_task_id": bool(getattr(learner, "uses_task_id", False)),
        "config": to_container(cfg),
        "class_names": list(scenario.class_names),
        "tags": tags,
    }


def finish(ctx: RunContext, protocol: Protocol, record: RunRecord) -> RunRecord:
    """Plots and config into the run directory, tracking, then results.json (written
    once, with the tracking status), then the protocol drops its checkpoint."""
    run_dir = ctx.run_dir
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(record.config)))
    protocol.plots(record, run_dir)
    record.tracking = track(ctx.cfg, record, run_dir)
    record.write(run_dir / "results.json")
    protocol.finished(run_dir)
    if ctx.progress:
        print(protocol.summary(record))
    print(f"run directory: {run_dir}")
    return record


def track(cfg: DictConfig, record: RunRecord, run_dir: Path) -> dict[str, Any]:
    """Log to MLflow; a failure is reported in one line and never loses the run."""
    if not cfg.tracking.enabled:
        return {"status": "disabled"}
    uri = cfg.tracking.uri
    attempts = 1 + max(int(cfg.tracking.get("retries", 0)), 0)
    timeout = int(cfg.tracking.get("timeout", tracking.DEFAULT_TIMEOUT))
    for attempt in range(attempts):  # worst case: attempts x 2 requests x timeout + 1+2+.. s
        try:
            run_id = tracking.log_run(record, run_dir, uri, cfg.tracking.experiment, timeout)
            return {"status": "ok", "uri": uri, "run_id": run_id}
        except Exception as e:  # any tracking failure: keep the run directory, say so
            first = tracking.describe_error(e, timeout)
            if attempt + 1 < attempts:
                time.sleep(2.0**attempt)
    print(
        f"warning: MLflow tracking failed ({uri or 'the default store'}: {first}); the run "
        f"directory is kept; upload it later with: clbench sync {run_dir}",
        file=sys.stderr,
    )
    return {"status": "failed", "error": first, "uri": uri}
