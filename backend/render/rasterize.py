"""The one public render call: gsplat on CUDA, the pure-torch reference elsewhere."""

from __future__ import annotations

from functools import partial
from typing import Literal, NamedTuple

import torch

from backend.gaussians.splats import Splats
from backend.render.camera import Cameras
from backend.render.gsplat_backend import gsplat_available, rasterize_gsplat
from backend.render.reference import rasterize_reference
from backend.render.settings import RasterSettings
from backend.render.tile_intersect import TileBudget
from backend.render.sh import MAX_SH_DEGREE, sh_to_rgb

Backend = Literal["auto", "gsplat", "reference"]


class RenderOutput(NamedTuple):
    """Rendered views; ``...`` is () or the frame batch (B,).

    Attributes:
        rgb: [..., C, H, W, 3] linear RGB composited over the background.
        alpha: [..., C, H, W, 1] accumulated opacity, 1 - final transmittance.
        depth: [..., C, H, W, 1] expected planar camera-space z (metres), alpha-normalised;
            0 where alpha is 0. None when not asked for.
    """

    rgb: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor | None


def render(
    splats: Splats,
    cameras: Cameras,
    background: torch.Tensor,
    backend: Backend = "auto",
    settings: RasterSettings = RasterSettings(),
    budget: TileBudget | None = None,
    depth: bool = True,
) -> RenderOutput:
    """Rasterize Gaussians into every camera of a rig.

    Shapes: splats [N, ...] with cameras [C, ...] give outputs [C, H, W, ...]; batched splats
    [B, N, ...] with cameras [B, C, ...] (or one shared rig [C, ...]) give [B, C, H, W, ...].

    Args:
        splats: world-space, activated Gaussians.
        cameras: the rig; cast to the splats' device and dtype.
        background: [3] RGB, or anything broadcastable to [..., C, 3].
        backend: "auto" uses gsplat for CUDA tensors when it is installed, else the
            reference; "gsplat" and "reference" force one.
        settings: rasterizer constants.
        budget: gsplat only: fixed-size intersection lists, so the call never waits for the
            GPU and can be captured in a CUDA graph (see ``tile_intersect``).
        depth: also return the depth. Both backends draw it as a fourth colour channel,
            which costs gsplat's backward pass about 15% (a training step needs no depth).

    Returns:
        RenderOutput.
    """
    if backend not in ("auto", "gsplat", "reference"):
        raise ValueError(f"backend must be 'auto', 'gsplat' or 'reference', got {backend!r}")
    lead = _check_splats(splats)
    cameras = _match_cameras(cameras, lead, splats.means)
    backgrounds = _broadcast_background(background, lead + (cameras.count, 3), splats.means)
    opacities = splats.opacities.expand(lead + (splats.count,))
    colors = _view_colors(splats, cameras, lead)

    use_gsplat = backend == "gsplat" or (
        backend == "auto" and splats.means.is_cuda and gsplat_available()
    )
    if budget is not None and not use_gsplat:
        raise ValueError("a tile budget applies only to the gsplat backend (CUDA tensors)")
    args = (
        splats.means,
        splats.quats,
        splats.scales,
        opacities,
        colors,
        cameras.world_to_cam,
        cameras.K,
        cameras.width,
        cameras.height,
        backgrounds,
        settings,
    )
    rasterize = partial(rasterize_gsplat, budget=budget) if use_gsplat else rasterize_reference
    return RenderOutput(*rasterize(*args, depth=depth))


def _broadcast_background(
    background: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor
) -> torch.Tensor:
    """``background`` as a contiguous [..., C, 3] tensor on ``like``'s device and dtype."""
    try:
        return torch.broadcast_to(background.to(like), shape).contiguous()
    except RuntimeError as err:
        raise ValueError(f"background {tuple(background.shape)} does not broadcast to {shape}") from err


def _view_colors(splats: Splats, cameras: Cameras, lead: tuple[int, ...]) -> torch.Tensor:
    """[..., N, 3] plain colours, or [..., C, N, 3] per-view colours evaluated from SH."""
    n = splats.count
    if splats.sh_degree is None:
        return splats.colors.expand(lead + (n, 3))
    coeffs = splats.colors.expand(lead + splats.colors.shape[-3:])
    return sh_to_rgb(splats.sh_degree, coeffs, splats.means, cameras.centers)


def _check_splats(splats: Splats) -> tuple[int, ...]:
    """Validate field shapes; returns the frame batch shape, () or (B,)."""
    means = splats.means
    if means.ndim not in (2, 3) or means.shape[-1] != 3:
        raise ValueError(f"Splats.means must be [N, 3] or [B, N, 3], got {tuple(means.shape)}")
    lead, n = tuple(means.shape[:-2]), means.shape[-2]

    def check(name: str, t: torch.Tensor, tail: tuple[int, ...], shareable: bool) -> None:
        allowed = [lead + tail] + ([tail] if shareable and lead else [])
        if tuple(t.shape) not in allowed:
            raise ValueError(
                f"Splats.{name} must be {' or '.join(str(list(a)) for a in allowed)}, "
                f"got {list(t.shape)}"
            )
        if t.device != means.device:
            raise ValueError(f"Splats.{name} is on {t.device}, means on {means.device}")

    check("quats", splats.quats, (n, 4), shareable=False)
    check("scales", splats.scales, (n, 3), shareable=False)
    check("opacities", splats.opacities, (n,), shareable=True)
    if splats.sh_degree is None:
        check("colors", splats.colors, (n, 3), shareable=True)
    else:
        if not 0 <= splats.sh_degree <= MAX_SH_DEGREE:
            raise ValueError(f"sh_degree must be in 0..{MAX_SH_DEGREE}, got {splats.sh_degree}")
        k = splats.colors.shape[-2] if splats.colors.ndim >= 2 else 0
        if k < (splats.sh_degree + 1) ** 2:
            raise ValueError(
                f"sh_degree {splats.sh_degree} needs [..., N, {(splats.sh_degree + 1) ** 2}, 3] "
                f"colors, got {list(splats.colors.shape)}"
            )
        check("colors", splats.colors, (n, k, 3), shareable=True)
    return lead


def _match_cameras(cameras: Cameras, lead: tuple[int, ...], like: torch.Tensor) -> Cameras:
    """The rig on ``like``'s device and dtype, with the splats' frame batch."""
    cameras = cameras.to(device=like.device, dtype=like.dtype)
    if lead and not cameras.batched:
        return cameras.expand(lead[0])
    if tuple(cameras.batch_shape) != lead:
        raise ValueError(
            f"cameras with batch shape {tuple(cameras.batch_shape)} do not match splats with "
            f"batch shape {lead}: batched splats [B, N, ...] need cameras [B, C, ...] or [C, ...]"
        )
    return cameras
