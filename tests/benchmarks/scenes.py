"""Synthetic Gaussian scenes for render tests and benchmarks (no assets needed)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from backend.gaussians.splats import Splats

# Head-sized ellipsoid (metres): half width, half height, half depth, in FLAME's frame.
HEAD_SEMI_AXES = (0.075, 0.1, 0.09)


def head_splats(
    n: int,
    seed: int = 0,
    sh_degree: int | None = None,
    device: torch.device | str = "cpu",
) -> Splats:
    """N Gaussians on a head-sized ellipsoid at the origin, with a nose, like a FLAME head.

    Surface-sized splats (tangent std-devs about the sample spacing, one flattened axis),
    random orientations and colours, opacities in [0.3, 1).
    """
    g = torch.Generator().manual_seed(seed)
    axes = torch.tensor(HEAD_SEMI_AXES)
    dirs = F.normalize(torch.randn(n, 3, generator=g), dim=-1)
    means = dirs * axes * (1.0 + 0.03 * torch.randn(n, 1, generator=g))
    # A nose: push the front-centre of the face forward (+z is where the face looks).
    nose = torch.exp(-((dirs[:, 0] / 0.15) ** 2 + ((dirs[:, 1] + 0.1) / 0.25) ** 2))
    means[:, 2] += 0.025 * nose * (dirs[:, 2] > 0)

    a, b, c = HEAD_SEMI_AXES
    area = 4.0 * math.pi * ((a**1.6 * b**1.6 + a**1.6 * c**1.6 + b**1.6 * c**1.6) / 3.0) ** (1 / 1.6)
    spacing = math.sqrt(area / n)
    scales = spacing * torch.exp(torch.empty(n, 3).uniform_(math.log(0.4), math.log(1.2), generator=g))
    scales[:, 2] *= 0.2
    quats = F.normalize(torch.randn(n, 4, generator=g), dim=-1)
    opacities = 0.3 + 0.7 * torch.rand(n, generator=g)
    skin = torch.tensor([0.8, 0.6, 0.5])
    if sh_degree is None:
        colors = (skin + 0.15 * torch.randn(n, 3, generator=g)).clamp(0.0, 1.0)
    else:
        k = (sh_degree + 1) ** 2
        colors = 0.1 * torch.randn(n, k, 3, generator=g)
        colors[:, 0] = (skin - 0.5) / 0.28209479177387814
    return Splats(
        means.to(device),
        quats.to(device),
        scales.to(device),
        opacities.to(device),
        colors.to(device),
        sh_degree,
    )
