"""Real spherical harmonics (degree 0..3) in gsplat's convention, for both backends.

Colours are evaluated here, in torch, for the gsplat path too, so that both rasterizers
composite exactly the same per-view colours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_SH_DEGREE = 3

# Normalisation constants of the real SH basis, band by band (the sign pattern is that of
# gsplat and the original 3DGS code, so their trained coefficients read the same here).
_C0 = 0.28209479177387814
_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, 0.31539156525252005, 0.5462742152960396)
_C3 = (
    0.5900435899266435,
    2.890611442640554,
    0.4570457994644658,
    0.3731763325901154,
    1.445305721320277,
)


def sh_basis(degree: int, dirs: torch.Tensor) -> torch.Tensor:
    """Real SH basis functions at unit directions.

    Args:
        degree: 0..3.
        dirs: [..., 3] unit vectors.

    Returns:
        [..., (degree + 1)^2] basis values, ordered band by band, m = -l..l.
    """
    if not 0 <= degree <= MAX_SH_DEGREE:
        raise ValueError(f"SH degree must be in 0..{MAX_SH_DEGREE}, got {degree}")
    x, y, z = dirs.unbind(-1)
    bands = [torch.full_like(x, _C0)]
    if degree >= 1:
        bands += [-_C1 * y, _C1 * z, -_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        bands += [
            _C2[0] * x * y,
            -_C2[0] * y * z,
            _C2[1] * (3.0 * zz - 1.0),
            -_C2[0] * x * z,
            _C2[2] * (xx - yy),
        ]
    if degree >= 3:
        bands += [
            -_C3[0] * y * (3.0 * xx - yy),
            _C3[1] * x * y * z,
            -_C3[2] * y * (5.0 * zz - 1.0),
            _C3[3] * z * (5.0 * zz - 3.0),
            -_C3[2] * x * (5.0 * zz - 1.0),
            _C3[4] * z * (xx - yy),
            -_C3[0] * x * (xx - 3.0 * yy),
        ]
    return torch.stack(bands, dim=-1)


def sh_to_rgb(
    degree: int,
    coeffs: torch.Tensor,
    means: torch.Tensor,
    cam_centers: torch.Tensor,
) -> torch.Tensor:
    """Per-view RGB of SH-coloured Gaussians, as gsplat evaluates it.

    The view direction runs from the camera centre to the Gaussian's mean; the result is
    offset by +0.5 and clamped at 0 (gsplat / 3DGS convention), with no upper clamp.

    Args:
        degree: SH degree to evaluate, 0..3; ``coeffs`` may hold more bands.
        coeffs: [..., N, K, 3] coefficients, K >= (degree + 1)^2.
        means: [..., N, 3] Gaussian centres, world frame.
        cam_centers: [..., C, 3] camera centres, world frame.

    Returns:
        [..., C, N, 3] linear RGB.
    """
    n_basis = (degree + 1) ** 2
    if coeffs.shape[-2] < n_basis:
        raise ValueError(
            f"SH degree {degree} needs {n_basis} coefficients, got {coeffs.shape[-2]}"
        )
    dirs = F.normalize(means[..., None, :, :] - cam_centers[..., :, None, :], dim=-1)
    basis = sh_basis(degree, dirs)  # [..., C, N, n_basis]
    rgb = torch.einsum("...cnk,...nkd->...cnd", basis, coeffs[..., :n_basis, :])
    return torch.clamp_min(rgb + 0.5, 0.0)
