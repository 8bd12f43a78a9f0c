"""Pure-torch Gaussian rasterizer with gsplat 1.5.3's "classic" math (CPU reference).

Same model as gsplat's ``rasterization(..., rasterize_mode="classic")``:

* EWA projection: Sigma_2d = J W Sigma W^T J^T + eps2d * I, with Sigma = R S S^T R^T, W the
  world -> camera rotation and J the pinhole Jacobian at the camera-space mean (whose x/z
  and y/z are clamped to 1.3x the half field of view, as gsplat does).
* Culling: near/far planes on camera-space z, opacity below 1/255, and a screen bounding
  box of ceil(e * sqrt(Sigma_2d diagonal)) pixels with e = min(3.33, sqrt(2 ln(255 o)))
  that must overlap the image.
* Pixel (i, j)'s centre is (j + 0.5, i + 0.5); alpha = min(0.999, o * exp(-d^T Sigma_2d^-1 d / 2)),
  skipped below 1/255; front-to-back compositing by camera-space z, stopping before the
  first Gaussian that would bring transmittance to <= 1e-4.
* Depth is planar camera-space z, composited like a colour and divided by alpha
  (gsplat's "RGB+ED"), so it is 0 where alpha is 0.

Instead of testing every pixel of every tile a Gaussian's bounding box touches, each
Gaussian enumerates, row by row, the pixels of its alpha >= 1/255 ellipse. That ellipse lies
inside gsplat's box and holds every pixel gsplat would composite, so the image is the same
for far fewer (Gaussian, pixel) pairs. Memory is bounded by processing the image in bands of
whole tile rows holding at most ``RasterSettings.max_pairs_per_chunk`` pairs. Within a band,
a gradient-free pass finds the pairs that actually composite (above the alpha threshold and
before termination); only those are re-evaluated under autograd, keeping the backward small.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from backend.gaussians.frames import quat_to_matrix
from backend.render.settings import RasterSettings

# Order of the per-Gaussian columns gathered for every (Gaussian, pixel) pair.
_MX, _MY, _CA, _CB, _CC, _OPACITY, _FEATURES = 0, 1, 2, 3, 4, 5, 6


class Projection(NamedTuple):
    """Screen-space Gaussians, for C cameras.

    Attributes:
        means2d: [..., C, N, 2] pixel coordinates of the projected means.
        conics: [..., C, N, 3] (a, b, c) of Sigma_2d^-1 = [[a, b], [b, c]], pixels^-2.
        depths: [..., C, N] camera-space z, metres.
        radii: [..., C, N, 2] bounding-box half sizes in pixels (x, y); 0 where culled.
            No gradient.
    """

    means2d: torch.Tensor
    conics: torch.Tensor
    depths: torch.Tensor
    radii: torch.Tensor


def project_gaussians(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    world_to_cam: torch.Tensor,
    K: torch.Tensor,
    width: int,
    height: int,
    settings: RasterSettings,
) -> Projection:
    """EWA-project 3D Gaussians into C pinhole cameras (gsplat's fused projection).

    Args:
        means: [..., N, 3] world frame, metres.
        quats: [..., N, 4] (w, x, y, z), any norm.
        scales: [..., N, 3] standard deviations, metres.
        opacities: [..., N] in [0, 1]; they size the bounding boxes.
        world_to_cam: [..., C, 4, 4] world -> OpenCV camera.
        K: [..., C, 3, 3] intrinsics, pixels.
        width, height: image size, pixels.
    """
    rot = world_to_cam[..., :3, :3]
    mean_c = torch.einsum("...cij,...nj->...cni", rot, means) + world_to_cam[..., None, :3, 3]
    x, y, z = mean_c.unbind(-1)
    in_depth = (z >= settings.near_plane) & (z <= settings.far_plane)
    # Culled Gaussians still flow through autograd; a safe z keeps their zero gradients finite.
    z = torch.where(in_depth, z, torch.ones_like(z))

    fx, fy = K[..., 0, 0, None], K[..., 1, 1, None]
    cx, cy = K[..., 0, 2, None], K[..., 1, 2, None]
    # gsplat evaluates the Jacobian at a mean clamped to 1.3x the half field of view so that
    # Gaussians far outside the frustum do not blow up.
    lim_x = 0.3 * 0.5 * width / fx
    lim_y = 0.3 * 0.5 * height / fy
    tx = torch.clamp(x / z, min=-(cx / fx + lim_x), max=(width - cx) / fx + lim_x)
    ty = torch.clamp(y / z, min=-(cy / fy + lim_y), max=(height - cy) / fy + lim_y)
    # J W, row by row: J = [[fx/z, 0, -fx tx/z], [0, fy/z, -fy ty/z]] has two zeros.
    r0, r1, r2 = (rot[..., None, i, :] for i in range(3))  # [..., C, 1, 3]
    JW = torch.stack(
        [
            (fx / z)[..., None] * (r0 - tx[..., None] * r2),
            (fy / z)[..., None] * (r1 - ty[..., None] * r2),
        ],
        dim=-2,
    )  # [..., C, N, 2, 3]
    M = quat_to_matrix(quats) * scales[..., None, :]  # R S, [..., N, 3, 3]
    # Broadcast products instead of matmul: batched 2x3 @ 3x3 products are slow on CPU.
    JWM = (JW[..., :, :, None] * M[..., None, :, None, :, :]).sum(dim=-2)  # [..., C, N, 2, 3]
    cov2d = (JWM[..., :, None, :] * JWM[..., None, :, :]).sum(dim=-1)  # [..., C, N, 2, 2]
    a = cov2d[..., 0, 0] + settings.eps2d
    b = cov2d[..., 0, 1]
    c = cov2d[..., 1, 1] + settings.eps2d
    det = a * c - b * b
    conics = torch.stack([c, -b, a], dim=-1) / det[..., None]
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)

    with torch.no_grad():
        opa = opacities[..., None, :].expand_as(det)
        extent = torch.sqrt(2.0 * torch.log(opa.clamp_min(settings.alpha_min) / settings.alpha_min))
        extent = extent.clamp_max(settings.extent_sigmas)
        radii = torch.ceil(extent[..., None] * torch.sqrt(torch.stack([a, c], dim=-1)))
        mx, my = means2d.unbind(-1)
        rx, ry = radii.unbind(-1)
        keep = (
            in_depth
            & (det > 0)
            & (opa >= settings.alpha_min)
            & ((rx > 0) | (ry > 0))
            & (mx + rx > 0)
            & (mx - rx < width)
            & (my + ry > 0)
            & (my - ry < height)
        )
        radii = radii * keep[..., None]
    return Projection(means2d, conics, mean_c[..., 2], radii)


def _segment_cumsum(
    values: torch.Tensor, segment_start: torch.Tensor, exclusive: bool = False
) -> torch.Tensor:
    """Cumulative sums restarting at each segment, in float64.

    Args:
        values: [P] grouped into contiguous segments.
        segment_start: [P] index of the first element of each element's segment.
        exclusive: sum the elements before each one instead of up to and including it.
    """
    # A global float32 scan over millions of pairs would lose the per-pixel sums to
    # cancellation; float64 keeps them exact enough.
    values = values.double()
    inclusive = torch.cumsum(values, dim=0)
    before = inclusive - values
    return (before if exclusive else inclusive) - before.index_select(0, segment_start)


def _segment_starts(pixel: torch.Tensor, n_pixels: int) -> torch.Tensor:
    """[P] index of the first pair of each pair's pixel, for pairs sorted by ``pixel``."""
    counts = torch.bincount(pixel, minlength=n_pixels)
    first = torch.cumsum(counts, dim=0) - counts
    return first.index_select(0, pixel)


def _pixel_centres(
    pixel: torch.Tensor, row0: int, width: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous (x, y) [P] of the centres of band-local row-major pixel indices."""
    return (pixel % width).to(dtype) + 0.5, (pixel // width + row0).to(dtype) + 0.5


def _pair_alpha(
    gathered: list[torch.Tensor], px: torch.Tensor, py: torch.Tensor, settings: RasterSettings
) -> torch.Tensor:
    """[P] alpha of each pair from its Gaussian's gathered columns and its pixel centre."""
    dx = gathered[_MX] - px
    dy = gathered[_MY] - py
    sigma = 0.5 * (gathered[_CA] * dx * dx + gathered[_CC] * dy * dy) + gathered[_CB] * dx * dy
    return torch.clamp_max(gathered[_OPACITY] * torch.exp(-sigma), settings.alpha_max)


class _Spans(NamedTuple):
    """Horizontal runs of pixels, one per (Gaussian, row), ordered by Gaussian then row.

    Attributes (all [S], int64):
        gaussian: index into the depth-sorted Gaussians.
        row: image row.
        x0: first column.
        count: number of pixels (> 0).
    """

    gaussian: torch.Tensor
    row: torch.Tensor
    x0: torch.Tensor
    count: torch.Tensor


# Mahalanobis-squared slack so that rounding never drops a pixel whose alpha reaches the
# threshold; the extra pixels are rejected by the exact alpha test.
_ELLIPSE_SLACK = 1e-3


def _alpha_spans(columns: list[torch.Tensor], width: int, height: int, settings: RasterSettings) -> _Spans:
    """Pixels whose centres lie where each Gaussian's alpha can reach ``alpha_min``.

    That region is the ellipse d^T Sigma_2d^-1 d <= 2 ln(opacity / alpha_min); it lies inside
    gsplat's bounding box, so enumerating it drops only pixels gsplat would skip.
    """
    mx, my, ca, cb, cc, opacity = (c.detach().double() for c in columns[: _OPACITY + 1])
    level = 2.0 * torch.log(opacity / settings.alpha_min).clamp_min(0.0)
    level = level.clamp_max(settings.extent_sigmas**2) + _ELLIPSE_SLACK
    det = ca * cc - cb * cb
    half_height = torch.sqrt(level * ca / det)  # sqrt(level * Sigma_yy)
    first = torch.ceil(my - half_height - 0.5).clamp_min(0).long()
    last = torch.floor(my + half_height - 0.5).clamp_max(height - 1).long()
    n_rows = (last - first + 1).clamp_min(0)
    owner = torch.repeat_interleave(torch.arange(mx.numel(), device=mx.device), n_rows)
    row_offset = torch.arange(owner.numel(), device=mx.device) - (torch.cumsum(n_rows, 0) - n_rows)[owner]
    row = first[owner] + row_offset
    dy = row.double() + 0.5 - my[owner]
    a, b = ca[owner], cb[owner]
    # Roots in dx of a dx^2 + 2 b dx dy + c dy^2 = level.
    half_width = torch.sqrt((level[owner] * a - det[owner] * dy * dy).clamp_min(0.0)) / a
    centre = mx[owner] - b * dy / a
    x0 = torch.ceil(centre - half_width - 0.5).clamp_min(0).long()
    x1 = torch.floor(centre + half_width - 0.5).clamp_max(width - 1).long()
    count = x1 - x0 + 1
    keep = torch.nonzero(count > 0).squeeze(1)
    return _Spans(owner[keep], row[keep], x0[keep], count[keep])


def _row_bands(spans: _Spans, height: int, settings: RasterSettings) -> list[tuple[int, int]]:
    """Split rows into bands of whole tile rows holding <= max_pairs_per_chunk pairs each."""
    pairs_per_row = torch.zeros(height, dtype=torch.long, device=spans.row.device)
    pairs_per_row.index_add_(0, spans.row, spans.count)
    tile = settings.tile_size
    tile_rows = F.pad(pairs_per_row, (0, -height % tile)).view(-1, tile).sum(dim=1).tolist()
    bands: list[tuple[int, int]] = []
    start, pairs = 0, 0
    for t, n in enumerate(tile_rows):
        if pairs and pairs + n > settings.max_pairs_per_chunk:
            bands.append((start, t * tile))
            start, pairs = t * tile, 0
        pairs += n
    bands.append((start, height))
    return bands


def _band_pairs(spans: _Spans, row0: int, row1: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All (Gaussian, pixel) pairs of the rows [row0, row1), sorted by (pixel, depth).

    Returns:
        gaussian: [P] int64 indices into the depth-sorted Gaussians.
        pixel: [P] int32 row-major pixel index within the band.
    """
    sel = torch.nonzero((spans.row >= row0) & (spans.row < row1)).squeeze(1)
    count = spans.count[sel]
    base = (spans.row[sel] - row0) * width + spans.x0[sel] - (torch.cumsum(count, 0) - count)
    gaussian = torch.repeat_interleave(spans.gaussian[sel], count)
    pixel = torch.arange(gaussian.numel(), device=gaussian.device) + torch.repeat_interleave(base, count)
    # Pairs come out Gaussian by Gaussian in depth order; a stable sort by pixel keeps that
    # order within each pixel (int32 keys sort several times faster).
    pixel, order = torch.sort(pixel.int(), stable=True)
    return gaussian.index_select(0, order), pixel


def _composite_band(
    columns: list[torch.Tensor],
    gaussian: torch.Tensor,
    pixel: torch.Tensor,
    row0: int,
    n_rows: int,
    width: int,
    settings: RasterSettings,
) -> torch.Tensor:
    """Front-to-back compositing of one band.

    Args:
        columns: [M] each, depth-sorted Gaussians: mean x, y, conic a, b, c, opacity, then
            D feature channels.
        gaussian, pixel: [P] pairs from ``_band_pairs``.

    Returns:
        [n_rows * width, D + 1] composited features and alpha (last channel), no background.
    """
    n_pixels = n_rows * width
    dtype = columns[0].dtype
    with torch.no_grad():
        geometry = [c.detach().index_select(0, gaussian) for c in columns[: _OPACITY + 1]]
        alpha = _pair_alpha(geometry, *_pixel_centres(pixel, row0, width, dtype), settings)
        valid = alpha >= settings.alpha_min
        log_t = _segment_cumsum(
            torch.where(valid, torch.log1p(-alpha), torch.zeros_like(alpha)),
            _segment_starts(pixel, n_pixels),
        )
        used = torch.nonzero(valid & (log_t > math.log(settings.transmittance_min))).squeeze(1)
        gaussian, pixel = gaussian.index_select(0, used), pixel.index_select(0, used)
        starts = _segment_starts(pixel, n_pixels)

    gathered = [c.index_select(0, gaussian) for c in columns]
    alpha = _pair_alpha(gathered, *_pixel_centres(pixel, row0, width, dtype), settings)
    log_t_before = _segment_cumsum(torch.log1p(-alpha), starts, exclusive=True)
    weight = alpha * torch.exp(log_t_before).to(dtype)
    channels = [weight * f for f in gathered[_FEATURES:]] + [weight]
    out = torch.zeros(n_pixels, len(channels), dtype=dtype, device=weight.device)
    # index_add is several times slower with an int32 index.
    return out.index_add(0, pixel.long(), torch.stack(channels, dim=-1))


def rasterize_image(
    means2d: torch.Tensor,
    conics: torch.Tensor,
    opacities: torch.Tensor,
    features: torch.Tensor,
    depths: torch.Tensor,
    radii: torch.Tensor,
    width: int,
    height: int,
    settings: RasterSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite one image's projected Gaussians.

    Args:
        means2d: [N, 2], conics: [N, 3], depths: [N], radii: [N, 2] from ``project_gaussians``.
        opacities: [N].
        features: [N, D] per-Gaussian values to composite (colour, depth, ...).

    Returns:
        features: [H, W, D] sum of w_i * f_i (no background).
        alpha: [H, W, 1] sum of w_i = 1 - final transmittance.
    """
    visible = torch.nonzero((radii > 0).all(dim=-1)).squeeze(1)
    visible = visible[torch.argsort(depths.detach()[visible], stable=True)]
    table = torch.cat([means2d, conics, opacities[:, None], features], dim=-1)
    # One contiguous column per quantity: 1-D gathers are far faster than row gathers.
    columns = list(table.index_select(0, visible).t().contiguous().unbind(0))
    spans = _alpha_spans(columns, width, height, settings)
    bands = []
    for row0, row1 in _row_bands(spans, height, settings):
        gaussian, pixel = _band_pairs(spans, row0, row1, width)
        bands.append(_composite_band(columns, gaussian, pixel, row0, row1 - row0, width, settings))
    out = torch.cat(bands, dim=0).view(height, width, -1)
    return out[..., :-1], out[..., -1:]


def rasterize_reference(
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
    depth: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Render C views of a set of Gaussians (optionally for B frames), any device.

    Args:
        means: [..., N, 3], quats: [..., N, 4], scales: [..., N, 3], opacities: [..., N].
        colors: [..., C, N, 3] per-view or [..., N, 3] linear RGB.
        world_to_cam: [..., C, 4, 4]; K: [..., C, 3, 3].
        backgrounds: [..., C, 3] RGB behind the Gaussians.

    Returns:
        rgb: [..., C, H, W, 3]; alpha: [..., C, H, W, 1]; depth: [..., C, H, W, 1] planar z,
        alpha-normalised, 0 where alpha is 0 (None without ``depth``: one feature fewer).
    """
    proj = project_gaussians(
        means, quats, scales, opacities, world_to_cam, K, width, height, settings
    )
    lead = proj.depths.shape[:-1]  # (..., C)
    n = means.shape[-2]
    if colors.ndim == means.ndim:  # per-Gaussian: the same for every camera
        colors = colors[..., None, :, :].expand(*lead, n, 3)
    n_features = 4 if depth else 3
    features = (torch.cat([colors, proj.depths[..., None]], dim=-1) if depth else colors).reshape(-1, n, n_features)
    opa = opacities[..., None, :].expand(*lead, n).reshape(-1, n)
    images = [
        rasterize_image(m2, co, op, ft, dp, rd, width, height, settings)
        for m2, co, op, ft, dp, rd in zip(
            proj.means2d.reshape(-1, n, 2),
            proj.conics.reshape(-1, n, 3),
            opa,
            features,
            proj.depths.reshape(-1, n),
            proj.radii.reshape(-1, n, 2),
        )
    ]
    feats = torch.stack([f for f, _ in images]).view(*lead, height, width, n_features)
    alpha = torch.stack([a for _, a in images]).view(*lead, height, width, 1)
    rgb = feats[..., :3] + (1.0 - alpha) * backgrounds[..., None, None, :]
    return rgb, alpha, feats[..., 3:] / alpha.clamp_min(1e-10) if depth else None
