"""Filling images from their confident pixels: gaps in UV textures, colours at soft mask edges."""

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


def decontaminate(image: torch.Tensor, mask: torch.Tensor, solid: float = 0.98) -> torch.Tensor:
    """The foreground's own colour where a soft mask blends it with the background.

    A matte's soft edge (hair against a wall) holds pixels that are part person, part
    background; composited elsewhere with the matte, their background share shows as a
    light or dark fringe. Where the mask is below ``solid`` the colour is taken from the
    nearest solid foreground instead (push-pull), so the edge fades the person's colour.

    Args:
        image: [H, W, 3] RGB in [0, 1].
        mask: [H, W] or [H, W, 1] foreground in [0, 1].
    Returns:
        [H, W, 3]: ``image`` where the mask is solid, the filled foreground colour elsewhere.
    """
    m = mask.reshape(mask.shape[0], mask.shape[1], 1)
    inside = (m >= solid).to(image.dtype)
    if not bool(inside.any()):
        return image
    filled = push_pull_fill(image.permute(2, 0, 1)[None], inside.permute(2, 0, 1)[None])[0].permute(1, 2, 0)
    return torch.where(inside > 0, image, filled)
