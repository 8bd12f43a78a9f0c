"""Filling images from their confident pixels (push-pull): gaps in UV textures."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def push_pull_fill(grid: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Fill empty pixels of an image (a UV texture, a photo) from their neighbours (push-pull
    pyramid).

    Args:
        grid: [B, C, H, W] values, meaningful where ``weight`` > 0.
        weight: [B, 1, H, W] non-negative confidence.
    Returns:
        [B, C, H, W]: weighted averages of ever coarser neighbourhoods fill the gaps; pixels
        with weight >= 1 keep their value.
    """
    levels = [(grid * weight, weight)]
    while min(levels[-1][1].shape[-2:]) > 1:
        gw, wt = levels[-1]
        levels.append((F.avg_pool2d(gw, 2, ceil_mode=True), F.avg_pool2d(wt, 2, ceil_mode=True)))
    coarse = levels[-1][0] / levels[-1][1].clamp_min(1e-8)
    for gw, wt in reversed(levels[:-1]):
        up = F.interpolate(coarse, size=gw.shape[-2:], mode="bilinear", align_corners=False)
        alpha = wt.clamp(0, 1)
        coarse = alpha * (gw / wt.clamp_min(1e-8)) + (1 - alpha) * up
    return coarse

