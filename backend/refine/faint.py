"""Colours that the training views barely constrain, set back to the start's after refinement
(``RefineConfig.faint``).

A Gaussian that lies mostly past the frame's edge (a neck below a tight crop) reaches the
known pixels only with its tail; the loss then drives its colour to whatever that tail must
add, which the colour clamp turns into a saturated corner of the gamut (green, magenta,
white), shown in full wherever the Gaussian's body is seen: below the frame, and in views
the video did not take. Its colour is not the person's, so after the last step such
Gaussians take their starting colours back (the generator's, or the surface start's fill).
Their geometry and opacity stay as refined.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from backend.data.subject import Subject
from backend.gaussians.avatar import LocalGaussians, deform_local
from backend.gaussians.layout import Binding
from backend.refine.config import FaintColours
from backend.render.rasterize import render


def coverage(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    binding: Binding,
    local: LocalGaussians,
    subject: Subject,
    frames: list[int],
    batch: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How much of each Gaussian the training views show, in pixels of blending weight.

    Args:
        vertices: [T, V, 3] the posed head at the training ``frames`` (metres), on the
            device to render on.
        faces: [F, 3]; binding and local: the avatar's N Gaussians on that device.
        subject: the source of the cameras and of the known-pixel masks.
    Returns:
        known, total: [N] float32 on the device: each Gaussian's blending weight (its
        opacity times the transmittance in front of it) summed over the known pixels, and
        over every pixel, of every camera of the training frames.
    """
    n, device = binding.count, vertices.device
    known_px = torch.zeros(n, device=device)
    total_px = torch.zeros(n, device=device)
    # With a black background, d(rendered channel) / d(colour of Gaussian i) is i's weight
    # at that pixel: channel 0 sums it over known pixels, channel 1 over all of them.
    probe = torch.full((n, 3), 0.5, device=device)
    background = torch.zeros(3, device=device)
    for start in range(0, len(frames), batch):
        rows = list(range(start, min(start + batch, len(frames))))
        chunk = [frames[r] for r in rows]
        colours = probe.clone().requires_grad_(True)
        with torch.no_grad():
            posed = deform_local(vertices[rows], faces, binding, local)
        splats = replace(posed, colors=colours, sh_degree=None)
        known = torch.stack([torch.stack([subject.known(t, c) for c in range(subject.num_cameras)]) for t in chunk]).to(device)
        rgb = render(splats, subject.cameras(chunk), background, depth=False).rgb  # [B, C, H, W, 3]
        ((rgb[..., 0:1] * known).sum() + rgb[..., 1].sum()).backward()
        known_px += colours.grad[:, 0]
        total_px += colours.grad[:, 1]
    return known_px, total_px


def faint_rows(known_px: torch.Tensor, total_px: torch.Tensor, config: FaintColours) -> torch.Tensor:
    """[N] bool: the Gaussians the training views reach (``total_px`` > 0) whose known pixels
    hold less than ``config.min_known_share`` of their weight."""
    return (total_px > 0) & (known_px < config.min_known_share * total_px)


def restore_colours(local: LocalGaussians, start: LocalGaussians, rows: torch.Tensor) -> LocalGaussians:
    """``local`` with the SH colour coefficients of ``rows`` [N] bool taken from ``start``."""
    return replace(local, sh=torch.where(rows[:, None, None], start.sh.to(local.sh), local.sh))
