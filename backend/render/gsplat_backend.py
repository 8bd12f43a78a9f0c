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
from backend.render.tile_intersect import TileBudget, tile_lists


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
    budget: TileBudget | None = None,
    depth: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Render with gsplat's fused CUDA kernels ("classic" mode, "RGB+ED", or "RGB" without
    ``depth``).

    Same arguments and outputs as ``reference.rasterize_reference`` (depth None without
    ``depth``); all tensors must be float32 on one CUDA device. With a ``budget`` the
    intersection lists have a fixed size and the call never waits for the GPU, so it can be
    captured in a CUDA graph.
    """
    if not gsplat_available():
        raise RuntimeError("the gsplat backend needs CUDA and the gsplat package")
    if not means.is_cuda:
        raise ValueError("the gsplat backend needs CUDA tensors; use backend='reference' on CPU")
    _check_builtin_constants(settings)
    if budget is not None:
        return _rasterize_in_budget(means, quats, scales, opacities, colors, world_to_cam, K, width, height, backgrounds, settings, budget, depth)
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
        render_mode="RGB+ED" if depth else "RGB",
        rasterize_mode="classic",
    )
    rgb = render[..., :3] + (1.0 - alpha) * backgrounds[..., None, None, :]
    return rgb, alpha, render[..., 3:] if depth else None


def _rasterize_in_budget(
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
    budget: TileBudget,
    depth: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``rasterization``'s unpacked classic path, with ``tile_lists`` for its intersections.

    gsplat's own steps, called one by one: project, list (tile, Gaussian) pairs, rasterize
    RGB and depth. The grid gets one extra tile row for the padding slots; it is masked and
    cut off again.
    """
    from gsplat.cuda._wrapper import fully_fused_projection, rasterize_to_pixels

    lead = tuple(means.shape[:-2])
    cams = K.shape[-3]
    radii, means2d, depths, conics, _ = fully_fused_projection(
        means,
        None,
        quats,
        scales,
        world_to_cam,
        K,
        width,
        height,
        eps2d=settings.eps2d,
        near_plane=settings.near_plane,
        far_plane=settings.far_plane,
        opacities=opacities,
    )  # [..., C, N, ...]
    ts = settings.tile_size
    cols, rows = -(-width // ts), -(-height // ts)
    n = means.shape[-2]
    lists = tile_lists(
        means2d.reshape(-1, n, 2), radii.reshape(-1, n, 2), depths.reshape(-1, n), ts, cols, rows, budget.capacity
    )
    torch.maximum(budget.peak, lists.total, out=budget.peak)
    grid = lead + (cams, rows + 1, cols)
    # gsplat's "RGB+ED": depth rides along as a fourth colour channel.
    if colors.ndim == means.ndim:  # one colour per Gaussian for every camera
        colors = colors[..., None, :, :]
    channels = colors.expand(lead + (cams, n, 3))
    channels = torch.cat((channels, depths[..., None]), dim=-1) if depth else channels.contiguous()
    render, alpha = rasterize_to_pixels(
        means2d,
        conics,
        channels,
        opacities[..., None, :].expand(lead + (cams, n)).contiguous(),
        cols * ts,
        (rows + 1) * ts,
        ts,
        lists.offsets.reshape(grid),
        lists.flatten_ids,
        masks=lists.masks.reshape(grid),
    )
    render, alpha = render[..., :height, :width, :], alpha[..., :height, :width, :]
    rgb = render[..., :3] + (1.0 - alpha) * backgrounds[..., None, None, :]
    return rgb, alpha, render[..., 3:] / alpha.clamp(min=1e-10) if depth else None
