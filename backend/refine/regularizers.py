"""The three-component anti-spike regularization and its statistics.

All three act on local parameters, so their thresholds are in units of the parent
triangle's size k (see gaussians/frames.py); formulas in docs/refinement.md:

    scale:       mean_i relu(max_a s_ia - tau_s)            s = exp(log_scale)
    anisotropy:  mean_i relu(log(max_a s_ia / min_a s_ia) - log r)
    offset:      mean_i relu(||o_i|| - tau_o)                o = local offset

The anisotropy hinge works on the log ratio so its gradient does not blow up for very thin
Gaussians. Densification keeps Gaussians well shaped by splitting large ones; with the
layout frozen, these hinges do that job.

A fourth hinge, apart from the three, keeps each Gaussian on its triangle:

    depth:       mean_i relu(|o_i . n| + sqrt(n^T S_i n) - tau_d)

with n the triangle's normal (the local z axis) and S_i = R_i diag(s_i^2) R_i^T the
Gaussian's local covariance, so sqrt(n^T S_i n) is its standard deviation along the normal.
A frontal view cannot see how far a Gaussian sits off the surface or how thick it is along
the normal; the next pose shows it at the outline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from backend.gaussians.avatar import LocalGaussians
from backend.gaussians.frames import normal_in_gaussian_axes


@dataclass(frozen=True)
class AntiSpike:
    """Weights and thresholds of the three hinges (thresholds in triangle units).

    Attributes:
        scale_weight, max_scale: hinge on the largest axis above ``max_scale`` x k.
        aniso_weight, max_ratio: hinge on max/min axis ratio above ``max_ratio``.
        offset_weight, max_offset: hinge on the distance from the bound surface point
            above ``max_offset`` x k.
    """

    scale_weight: float = 1.0
    max_scale: float = 0.6
    aniso_weight: float = 0.1
    max_ratio: float = 30.0
    offset_weight: float = 0.1
    max_offset: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.scale_weight > 0 or self.aniso_weight > 0 or self.offset_weight > 0


@dataclass(frozen=True)
class SurfaceHinge:
    """The depth hinge (threshold in triangle units).

    Attributes:
        weight: 0 switches it off.
        max_depth: how far past its triangle's plane a Gaussian may reach: the offset along
            the normal plus one standard deviation along it, in triangle sizes.
    """

    weight: float = 10.0
    max_depth: float = 0.1


def surface_depth(rotation: torch.Tensor, log_scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """[N] |offset along the normal| + standard deviation along the normal, triangle units,
    for local rotations [N, 4] (any norm), log-scales [N, 3] and offsets [N, 3]."""
    along_normal = normal_in_gaussian_axes(rotation) * log_scale.exp()  # row z of R diag(s)
    return offset[:, 2].abs() + along_normal.square().sum(dim=-1).add(1e-12).sqrt()


def depth_loss(rotation: torch.Tensor, log_scale: torch.Tensor, offset: torch.Tensor, config: SurfaceHinge) -> torch.Tensor:
    return config.weight * torch.relu(surface_depth(rotation, log_scale, offset) - config.max_depth).mean()


def spike_terms(log_scale: torch.Tensor, offset: torch.Tensor, config: AntiSpike) -> dict[str, torch.Tensor]:
    """The three hinge values (unweighted scalars) for log-scales [N, 3] and offsets [N, 3]."""
    largest, smallest = log_scale.max(dim=-1).values, log_scale.min(dim=-1).values
    return {
        "scale": torch.relu(largest.exp() - config.max_scale).mean(),
        "aniso": torch.relu(largest - smallest - math.log(config.max_ratio)).mean(),
        "offset": torch.relu(offset.norm(dim=-1) - config.max_offset).mean(),
    }


def spike_loss(log_scale: torch.Tensor, offset: torch.Tensor, config: AntiSpike) -> torch.Tensor:
    terms = spike_terms(log_scale, offset, config)
    return config.scale_weight * terms["scale"] + config.aniso_weight * terms["aniso"] + config.offset_weight * terms["offset"]


@torch.no_grad()
def spike_stats(local: LocalGaussians, config: AntiSpike, surface: SurfaceHinge = SurfaceHinge()) -> dict[str, float]:
    """Share of Gaussians over each anti-spike threshold, over any of them, and (apart)
    over the depth threshold."""
    log_s = local.log_scale
    big = log_s.max(dim=-1).values.exp() > config.max_scale
    thin = (log_s.max(dim=-1).values - log_s.min(dim=-1).values) > math.log(config.max_ratio)
    far = local.offset.norm(dim=-1) > config.max_offset
    return {
        "scale_share": float(big.float().mean()),
        "aniso_share": float(thin.float().mean()),
        "offset_share": float(far.float().mean()),
        "spike_share": float((big | thin | far).float().mean()),
        "depth_share": float((surface_depth(local.rotation, log_s, local.offset) > surface.max_depth).float().mean()),
    }
