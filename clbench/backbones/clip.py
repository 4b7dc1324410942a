"""CLIP backbones (open_clip): the image tower encodes, the class names' prompts classify.

A CLIP backbone (:class:`ClipBackbone`) has the whole open_clip ``CLIP`` model (both
towers) as its ``module`` and builds its own classifier
(:class:`clbench.models.ClipClassifier`) from the ``tokenizer``, the prompt ``template``
and the ``input_adapter`` that turns a scenario's images into what the image tower takes.
Grey (1-channel) inputs are repeated to RGB by that adapter, so the towers keep
open_clip's standard architecture and parameter names; ``input_shapes`` lists the
(C, H, W) shapes accepted (``None``: any size, resized to the tower's). One backbone pass
is one sample through the image tower's stem (``visual.conv1``).

- ``clip_tiny``: a tiny, randomly initialised CLIP built locally (offline, for tests and
  quick runs on 16x16 digits), seeded by the global torch seed.
- ``clip_vit_b16``: open_clip's ViT-B-16 with real weights: an open_clip pretrained tag
  (``openai``; downloaded, so only on a connected machine) or a local weights file.

Both declare ``data_config`` (open_clip's preprocessing: ``image_size``, the weights' mean
/ std (OpenAI's by default), bicubic, resize the shorter side then centre-crop): a
scenario reading image files prepares its images that way, and then
:meth:`ClipBackbone.use_prepared_inputs` turns the adapter into a pass-through (the
embedded scenarios' tensors keep being adapted as before).

open_clip is imported lazily, so listing components does not pay for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clbench.backbones.base import Backbone, torch_load_failure
from clbench.errors import ClbenchError, ConfigError, first_line

DEFAULT_TEMPLATE = "a photo of a {}."
TOKENIZER_VOCAB = 49408  # open_clip's BPE vocabulary (SimpleTokenizer), shipped with the package


class ClipInput(nn.Module):
    """Scenario images -> the CLIP image tower's input (no parameters).

    Grey images are repeated to 3 channels; with ``resize`` they are resized (bilinear) to
    ``image_size``; with ``mean``/``std`` inputs in [-1, 1] (clbench's convention, see
    ``clbench.lowres``) are mapped to [0, 1] and normalised as the weights expect. Once
    ``prepared`` (the scenario's transforms already made RGB ``image_size`` images
    normalised as the weights expect) it passes inputs through unchanged.
    """

    def __init__(
        self,
        image_size: int,
        resize: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.resize = resize
        self.prepared = False
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        for name, v in (("mean", mean), ("std", std)):
            value = None if v is None else torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
            self.register_buffer(name, value, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepared:
            return x
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = (self.image_size, self.image_size)
        if self.resize and tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if self.mean is not None:
            x = ((x + 1.0) / 2.0 - self.mean) / self.std
        return x

    def input_shapes(self) -> list[tuple[int | None, ...]]:
        """The (C, H, W) shapes this adapter accepts (``None``: any)."""
        if self.prepared:
            return [(3, self.image_size, self.image_size)]
        side = None if self.resize else self.image_size
        return [(c, side, side) for c in (1, 3)]

    def extra_repr(self) -> str:
        if self.prepared:
            return f"image_size={self.image_size}, prepared=True"
        norm = self.mean is not None
        return f"image_size={self.image_size}, resize={self.resize}, normalize={norm}"


#: open_clip's resize modes -> timm's crop modes (what the scenario's transforms follow)
CROP_MODES = {"shortest": "center", "squash": "squash", "longest": "border"}


def clip_data_config(model: nn.Module, image_size: int) -> dict[str, Any]:
    """timm-style data config of open_clip's evaluation preprocessing of ``model``: resize
    to ``image_size`` (the shorter side, bicubic by default) and centre-crop (crop_pct 1),
    normalised with the weights' mean / std (a pretrained tag's, else OpenAI's)."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg

    pp = {**asdict(PreprocessCfg()), **getattr(model.visual, "preprocess_cfg", {})}
    return {
        "input_size": (3, image_size, image_size),
        "interpolation": str(pp["interpolation"]),
        "mean": tuple(float(v) for v in pp["mean"]),
        "std": tuple(float(v) for v in pp["std"]),
        "crop_pct": 1.0,
        "crop_mode": CROP_MODES.get(str(pp["resize_mode"]), "center"),
    }


def _check_template(template: str) -> None:
    try:
        ok = "\x00" in template.format("\x00")  # the class name must appear
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(
            f"invalid value for backbone.template: {template!r}; it must contain one {{}} "
            "(where the class name goes)"
        )


@dataclass
class ClipBackbone(Backbone):
    """A CLIP model whose classifier is the text embeddings of the class names' prompts."""

    tokenizer: Callable[..., torch.Tensor] | None = None
    template: str = DEFAULT_TEMPLATE
    input_adapter: ClipInput | None = None

    def classifier(self, class_names: Sequence[str]) -> nn.Module:
        from clbench.models import ClipClassifier

        assert self.tokenizer is not None
        return ClipClassifier(
            self.module,
            self.tokenizer,
            class_names,
            template=self.template,
            input_adapter=self.input_adapter,
        )

    def use_prepared_inputs(self) -> None:
        """The scenario's transforms follow :attr:`data_config`: the input adapter stops
        adapting (no grey-to-RGB, resize or normalisation) and only RGB inputs of the
        tower's size are accepted."""
        if self.input_adapter is None:
            return
        self.input_adapter.prepared = True
        self.input_shapes = tuple(self.input_adapter.input_shapes())
        self.input_shape = self.input_shapes[0]


