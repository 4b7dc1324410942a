"""What a backbone builder returns: a feature extractor that knows how to classify.

A :class:`Backbone` declares the input shapes it accepts, what counts as one backbone
pass (its ``stem``: the layer every sample goes through exactly once per pass) and
builds the classifier strategies train (:meth:`Backbone.classifier`: a growing linear
head on pooled features; :class:`clbench.backbones.clip.ClipBackbone` classifies with
the text embeddings of the class names instead). A backbone over precomputed features
(slide bags of patch features) is :func:`precomputed_features`.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

Shape = tuple[int | None, ...]


def torch_load_failure(e: BaseException) -> str:
    """One line for a failed ``torch.load(..., weights_only=True)``: the global it refused
    to unpickle (a checkpoint that would run code), or why the file is unreadable.
    (torch's own message is a paragraph suggesting to turn the weights-only mode off.)"""
    text = " ".join(str(e).split())
    refused = re.search(r"unsupported GLOBAL (\S+?)[ .]*(?:whose|$)", text, re.I) or re.search(
        r"Unsupported global: GLOBAL (\S+)", text
    )
    if refused:
        return f"refused to unpickle {refused.group(1)} (only tensors are loaded, no code is run)"
    if isinstance(e, pickle.UnpicklingError):
        operand = re.search(r"Unsupported operand \S+", text)
        why = operand.group(0) if operand else "not a pickle of tensors"
        return f"not a torch.save file of tensors ({why})"
    return f"{type(e).__name__}: {text.split('. ')[0]}"


def unwrap_state_dict(state: Any) -> dict[str, Any] | None:
    """The ``{name: tensor}`` state dict inside a loaded checkpoint (``{"state_dict": ...}``
    and ``{"model": ...}`` unwrapped, DataParallel's ``module.`` prefix dropped), or None
    if it holds anything else."""
    import torch

    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        return None
    return {k.removeprefix("module."): v for k, v in state.items()}


@dataclass
class Backbone:
    """A feature extractor: ``module(x)`` -> (N, feature_dim) pooled features."""

    name: str
    module: nn.Module
    feature_dim: int
    input_shape: tuple[int | None, ...]  # the shape of one input it is used at, e.g. (C, H, W)
    source: str  # where the weights come from (provenance, logged with the run)
    #: every shape of one input it accepts (``None``: any size); default ``(input_shape,)``
    input_shapes: tuple[Shape, ...] = ()
    #: qualified name, inside ``module``, of the layer one pass takes each sample through
    #: once (a ViT's ``patch_embed``): passes are counted there; None: not counted
    stem: str | None = None
    #: a classifier that came with the weights (a RobustBench checkpoint's ``fc``): the
    #: backbone plus this head is a ready source model
    head: nn.Linear | None = None
    #: classifiers of other tasks that came with the weights, by task id (the micro ViT's
    #: glyph head, pretrained with it): a scenario whose source data has that id starts
    #: from the backbone plus that head (``clbench.pretrain.source.source_classifier``)
    task_heads: dict[str, nn.Linear] = field(default_factory=dict)
    #: how images must reach the weights (timm's data config: ``input_size`` (C, H, W),
    #: ``mean``, ``std``, ``interpolation``, ``crop_pct``): a scenario reading image files
    #: sets its transforms from it (``Scenario.configure_inputs``); None: the module takes
    #: the scenario's tensors as they are (the embedded formats)
    data_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.input_shapes:
            self.input_shapes = (tuple(self.input_shape),)

    def classifier(self, class_names: Sequence[str]) -> nn.Module:
        """The model strategies train: ``.backbone`` (this module) and a growing ``.head``."""
        from clbench.models import ClassifierModel

        return ClassifierModel(self.module, self.feature_dim)

    def use_prepared_inputs(self) -> None:
        """Called when the scenario's transforms follow :attr:`data_config` (resized and
        normalised as the weights expect): a module that adapts raw inputs itself (CLIP's
        grey-to-RGB, resize and normalisation of the embedded formats) stops doing so."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def accepts(self, shape: Sequence[int]) -> bool:
        """Whether one input of ``shape`` fits."""
        return any(
            len(s) == len(shape) and all(a is None or a == b for a, b in zip(s, shape, strict=True))
            for s in self.input_shapes
        )

    def describe_inputs(self) -> str:
        """The accepted shapes as text, e.g. ``(1, 16, 16) or (3, 16, 16)``."""
        return " or ".join(
            "(" + ", ".join("any" if d is None else str(d) for d in s) + ")"
            for s in self.input_shapes
        )

    def pass_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules of ``model`` (a classifier built from this backbone, possibly a copy
        restored from a checkpoint) whose forward counts one backbone pass per sample."""
        root = getattr(model, "backbone", None)
        if self.stem is None or not isinstance(root, nn.Module):
            return []
        try:
            return [root.get_submodule(self.stem)]
        except AttributeError:
            return []


class _Bag(nn.Module):
    """Identity over a bag of precomputed instance features (N, D)."""

    def forward(self, x: Any) -> Any:
        return x


def precomputed_features(name: str, feature_dim: int, source: str) -> Backbone:
    """A backbone over precomputed features: one input is a bag of ``N`` feature vectors
    ``(N, feature_dim)`` for any ``N`` (patch features of a slide), passed through as
    they are; nothing is counted as a backbone pass."""
    return Backbone(
        name=name,
        module=_Bag(),
        feature_dim=feature_dim,
        input_shape=(None, feature_dim),
        source=source,
    )
