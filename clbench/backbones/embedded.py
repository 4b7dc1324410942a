"""The embedded default backbone: a micro ViT pretrained offline on rendered glyphs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clbench.backbones.base import Backbone
from clbench.backbones.micro_vit import MICRO_VIT_ARCH, build_micro_vit
from clbench.errors import ClbenchError, first_line
from clbench.pretrain.train import (
    DEFAULT_STEPS,
    GLYPH_TASK,
    corrupt_cache_fix,
    ensure_pretrained,
    load_glyph_head,
    load_micro_vit,
)


@dataclass
class MicroViTConfig:
    name: str = "micro_vit"
    # "glyphs": the clbench-made source checkpoint (`clbench pretrain`, cached);
    # "none": random initialisation; anything else: a path to a .safetensors file.
    pretrained: str = "glyphs"
    pretrain_seed: int = 0
    pretrain_steps: int = DEFAULT_STEPS


def micro_vit(cfg: MicroViTConfig, progress: bool = True) -> Backbone:
    """timm VisionTransformer, 16x16 grey input, ViT-B/16 module names (offline weights)."""
    heads = {}
    if cfg.pretrained == "none":
        module, source = build_micro_vit(), "random-init"
    else:
        if cfg.pretrained == "glyphs":
            path = ensure_pretrained(cfg.pretrain_seed, cfg.pretrain_steps, progress=progress)
            source = f"glyphs(seed={cfg.pretrain_seed},steps={cfg.pretrain_steps})"
        else:
            path = Path(cfg.pretrained).expanduser()
            source = str(path)
            if not path.is_file():
                raise ClbenchError(
                    f"backbone checkpoint not found: {str(path)!r}; give backbone.pretrained="
                    "glyphs, none, or the path of a .safetensors file"
                )
        try:  # safetensors: tensors and a JSON header, nothing is unpickled
            module = load_micro_vit(path)
            head = load_glyph_head(path)
            if head is not None:
                heads[GLYPH_TASK] = head
        except ValueError as e:
            if cfg.pretrained == "glyphs":
                fix = corrupt_cache_fix(cfg.pretrain_seed, cfg.pretrain_steps)
            else:
                fix = "give backbone.pretrained=glyphs, none, or a micro ViT .safetensors file"
            raise ClbenchError(f"{first_line(e)}; {fix}") from None
    arch = MICRO_VIT_ARCH
    return Backbone(
        name="micro_vit",
        module=module,
        feature_dim=int(module.num_features),
        input_shape=(arch["in_chans"], arch["img_size"], arch["img_size"]),
        source=source,
        stem="patch_embed",
        task_heads=heads,
    )


micro_vit.Config = MicroViTConfig  # type: ignore[attr-defined]
