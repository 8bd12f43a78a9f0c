"""Colours that the training views barely constrain, set back to the start's after refinement
(``RefineConfig.faint``).

Adam scales every step to the size of its gradient's history, so a colour the views barely
show moves as far per step as one they show in full. Three kinds of Gaussian get colours
that are not the person's that way:

- one that lies mostly past the frame's edge (a neck below a tight crop) reaches the known
  pixels only with its tail; the loss drives its colour to whatever that tail must add,
  which the colour clamp turns into a saturated corner of the gamut (green, magenta, white);
- one almost hidden behind others (a fraction of a pixel of weight over every view) takes
  whatever colour the residual of the pixels it touches asks for;
- one that the views see only edge-on (the side of the head in a single frontal portrait,
  the far cheek of a clip that turns little) covers a sliver at the silhouette shared with
  its neighbours; only their blend is fitted, and each one's colour drifts from the next.

Together they are confetti wherever the head turns further than the views did. So after
the last step such Gaussians take their starting colours back (the generator's, or the
surface start's fill); their geometry and opacity stay as refined. The edge-on rule is off
by default: those Gaussians also draw the silhouettes that views like the training ones see.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from backend.data.subject import Subject
from backend.gaussians.avatar import LocalGaussians, deform_local
from backend.gaussians.frames import triangle_frames
from backend.gaussians.layout import Binding
from backend.refine.config import FaintColours
from backend.render.camera import Cameras
from backend.render.rasterize import render


class Coverage(NamedTuple):
    """What the training views show of each Gaussian: [N] float32 sums over every camera of
    the training frames, in pixels of blending weight (opacity times the transmittance in
    front of it).

    Attributes:
        known: the weight over the known pixels.
        total: the weight over every pixel.
        facing: the known weight, each view's share times |cos| of the angle between the
            Gaussian's triangle normal and its line of sight (1 face-on, 0 edge-on).
    """

    known: torch.Tensor
    total: torch.Tensor
    facing: torch.Tensor


def coverage(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    binding: Binding,
    local: LocalGaussians,
    subject: Subject,
    frames: list[int],
    batch: int = 8,
) -> Coverage:
    """How much of each Gaussian the training views show, and how squarely.

    Args:
        vertices: [T, V, 3] the posed head at the training ``frames`` (metres), on the
            device to render on.
        faces: [F, 3]; binding and local: the avatar's N Gaussians on that device.
        subject: the source of the cameras and of the known-pixel masks.
    """
    n, device = binding.count, vertices.device
    sums = torch.zeros(3, n, device=device)
    background = torch.zeros(3, device=device)
    for start in range(0, len(frames), batch):
        rows = list(range(start, min(start + batch, len(frames))))
        chunk = [frames[r] for r in rows]
        with torch.no_grad():
            posed = deform_local(vertices[rows], faces, binding, local)
            normals = triangle_frames(vertices[rows], faces).rotation[..., 2].index_select(1, binding.face_idx)  # [B, N, 3]
        rig = subject.cameras(chunk).to(device)
        known = torch.stack([torch.stack([subject.known(t, c) for c in range(subject.num_cameras)]) for t in chunk]).to(device)
        for c in range(rig.count):
            camera = Cameras(rig.K[:, c : c + 1], rig.world_to_cam[:, c : c + 1], rig.width, rig.height)
            # With a black background, d(rendered channel) / d(colour of Gaussian i in frame b)
            # is i's weight at that pixel: channel 0 sums it over known pixels, 1 over all.
            colours = torch.full((len(rows), n, 3), 0.5, device=device, requires_grad=True)
            rgb = render(replace(posed, colors=colours, sh_degree=None), camera, background, depth=False).rgb  # [B, 1, H, W, 3]
            ((rgb[..., 0:1] * known[:, c : c + 1]).sum() + rgb[..., 1].sum()).backward()
            weights = colours.grad  # [B, N, 3]
            sight = F.normalize(posed.means - camera.centers, dim=-1)  # [B, N, 3]
            cos = (normals * sight).sum(-1).abs()
            sums += torch.stack([weights[..., 0], weights[..., 1], weights[..., 0] * cos]).sum(1)
    return Coverage(*sums)


def faint_rows(seen: Coverage, config: FaintColours) -> torch.Tensor:
    """[N] bool: the Gaussians whose known pixels hold less than ``config.min_known_px`` of
    weight, less than ``config.min_known_share`` of their weight over all pixels, or weight
    seen at a mean |cos| below ``config.min_facing``."""
    hidden = seen.known < config.min_known_px
    past_edge = seen.known < config.min_known_share * seen.total
    edge_on = seen.facing < config.min_facing * seen.known
    return hidden | past_edge | edge_on


def restore_colours(local: LocalGaussians, start: LocalGaussians, rows: torch.Tensor) -> LocalGaussians:
    """``local`` with the SH colour coefficients of ``rows`` [N] bool taken from ``start``."""
    return replace(local, sh=torch.where(rows[:, None, None], start.sh.to(local.sh), local.sh))
