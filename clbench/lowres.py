"""The low-resolution image format shared by the embedded scenarios and the micro ViT.

scikit-learn's handwritten digits (UCI optdigits) are 32x32 binary bitmaps counted in
non-overlapping 4x4 blocks: 8x8 images with integer levels 0..16. The embedded source
data (rendered glyphs) goes through the same counting so that both live in one domain;
the model sees them upsampled to 16x16 and normalised to [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LEVELS = 16
INPUT_SIZE = 16
CHANNELS = 1


def block_count(bitmap: torch.Tensor) -> torch.Tensor:
    """(N, 32, 32) binary bitmaps -> (N, 8, 8) counts of on pixels per 4x4 block (0..16)."""
    if bitmap.shape[-2:] != (32, 32):
        raise ValueError(f"expected 32x32 bitmaps, got {tuple(bitmap.shape[-2:])}")
    return F.avg_pool2d(bitmap.float().unsqueeze(1), 4).squeeze(1).mul(LEVELS).round()


def to_model_input(counts: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) levels in [0, 16] -> (N, 1, 16, 16) float input in [-1, 1]."""
    x = counts.float().div(LEVELS).unsqueeze(1)
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return x.mul(2.0).sub(1.0)
