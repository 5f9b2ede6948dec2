"""How a super-resolution model's low-resolution input is put onto the output grid.

The network sees its conditioning on the output (fine) grid: the low-resolution tile is
interpolated ``k`` times finer in y and x. Training and inference must interpolate the same
way, so the method is part of the model (:attr:`ModelConfig.cond_upsample`): ``"bicubic"``
for models trained here, ``"bilinear"`` for weights imported from the reference EMDiffuse
(it resizes its inputs with PIL's bilinear filter, which for enlargement is half-pixel-centred
bilinear interpolation with edge clamping — ``align_corners=False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UPSAMPLE_MODES = ("bicubic", "bilinear")


def upsample_xy(cond: torch.Tensor, k: int, mode: str = "bicubic") -> torch.Tensor:
    """``cond`` (B, C, y, x) or (B, C, z, y, x) interpolated ``k``× finer in y and x.

    Values are clamped to the model range [-1, 1] (bicubic overshoots at edges). ``k = 1``
    returns ``cond`` unchanged.
    """
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"unknown upsampling {mode!r}; choose one of {', '.join(UPSAMPLE_MODES)}")
    if k == 1:
        return cond
    if cond.ndim == 4:
        up = F.interpolate(cond, scale_factor=k, mode=mode, align_corners=False)
    elif cond.ndim == 5:
        b, c, d, h, w = cond.shape
        flat = cond.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
        up = F.interpolate(flat, scale_factor=k, mode=mode, align_corners=False)
        up = up.reshape(b, d, c, h * k, w * k).permute(0, 2, 1, 3, 4)
    else:
        raise ValueError(f"expected a 4D or 5D tensor, got shape {tuple(cond.shape)}")
    return up.clamp(-1.0, 1.0)


__all__ = ["UPSAMPLE_MODES", "upsample_xy"]
