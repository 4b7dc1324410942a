"""The source model of a test-time-adaptation scenario, trained once and cached.

A test-time strategy starts from a classifier trained on clean source data. A backbone
loaded from a classifier checkpoint (RobustBench's WRN-28-10) already is one. Otherwise
the backbone and a linear head are trained on the scenario's labelled source stream with
a fixed recipe (Adam, cosine schedule, batch 64, full fine-tuning) and the weights are
cached in the clbench cache, keyed by everything that changes them, like the pretrained
micro ViT.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from clbench.backbones.base import Backbone
from clbench.data import TensorBatches, materialise
from clbench.errors import ClbenchError, first_line
from clbench.models import ClassifierModel
from clbench.pretrain.train import _save_atomic, cache_dir

RECIPE_VERSION = 1
BATCH_SIZE = 64


@dataclass(frozen=True)
class SourceRecipe:
    """How the source model is trained on the scenario's labelled source stream when the
    backbone does not come with a classifier (see ``clbench.pretrain.source``)."""

    data_id: str  # names the source data in the cache key
    epochs: int
    lr: float
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "lr": self.lr, "seed": self.seed}


def _cache_path(backbone: Backbone, source_id: str, recipe: dict[str, Any]) -> Path:
    shapes = [[k, list(v.shape)] for k, v in sorted(backbone.module.state_dict().items())]
    key = {
        "backbone": backbone.name,
        "backbone_source": backbone.source,
        "shapes": shapes,
        "source": source_id,
        "recipe": recipe,
        "version": RECIPE_VERSION,
        "batch_size": BATCH_SIZE,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "source_models" / f"{backbone.name}-{digest}.safetensors"


@torch.no_grad()
def _accuracy(model: ClassifierModel, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    hits = sum(
        int((model(x[i : i + 256]).argmax(1) == y[i : i + 256]).sum())
        for i in range(0, len(x), 256)
    )
    return hits / len(x)


def source_classifier(backbone: Backbone, scenario: Any, progress: bool = True) -> ClassifierModel:
    """The scenario's source model on ``backbone``: loaded, cached or trained (eval mode)."""
    n_classes = len(scenario.class_names)
    model = ClassifierModel(backbone.module, backbone.feature_dim)
    source_recipe = getattr(scenario.stream, "source", None)
    head = backbone.head
    if head is None and source_recipe is not None:
        head = backbone.task_heads.get(source_recipe.data_id)
    if head is not None:
        if head.out_features != n_classes:
            raise ClbenchError(
                f"the {backbone.name} checkpoint classifies {head.out_features} classes but "
                f"scenario {scenario.name} has {n_classes}"
            )
        model.head.fc = head
        return model.eval()
    streams = scenario.benchmark.streams
    if "source" not in streams or source_recipe is None:
        raise ClbenchError(
            f"scenario {scenario.name} has no source data to train a source model on; give a "
            "backbone loaded from a classifier checkpoint (e.g. backbone=wrn_28_10 "
            "backbone.checkpoint=PATH)"
        )
    model.head.grow(n_classes)
    recipe = source_recipe.as_dict()
    path = _cache_path(backbone, source_recipe.data_id, recipe)
    if path.is_file():
        try:  # safetensors: tensors and a JSON header, nothing is unpickled
            model.load_state_dict(load_file(str(path)), strict=True)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ClbenchError(
                f"the cached source model {path} is corrupt ({type(e).__name__}: "
                f"{first_line(e)}); delete it and run again: it is retrained "
                f"(rm {shlex.quote(str(path))})"
            ) from None
        return model.eval()
    x, y = materialise(streams["source"][0].dataset)[:2]
    epochs, lr, seed = int(recipe["epochs"]), float(recipe["lr"]), int(recipe["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.head.fc.reset_parameters()
        batches = TensorBatches(
            [x, y], BATCH_SIZE, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        total = epochs * len(batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total))
        )
        model.train()
        bar = tqdm(total=total, desc=f"source model ({backbone.name})", disable=not progress)
        for _ in range(epochs):
            for xb, yb in batches:
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                bar.update(1)
        bar.close()
    accuracy = _accuracy(model, x, y)
    metadata = {
        "format": "clbench.source_model/1",
        "backbone": backbone.name,
        "backbone_source": backbone.source,
        "source": source_recipe.data_id,
        "recipe": json.dumps(recipe, sort_keys=True),
        "train_accuracy": f"{accuracy:.4f}",
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _save_atomic(state, metadata, path)
    if progress:
        tqdm.write(f"source model trained (train accuracy {accuracy:.3f}): {path}")
    return model.eval()


def start_classifier(backbone: Backbone, path: str, class_names: list[str]) -> ClassifierModel:
    """A classifier trained elsewhere on every class: ``backbone`` and a linear head of
    ``len(class_names)`` units, loaded from the safetensors file ``path`` (the state dict
    of :class:`~clbench.models.ClassifierModel`: ``backbone.*`` and ``head.fc.*``)."""
    model = ClassifierModel(backbone.module, backbone.feature_dim)
    model.head.grow(len(class_names))
    file = Path(path).expanduser()
    if not file.is_file():
        raise ClbenchError(f"start model not found: {str(file)!r}; give a .safetensors file")
    try:  # safetensors: tensors and a JSON header, nothing is unpickled
        model.load_state_dict(load_file(str(file)), strict=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ClbenchError(
            f"{file} is not a {backbone.name} classifier of {len(class_names)} classes "
            f"({type(e).__name__}: {first_line(e)}); save ClassifierModel.state_dict() "
            "with safetensors"
        ) from None
    return model.eval()