def _clip_backbone(
    name: str,
    model: nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    template: str,
    adapter: ClipInput,
    source: str,
) -> ClipBackbone:
    """A :class:`ClipBackbone` around an open_clip model."""
    size = adapter.image_size
    return ClipBackbone(
        name=name,
        module=model,
        feature_dim=int(model.visual.output_dim),
        input_shape=(3, size, size),
        source=source,
        input_shapes=tuple(adapter.input_shapes()),
        stem="visual.conv1",
        tokenizer=tokenizer,
        template=template,
        input_adapter=adapter,
        data_config=clip_data_config(model, size),
    )


@dataclass
class ClipTinyConfig:
    name: str = "clip_tiny"
    embed_dim: int = 64
    vision_width: int = 64
    vision_layers: int = 2
    patch_size: int = 4
    image_size: int = 16
    text_width: int = 64
    text_layers: int = 2
    heads: int = 2  # attention heads of each tower
    context_length: int = 16
    template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        _check_template(self.template)


def clip_tiny(cfg: ClipTinyConfig) -> Backbone:
    """Tiny randomly initialised open_clip CLIP (offline), 16x16 grey or RGB input."""
    import open_clip

    model = open_clip.model.CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=cfg.vision_layers,
            width=cfg.vision_width,
            head_width=cfg.vision_width // cfg.heads,
            patch_size=cfg.patch_size,
            image_size=cfg.image_size,
        ),
        text_cfg=open_clip.model.CLIPTextCfg(
            context_length=cfg.context_length,
            vocab_size=TOKENIZER_VOCAB,
            width=cfg.text_width,
            heads=cfg.heads,
            layers=cfg.text_layers,
        ),
    )
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.context_length)
    return _clip_backbone(
        "clip_tiny", model, tokenizer, cfg.template, ClipInput(cfg.image_size), "random-init"
    )


clip_tiny.Config = ClipTinyConfig  # type: ignore[attr-defined]


@dataclass
class ClipViTB16Config:
    name: str = "clip_vit_b16"
    model: str = "ViT-B-16"  # open_clip model name
    # an open_clip pretrained tag of the model (openai, laion2b_s34b_b88k, ...: downloaded
    # on first use), the path of a local weights file in open_clip's format, or none
    pretrained: str = "openai"
    # QuickGELU activations: None = what the tag was trained with (openai: true); a local
    # file needs it set by hand (true for OpenAI's weights)
    quick_gelu: bool | None = None
    template: str = DEFAULT_TEMPLATE
    image_size: int = 224
    # resize inputs of another size to image_size (bilinear); grey is repeated to RGB
    resize: bool = True
    # map [-1, 1] inputs to [0, 1] and normalise with the weights' mean / std
    normalize: bool = True

    def __post_init__(self) -> None:
        _check_template(self.template)


def _load_error(cfg: ClipViTB16Config, e: Exception) -> ClbenchError:
    first = torch_load_failure(e) if "Weights only load failed" in str(e) else first_line(e)
    return ClbenchError(
        f"cannot load CLIP weights {cfg.pretrained!r} for {cfg.model}: {first}; give "
        "backbone.pretrained=<open_clip tag> on a connected machine or the path of a weights file"
    )


def clip_vit_b16(cfg: ClipViTB16Config) -> Backbone:
    """open_clip ViT-B/16 with real weights (a pretrained tag or a local file)."""
    import open_clip

    if cfg.model not in open_clip.list_models():
        raise ClbenchError(f"unknown open_clip model {cfg.model!r} (backbone.model)")
    tags = open_clip.list_pretrained_tags_by_model(cfg.model)
    quick_gelu = cfg.quick_gelu
    if cfg.pretrained == "none":
        pretrained, source = None, "random-init"
    elif cfg.pretrained in tags:
        pretrained, source = cfg.pretrained, f"open_clip:{cfg.model}/{cfg.pretrained}"
        if quick_gelu is None:
            tag_cfg = open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained)
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    else:
        path = Path(cfg.pretrained).expanduser()
        if not path.is_file():
            raise ClbenchError(
                f"CLIP weights file not found: {str(path)!r}; backbone.pretrained takes the path "
                f"of a weights file, an open_clip tag of {cfg.model} ({', '.join(tags[:3])}, ...) "
                "or none"
            )
        pretrained, source = str(path), str(path)
    try:
        model = open_clip.create_model(
            cfg.model,
            pretrained=pretrained,
            force_quick_gelu=bool(quick_gelu),
            force_image_size=cfg.image_size,
        )
    except Exception as e:  # unreadable / mismatched weights, failed download: one line
        raise _load_error(cfg, e) from e
    pp = getattr(model.visual, "preprocess_cfg", {})
    adapter = ClipInput(
        cfg.image_size,
        resize=cfg.resize,
        mean=pp.get("mean", open_clip.OPENAI_DATASET_MEAN) if cfg.normalize else None,
        std=pp.get("std", open_clip.OPENAI_DATASET_STD) if cfg.normalize else None,
    )
    tokenizer = open_clip.get_tokenizer(cfg.model)
    return _clip_backbone("clip_vit_b16", model, tokenizer, cfg.template, adapter, source)


clip_vit_b16.Config = ClipViTB16Config  # type: ignore[attr-defined]
