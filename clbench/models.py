"""The classifiers strategies train: a backbone and a head that grows as classes arrive.

:class:`ClassifierModel` puts a growing linear head on pooled features;
:class:`ClipClassifier` classifies with a CLIP model's text embeddings of the class
names (a prompt template) instead. Both expose ``.backbone`` and ``.head`` (``grow``,
``num_classes``, ``reset``), which is all the strategies rely on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def empty_linear(in_features: int) -> nn.Linear:
    """A linear layer with no output unit yet (torch warns about initialising it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return nn.Linear(in_features, 0)


class GrowingHead(nn.Module):
    """A head whose classes grow (``num_classes``, ``grow``, ``reset``); its shape is the
    number of classes, which a checkpoint records (``clbench.adapters.state``)."""

    num_classes: int

    def grow(self, num_classes: int) -> bool:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def structure(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def restore_structure(self, spec: dict[str, Any]) -> None:
        if self.num_classes != spec["num_classes"]:
            self.reset()
            self.grow(int(spec["num_classes"]))


class IncrementalHead(GrowingHead):
    """A linear head whose output units grow as classes arrive (old units are kept)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.fc = empty_linear(in_features)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    @torch.no_grad()
    def grow(self, num_classes: int) -> bool:
        """Ensure at least ``num_classes`` outputs; True if the head changed."""
        old = self.fc
        if num_classes <= old.out_features:
            return False
        new = nn.Linear(self.in_features, num_classes).to(old.weight.device, old.weight.dtype)
        new.weight[: old.out_features] = old.weight
        new.bias[: old.out_features] = old.bias
        self.fc = new
        return True

    def reset(self) -> None:
        """Drop every output unit."""
        self.fc = empty_linear(self.in_features).to(self.fc.weight.device, self.fc.weight.dtype)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats)


class ClassifierModel(nn.Module):
    """``head(backbone(x))``; the backbone returns pooled features of size ``feature_dim``."""

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = IncrementalHead(feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class TextHead(GrowingHead):
    """The prompts of the classes seen so far, tokenised; the "weights" are their embeddings.

    Class ``i`` is ``class_names[i]`` formatted into ``template``; growing to ``n`` classes
    tokenises the first ``n`` names (labels are positions in arrival order).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        template: str,
        tokenizer: Callable[[list[str]], torch.Tensor],
    ) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.template = template
        self.tokenizer = tokenizer
        self.register_buffer("tokens", torch.zeros(0, 0, dtype=torch.long), persistent=False)
        self.version = 0  # bumped whenever the classes change

    @property
    def num_classes(self) -> int:
        return int(self.tokens.shape[0])

    def prompts(self, n: int | None = None) -> list[str]:
        """The prompts of the first ``n`` classes (default: the head's)."""
        n = self.num_classes if n is None else n
        return [self.template.format(name) for name in self.class_names[:n]]

    def grow(self, num_classes: int) -> bool:
        """Ensure at least ``num_classes`` classes; True if the head changed."""
        if num_classes <= self.num_classes:
            return False
        if num_classes > len(self.class_names):
            raise ValueError(
                f"the head knows {len(self.class_names)} class names, {num_classes} asked for"
            )
        self.tokens = self.tokenizer(self.prompts(num_classes)).to(self.tokens.device)
        self.version += 1
        return True

    def reset(self) -> None:
        """Forget every class."""
        self.tokens = self.tokens.new_zeros(0, 0)
        self.version += 1

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, template={self.template!r}"


class ClipClassifier(nn.Module):
    """Zero-shot-style CLIP classifier: ``logit_scale * cos(image, text of each class)``.

    ``backbone`` is the whole open_clip model (so LoRA can go into either tower),
    ``head`` a :class:`TextHead`, ``input_adapter`` maps scenario images to the image
    tower's input. The text embeddings are recomputed at every forward while they can get
    gradients (grad mode on and a text-tower parameter requiring grad); otherwise they are
    cached, keyed on the head's version (bumped by ``grow``), the train/eval mode, a
    version bumped by ``train()`` and :meth:`invalidate`, and the identity, storage and
    in-place version of every text parameter (so optimiser steps, ``load_state_dict``,
    LoRA merges and device moves invalidate it). Call :meth:`invalidate` after changing a
    weight through ``.data``.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        class_names: Sequence[str],
        template: str = "a photo of a {}.",
        input_adapter: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(getattr(clip, "visual", None), nn.Module):
            raise TypeError("ClipClassifier needs an open_clip CLIP model (with .visual)")
        self.backbone = clip
        self.head = TextHead(class_names, template, tokenizer)
        self.input_adapter = input_adapter if input_adapter is not None else nn.Identity()
        self._version = 0
        self._cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

    def invalidate(self) -> None:
        """Drop the cached text embeddings."""
        self._version += 1
        self._cache = None

    def train(self, mode: bool = True) -> ClipClassifier:
        self.invalidate()
        return super().train(mode)

    def text_parameters(self) -> list[nn.Parameter]:
        """Parameters of the text tower (everything outside ``.visual`` but the logit scale)."""
        return [
            p
            for n, p in self.backbone.named_parameters()
            if not n.startswith("visual.") and n not in ("logit_scale", "logit_bias")
        ]

    def _encode_text(self) -> torch.Tensor:
        return F.normalize(self.backbone.encode_text(self.head.tokens), dim=-1)

    def text_features(self) -> torch.Tensor:
        """(num_classes, embed_dim) L2-normalised text embeddings of the class prompts."""
        params = self.text_parameters()
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            self._cache = None
            return self._encode_text()
        key = (
            self._version,
            self.backbone.training,
            self.head.version,
            tuple((id(p), p._version, p.data_ptr()) for p in params),
        )
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self._encode_text())
        return self._cache[1]

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, embed_dim) L2-normalised image embeddings."""
        return F.normalize(self.backbone.encode_image(self.input_adapter(x)), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = self.image_features(x)
        if self.head.num_classes == 0:
            return image.new_zeros(image.shape[0], 0)
        logits = self.backbone.logit_scale.exp() * image @ self.text_features().T
        bias = getattr(self.backbone, "logit_bias", None)
        return logits if bias is None else logits + bias
