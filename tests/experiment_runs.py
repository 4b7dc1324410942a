"""What tests/test_experiments_cifar100.py and tests/test_experiments_imagenet_r.py share:
the paper configurations of conf/experiment, read as files, and the overrides that shrink
one to a smoke run (a tiny fixture of the benchmark's on-disk layout, timm's 6-block
``test_vit`` or ``clip_tiny``, one epoch, two experiences)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

EXPERIMENTS = Path(__file__).resolve().parents[1] / "conf" / "experiment"

#: benchmark suffix of an experiment file -> the scenario it runs, its first experience's
#: classes, and the classes of the fixture tests run it on
BENCHMARKS = {
    "cifar100": {"scenario": "split_cifar100", "init_cls": 10},
    "imagenet_r": {"scenario": "imagenet_r", "init_cls": 20},
}

#: class-incremental strategies without paper configurations, and why (docs: "Paper
#: configurations")
EXCLUDED = {
    "dst": "sparse training of a CNN from scratch on 32x32 CIFAR-100, task-incremental "
    "(MobileNetV2 / ResNet-18); masking a pretrained ViT-B/16 is not its method",
    "sparcl": "sparse DER++ on a ResNet-18 from scratch (Seq-CIFAR-10 / Tiny-ImageNet); its "
    "masks prune convolutions, which a ViT-B/16 has one of",
}

#: timm's 6-block, 64-wide test ViT at 32 px: the vit_b16 module names at a fraction of
#: vit_tiny's cost
SMALL_VIT = [
    "backbone.model=test_vit",
    "backbone.tag=r160_in1k",
    "backbone.pretrained=none",
    "backbone.img_size=32",
]
SMALL_CLIP = ["backbone=clip_tiny", "backbone.image_size=16"]

#: per strategy, the paper keys a smoke run must change, and why
SMOKE_KEYS: dict[str, dict[str, Any]] = {
    # CODA-Prompt keeps its 100 components orthogonal (Gram-Schmidt), which needs at least as
    # many dimensions: the test ViT is 64 wide
    "coda_prompt": {"pool_size": 20},
    # LwF warms the new head units up for as many epochs as it trains (20)
    "lwf": {"warmup_epochs": 1},
}


def names(benchmark: str) -> list[str]:
    """The experiments of one benchmark (file stems)."""
    return sorted(p.stem for p in EXPERIMENTS.glob(f"*_{benchmark}.yaml"))


def load(name: str) -> DictConfig:
    return OmegaConf.load(EXPERIMENTS / f"{name}.yaml")


def choices(name: str) -> dict[str, str]:
    """The defaults list's overrides: {"scenario": ..., "backbone": ..., "strategy": ...}."""
    out = {}
    for item in load(name).defaults:
        if isinstance(item, str):  # _self_
            continue
        for key, value in item.items():
            out[key.removeprefix("override /")] = value
    return out


def block(name: str, group: str) -> dict[str, Any]:
    """The values the experiment sets in one group (scenario, backbone, strategy)."""
    node = load(name).get(group)
    return {} if node is None else OmegaConf.to_container(node, resolve=False)


def mismatches(expected: dict[str, Any], actual: Any) -> dict[str, tuple[Any, Any]]:
    """{key: (expected, actual)} for every key whose value differs (a dataclass or mapping)."""
    get = (lambda k: actual.get(k)) if isinstance(actual, dict) else (lambda k: getattr(actual, k))
    out = {}
    for key, want in expected.items():
        got = get(key)
        if isinstance(got, tuple):
            got = list(got)
        if dataclasses.is_dataclass(got):
            got = dataclasses.asdict(got)
        if got != want:
            out[key] = (want, got)
    return out


def smoke_overrides(name: str, root: Path, n_classes: int, runs_dir: Path) -> list[str]:
    """``clbench run`` arguments: the experiment shrunk to two experiences of a fixture."""
    strategy = choices(name)["strategy"]
    half = n_classes // 2
    small = SMALL_CLIP if choices(name)["backbone"].startswith("clip") else SMALL_VIT
    return [
        "run",
        f"+experiment={name}",
        f"scenario.root={root}",
        "scenario.n_experiences=2",
        f"scenario.init_cls={half}",
        f"scenario.increment={half}",
        "scenario.num_workers=0",
        *small,
        "strategy.epochs=1",
        *(f"strategy.{k}={v}" for k, v in SMOKE_KEYS.get(strategy, {}).items()),
        "device=cpu",
        "threads=1",
        "tracking=none",
        "progress=false",
        "checkpoint=false",
        f"runs_dir={runs_dir}",
    ]


def smoke_changed(name: str) -> set[str]:
    """The strategy keys a smoke run changes."""
    return {"epochs", *SMOKE_KEYS.get(choices(name)["strategy"], {})}


def check_composes(name: str, root: Path) -> None:
    """The experiment composes as ``clbench run`` composes it, validates, and every value
    it sets reaches the typed configuration of the run (none dropped or overridden)."""
    from clbench.config import check_overrides, validate

    benchmark = next(b for b in BENCHMARKS if name.endswith(f"_{b}"))
    (cfg,) = check_overrides([f"+experiment={name}", f"scenario.root={root}"])
    typed = validate(cfg)
    picked = choices(name)
    assert typed["scenario"].name == BENCHMARKS[benchmark]["scenario"] == picked["scenario"]
    assert typed["strategy"].name == picked["strategy"] == name.removesuffix(f"_{benchmark}")
    # the papers' protocol: 10 tasks, PILOT's seed-1993 class order, fp32
    scenario = typed["scenario"]
    assert (scenario.n_experiences, scenario.shuffle, scenario.class_order_seed) == (10, True, 1993)
    assert scenario.init_cls == scenario.increment == BENCHMARKS[benchmark]["init_cls"]
    assert cfg.precision == "fp32"
    if picked["backbone"] == "vit_b16":
        bb = typed["backbone"]
        assert (bb.model, bb.tag, bb.pretrained) == ("vit_base_patch16_224", "augreg_in21k", "hub")
    else:
        assert picked["backbone"] == "clip_vit_b16"
        assert (typed["backbone"].model, typed["backbone"].pretrained) == ("ViT-B-16", "openai")
    for group in ("scenario", "backbone", "strategy"):
        assert mismatches(block(name, group), typed[group]) == {}, group


def check_smoke_run(name: str, root: Path, n_classes: int, runs_dir: Path) -> dict:
    """The experiment runs end to end on the fixture; returns its results.json."""
    import json

    from helpers import only_run_dir, run_cli

    out = runs_dir / name
    assert run_cli(smoke_overrides(name, root, n_classes, out)) == 0
    results = json.loads((only_run_dir(out) / "results.json").read_text())
    picked = choices(name)
    assert (results["scenario"], results["strategy"]) == (picked["scenario"], picked["strategy"])
    assert [len(row) for row in results["accuracy_matrix"]] == [2, 2]
    assert [len(c) for c in results["classes_per_experience"]] == [n_classes // 2] * 2
    # the run trained with the paper's values, apart from the ones the smoke run shrinks
    strategy = block(name, "strategy")
    for key in smoke_changed(name):
        strategy.pop(key, None)
    assert mismatches(strategy, results["config"]["strategy"]) == {}
    assert results["config"]["precision"] == "fp32"
    return results
