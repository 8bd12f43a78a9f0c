"""Base colours kept inside the displayable range during refinement (``RefineConfig.bound_colours``).

A Gaussian that the training views show only faintly (behind others, at a silhouette, half
past the frame's edge) can match its few pixels with a colour far outside [0, 1] at a low
weight: the rasterizer clamps colours only below zero. Views the video never took weigh it
differently, and it shows there as a saturated speck. Clamping the base colour (the first SH
band) after every optimizer step keeps each Gaussian's own colour displayable; the higher
bands of a view-dependent avatar stay free.
"""

from __future__ import annotations

import torch

from backend.gaussians.avatar import SH_C0, LocalGaussians, sh_dc_to_rgb
from backend.refine.packed import PackLayout

# colour = 0.5 + SH_C0 * f_dc, so [0, 1] in colour is +-0.5 / SH_C0 in f_dc.
_DC_LIMIT = 0.5 / SH_C0


@torch.no_grad()
def bound_base_colours_(packed: torch.Tensor, layout: PackLayout) -> None:
    """Clamp, in place, the base-colour columns of ``packed`` [N, D] (``layout``) so that
    every Gaussian's base colour lies in [0, 1]."""
    start = layout.columns("sh").start
    packed[:, start : start + 3].clamp_(-_DC_LIMIT, _DC_LIMIT)


@torch.no_grad()
def out_of_range_share(local: LocalGaussians, tolerance: float = 1e-3) -> float:
    """Share of Gaussians whose base colour leaves [0, 1] by more than ``tolerance`` in
    some channel."""
    colour = sh_dc_to_rgb(local.sh[:, 0])
    return float(((colour < -tolerance) | (colour > 1 + tolerance)).any(dim=-1).float().mean())
