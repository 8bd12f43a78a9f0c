"""Gaussians laid flat on the head surface: the plain initialization of every avatar."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.gaussians.avatar import Avatar, LocalGaussians, identity_rotation, logit, rgb_to_sh_dc
from backend.gaussians.frames import triangle_frames
from backend.gaussians.layout import Binding, sample_layout, texel_footprint
from backend.head.model import HeadModel
from backend.head.params import FlameParams
from backend.head.registry import fingerprint


@dataclass(frozen=True)
class SurfaceInit:
    """How surface Gaussians start.

    Attributes:
        in_plane: in-plane standard deviation as a multiple of the texel spacing (0.6-0.7
            covers the surface without holes or much overlap).
        thickness: standard deviation along the normal, as a multiple of the in-plane one.
        opacity: initial opacity.
        sh_degree: SH degree of the colours (higher bands start at zero).
    """

    in_plane: float = 0.65
    thickness: float = 0.15
    opacity: float = 0.9
    sh_degree: int = 0


def neutral_with_shape(head: HeadModel, shape: torch.Tensor, batch: int = 1) -> FlameParams:
    params = head.neutral_params(batch)
    params.shape = shape.to(params.expr)
    return params


def surface_local(head: HeadModel, shape: torch.Tensor, binding: Binding, colours: torch.Tensor, init: SurfaceInit = SurfaceInit()) -> LocalGaussians:
    """Flat, surface-aligned Gaussians for a layout on the neutral head of identity ``shape``.

    Args:
        colours: [N, 3] linear RGB in [0, 1].
    Returns local parameters on the CPU, whatever device the head model is on.
    """
    verts = head(neutral_with_shape(head, shape)).vertices[0]
    on_device = binding.to(verts.device)
    spacing = texel_footprint(verts, head.faces, head.uv_coords, head.uv_faces, on_device)  # [N] metres
    size = triangle_frames(verts, head.faces).size[on_device.face_idx]  # [N] metres
    in_plane = torch.log(init.in_plane * spacing / size).cpu()
    log_scale = torch.stack([in_plane, in_plane, in_plane + torch.log(torch.tensor(init.thickness))], dim=-1)
    n = binding.count
    sh = torch.zeros(n, (init.sh_degree + 1) ** 2, 3)
    sh[:, 0] = rgb_to_sh_dc(colours)
    return LocalGaussians(
        offset=torch.zeros(n, 3),
        rotation=identity_rotation(n),
        log_scale=log_scale.float(),
        opacity_logit=torch.full((n,), float(logit(init.opacity))),
        sh=sh,
    )


def surface_avatar(head: HeadModel, shape: torch.Tensor, count: int, colours_fn, init: SurfaceInit = SurfaceInit(), meta: dict | None = None) -> Avatar:  # type: ignore[no-untyped-def]
    """A complete surface avatar of ``count`` Gaussians.

    Args:
        colours_fn: (face_idx [N], bary [N, 3]) -> [N, 3] colours.
    """
    binding = sample_layout(head.data.uv_coords, head.data.uv_faces, count)
    colours = colours_fn(binding.face_idx, binding.bary)
    return Avatar(
        head_name=head.name,
        head_fingerprint=fingerprint(head.data),
        shape=shape.detach().clone().float(),
        binding=binding,
        local=surface_local(head, shape, binding, colours, init),
        meta=dict(meta or {}),
    )
