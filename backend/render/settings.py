"""Rasterizer constants shared by the gsplat path and the pure-torch reference."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RasterSettings:
    """Constants of gsplat 1.5.3's "classic" rasterization; both backends read them.

    gsplat compiles ``alpha_min``, ``alpha_max``, ``transmittance_min`` and
    ``extent_sigmas`` into its kernels, so only the reference can use other values.

    Attributes:
        eps2d: pixels^2 added to the diagonal of every projected 2D covariance (a low-pass
            filter that keeps sub-pixel Gaussians at least ~0.5 px wide). Classic mode does
            not rescale opacity to compensate.
        near_plane: metres; Gaussians whose camera-space z is below it are dropped.
        far_plane: metres; Gaussians whose camera-space z is above it are dropped.
        alpha_min: a Gaussian whose alpha at a pixel is below this is skipped there, and a
            Gaussian whose opacity is below it is culled outright (gsplat: 1/255).
        alpha_max: per-Gaussian alpha is clamped to this so transmittance never hits 0.
        transmittance_min: a pixel stops compositing at the first Gaussian that would
            bring its transmittance to or below this; that Gaussian is not composited.
        extent_sigmas: cap, in standard deviations, of a Gaussian's screen bounding box;
            the box is also shrunk to where alpha can still reach ``alpha_min``.
        tile_size: pixels per side of gsplat's tiles; the reference splits the image into
            bands of whole tile rows.
        packed: gsplat's packed mode (less memory for many cameras; it synchronizes with the
            host every call, so the unpacked mode is faster for the one-view training steps).
        max_pairs_per_chunk: the reference's memory bound: at most about this many
            (Gaussian, pixel) pairs are evaluated at once (a band holds at least one tile
            row, so a single very dense row can exceed it).
    """

    eps2d: float = 0.3
    near_plane: float = 0.01
    far_plane: float = 1e10
    alpha_min: float = 1.0 / 255.0
    alpha_max: float = 0.999
    transmittance_min: float = 1e-4
    extent_sigmas: float = 3.33
    tile_size: int = 16
    max_pairs_per_chunk: int = 1 << 21
    packed: bool = False
