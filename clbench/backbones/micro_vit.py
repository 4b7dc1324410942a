"""A micro Vision Transformer for the embedded 16x16 single-channel image format.

It is timm's ``VisionTransformer`` itself, so its module names match ViT-B/16
(``blocks[i].attn.qkv``, ``blocks[i].attn.proj``, ``blocks[i].mlp.fc1``, ``blocks[i].mlp.fc2``)
and every adapter written against the big model applies unchanged.
"""

from __future__ import annotations

from typing import Any

from timm.models.vision_transformer import VisionTransformer

from clbench.lowres import CHANNELS, INPUT_SIZE

MICRO_VIT_ARCH: dict[str, Any] = {
    "img_size": INPUT_SIZE,
    "patch_size": 4,
    "in_chans": CHANNELS,
    "num_classes": 0,
    "global_pool": "token",
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 4,
    "mlp_ratio": 4.0,
}


def build_micro_vit(**overrides: Any) -> VisionTransformer:
    """Randomly initialised micro ViT (``MICRO_VIT_ARCH`` updated with ``overrides``).

    Initialisation draws from torch's global generator, so it is deterministic given
    ``torch.manual_seed``. The model returns pooled CLS features of size ``embed_dim``.
    """
    return VisionTransformer(**{**MICRO_VIT_ARCH, **overrides})
