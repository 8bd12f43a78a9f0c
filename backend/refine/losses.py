"""Image losses and metrics: L1, SSIM / D-SSIM, PSNR, masked variants.

SSIM is the usual one (Wang et al. 2004): an 11x11 Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, data range 1, computed per channel and averaged; it matches
scikit-image's ``structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)`` away from the borders (a test checks it).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def gaussian_window(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(SSIM_WINDOW, device=device, dtype=dtype) - SSIM_WINDOW // 2
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


@lru_cache(maxsize=8)
def _blur_matrix(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[n, n] banded matrix that applies the window along an axis of n pixels, zero-padded
    at the borders: row r holds the window centred on pixel r."""
    i = torch.arange(n, device=device)
    tap = i[None, :] - i[:, None] + SSIM_WINDOW // 2
    inside = (tap >= 0) & (tap < SSIM_WINDOW)
    return torch.where(inside, gaussian_window(device, dtype)[tap.clamp(0, SSIM_WINDOW - 1)], 0.0)


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM of images [..., H, W, C] in [0, 1] -> [..., H, W] (mean over channels).

    Borders are zero-padded, as in the 3DGS training code, so the map has the image's size.
    """
    lead = a.shape[:-3]
    h, w, c = a.shape[-3:]
    x = a.reshape(-1, h, w, c).permute(0, 3, 1, 2).reshape(-1, h, w)
    y = b.reshape(-1, h, w, c).permute(0, 3, 1, 2).reshape(-1, h, w)
    rows, cols = _blur_matrix(h, a.device, a.dtype), _blur_matrix(w, a.device, a.dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:
        # The separable window as two banded matmuls: on a GPU these run as a few GEMMs,
        # several times faster (forward and backward) than an 11-tap depthwise convolution.
        return rows @ t @ cols.T

    # One blur call over all five moments: fewer, larger kernels.
    mu_x, mu_y, exx, eyy, exy = blur(torch.cat([x, y, x * x, y * y, x * y])).chunk(5)
    sxx = exx - mu_x**2
    syy = eyy - mu_y**2
    sxy = exy - mu_x * mu_y
    s = ((2 * mu_x * mu_y + SSIM_C1) * (2 * sxy + SSIM_C2)) / ((mu_x**2 + mu_y**2 + SSIM_C1) * (sxx + syy + SSIM_C2))
    return s.reshape(-1, c, h, w).mean(1).reshape(*lead, h, w)


def ssim(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean SSIM of [..., H, W, C] images; within ``mask`` [..., H, W, 1] when given."""
    m = ssim_map(a, b)
    if mask is None:
        return m.mean()
    w = mask[..., 0]
    return (m * w).sum() / w.sum().clamp_min(1e-8)


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean()


def mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    if mask is None:
        return ((a - b) ** 2).mean()
    w = mask.expand_as(a)
    return (((a - b) ** 2) * w).sum() / w.sum().clamp_min(1e-8)


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB for images in [0, 1], over all pixels or within ``mask``."""
    err = float(mse(a, b, mask))
    return float("inf") if err == 0 else -10.0 * math.log10(err)


def photometric_loss(rendered: torch.Tensor, target: torch.Tensor, ssim_weight: float) -> torch.Tensor:
    """(1 - w) L1 + w (1 - SSIM), the 3DGS photometric loss, on [..., H, W, 3] images."""
    loss = (1.0 - ssim_weight) * l1(rendered, target)
    if ssim_weight > 0:
        loss = loss + ssim_weight * (1.0 - ssim_map(rendered, target).mean())
    return loss
