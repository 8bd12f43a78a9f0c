"""Per-Gaussian values as UV images: a layout keeps each Gaussian's texel of its R x R grid
(``Binding.texel``), so values can be scattered into that image, filled where no Gaussian
lies, and read back at the texels of another layout of the same UV map."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backend.gaussians.layout import Binding


def push_pull_fill(grid: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Fill empty texels of a UV image from their neighbours (push-pull pyramid).

    Args:
        grid: [B, C, R, R] values, meaningful where ``weight`` > 0.
        weight: [B, 1, R, R] non-negative confidence.
    Returns:
        [B, C, R, R]: weighted averages of ever coarser neighbourhoods fill the gaps; texels
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


def filled_uv_image(values: torch.Tensor, binding: Binding) -> torch.Tensor:
    """[N, C] values of ``binding``'s Gaussians -> [1, C, R, R] UV image, every texel without
    a Gaussian (outside the charts, or dropped by the layout) filled from its neighbours:
    first the ring around the charts from the texels next to it (what a bilinear read just
    inside a chart's edge mixes in), then the rest by push-pull."""
    r = binding.resolution
    flat = binding.texel[:, 0] * r + binding.texel[:, 1]
    grid = values.new_zeros(r * r, values.shape[1])
    grid[flat] = values
    weight = values.new_zeros(r * r, 1)
    weight[flat] = 1.0
    grid, weight = grid.T.reshape(1, -1, r, r), weight.T.reshape(1, 1, r, r)
    near_sum = F.avg_pool2d(grid * weight, 3, stride=1, padding=1, count_include_pad=False)
    near_weight = F.avg_pool2d(weight, 3, stride=1, padding=1, count_include_pad=False)
    ring = (weight == 0) & (near_weight > 0)
    grid = torch.where(ring, near_sum / near_weight.clamp_min(1e-8), grid)
    return push_pull_fill(grid, torch.where(ring, torch.ones_like(weight), weight))


def read_at_texels(image: torch.Tensor, binding: Binding) -> torch.Tensor:
    """[1, C, R', R'] UV image (any resolution) read bilinearly at the centres of
    ``binding``'s texels -> [N, C]. Both grids span the same [0, 1]^2 of the UV map."""
    r = binding.resolution
    centres = (binding.texel.flip(-1).to(image.dtype) + 0.5) / r * 2 - 1  # (x, y) = (col, row) in [-1, 1]
    sampled = F.grid_sample(image, centres[None, None], mode="bilinear", padding_mode="border", align_corners=False)
    return sampled[0, :, 0].T
