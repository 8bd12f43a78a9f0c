"""Thin wrapper over ``gsplat.rasterization`` for CUDA tensors.

gsplat is imported only inside the functions below: importing this module needs no GPU
and compiles nothing. Without CUDA, anything that reaches ``gsplat.cuda._backend`` tries to
JIT-compile the kernels and fails, so every path here is guarded by ``gsplat_available``.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch

from backend.render.settings import RasterSettings


@lru_cache(maxsize=1)
def gsplat_available() -> bool:
    """True when CUDA is usable and the gsplat package is installed."""
    return torch.cuda.is_available() and importlib.util.find_spec("gsplat") is not None


def _check_builtin_constants(settings: RasterSettings) -> None:
    """gsplat compiles these constants in; refuse settings it would silently ignore."""
    default = RasterSettings()
    fixed = ("alpha_min", "alpha_max", "transmittance_min", "extent_sigmas")
    changed = [name for name in fixed if getattr(settings, name) != getattr(default, name)]
    if changed:
        raise ValueError(f"gsplat cannot change {', '.join(changed)}; use backend='reference'")


def rasterize_gsplat(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    world_to_cam: torch.Tensor,
    K: torch.Tensor,
    width: int,
    height: int,
    backgrounds: torch.Tensor,
    settings: RasterSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render with gsplat's fused CUDA kernels ("classic" mode, "RGB+ED").

    Same arguments and outputs as ``reference.rasterize_reference``; all tensors must be
    float32 on one CUDA device.
    """
    if not gsplat_available():
        raise RuntimeError("the gsplat backend needs CUDA and the gsplat package")
    if not means.is_cuda:
        raise ValueError("the gsplat backend needs CUDA tensors; use backend='reference' on CPU")
    _check_builtin_constants(settings)
    from gsplat import rasterization

    # The kernels index raw memory: expanded (stride-0) views must be materialised.
    # gsplat 1.5.3 rejects per-image backgrounds when packed=True (it checks them against the
    # packed shape), so the background is composited here in both modes: rgb + T * bg, as its
    # kernel does.
    render, alpha, _ = rasterization(
        means.contiguous(),
        quats.contiguous(),
        scales.contiguous(),
        opacities.contiguous(),
        colors.contiguous(),
        world_to_cam.contiguous(),
        K.contiguous(),
        width,
        height,
        near_plane=settings.near_plane,
        far_plane=settings.far_plane,
        eps2d=settings.eps2d,
        packed=settings.packed,
        tile_size=settings.tile_size,
        render_mode="RGB+ED",
        rasterize_mode="classic",
    )
    rgb = render[..., :3] + (1.0 - alpha) * backgrounds[..., None, None, :]
    return rgb, alpha, render[..., 3:]
