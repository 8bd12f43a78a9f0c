"""The photometric loss (1 - w) L1 + w D-SSIM in Triton kernels, forward and backward.

The same loss as ``losses.photometric_loss`` (11 x 11 Gaussian window, sigma 1.5, zero-padded
borders, mean over pixels and channels), with its gradient written out. Per pixel and channel

    S = A1 A2 / (B1 B2)      A1 = 2 mu_x mu_y + C1    A2 = 2 s_xy + C2
                             B1 = mu_x^2 + mu_y^2 + C1    B2 = s_xx + s_yy + C2
    dS/dmu_x  = 2 mu_y (A2 - A1) / (B1 B2) - 2 mu_x S (1 / B1 - 1 / B2)
    dS/dE[xx] = -S / B2
    dS/dE[xy] = 2 A1 / (B1 B2)

and since the window G is symmetric, the SSIM part of dL/dx is
G * dS/dmu_x + 2 x (G * dS/dE[xx]) + y (G * dS/dE[xy]). The window is separable, so each blur
is two kernels, along rows then along columns (11 + 11 taps instead of 121): forward, the
five moments, then SSIM and its three derivative maps; backward, those three maps, then
dL/dx. Each program covers a tile of pixels with all three channels (a fourth, masked lane
keeps the channel axis a power of two).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import torch
import triton
import triton.language as tl

from backend.refine.losses import SSIM_C1, SSIM_C2, SSIM_WINDOW, gaussian_window

_TILE_H = 8
_TILE_W = 32


@triton.jit
def _tile(H, W, TH: tl.constexpr, TW: tl.constexpr):
    """Rows, columns and channel lanes of this program's tile; the offset of its image and the
    size of one [B, H, W, 3] plane of a map stack."""
    tx, ty, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = ty * TH + tl.arange(0, TH)[:, None, None]
    cols = tx * TW + tl.arange(0, TW)[None, :, None]
    return rows, cols, tl.arange(0, 4)[None, None, :], b * H * W * 3, tl.num_programs(2) * H * W * 3


@triton.jit
def _tap(rows, cols, ch, H, W, k, R: tl.constexpr, ALONG_ROWS: tl.constexpr):
    """Offset within an image, and in-image mask, of each pixel's k-th window tap; the zero
    padding outside the image is the mask."""
    if ALONG_ROWS:
        r, c = rows, cols + (k - R)
    else:
        r, c = rows + (k - R), cols
    return (r * W + c) * 3 + ch, (r >= 0) & (r < H) & (c >= 0) & (c < W) & (ch < 3)


@triton.jit
def _blur(src_ptr, g_ptr, rows, cols, ch, H, W, COUNT: tl.constexpr, R: tl.constexpr, ALONG_ROWS: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """One pass of the window over the first COUNT (2 or 3) planes of a map stack at
    ``src_ptr`` (already offset to this image); the third result is 0 when COUNT is 2."""
    plane = tl.num_programs(2) * H * W * 3
    first = tl.zeros([TH, TW, 4], tl.float32)
    second = tl.zeros([TH, TW, 4], tl.float32)
    third = tl.zeros([TH, TW, 4], tl.float32)
    for k in range(2 * R + 1):
        offset, inside = _tap(rows, cols, ch, H, W, k, R, ALONG_ROWS)
        weight = tl.load(g_ptr + k)
        first += weight * tl.load(src_ptr + offset, mask=inside, other=0.0)
        second += weight * tl.load(src_ptr + plane + offset, mask=inside, other=0.0)
        if COUNT == 3:
            third += weight * tl.load(src_ptr + 2 * plane + offset, mask=inside, other=0.0)
    return first, second, third


@triton.jit(do_not_specialize=["H", "W"])
def _moments_along_rows(x_ptr, y_ptr, g_ptr, out_ptr, H, W, R: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """The pass along rows of the window over x, y, x^2, y^2 and xy -> out [5, B, H, W, 3]."""
    rows, cols, ch, base, plane = _tile(H, W, TH, TW)
    sx = tl.zeros([TH, TW, 4], tl.float32)
    sy = tl.zeros([TH, TW, 4], tl.float32)
    sxx = tl.zeros([TH, TW, 4], tl.float32)
    syy = tl.zeros([TH, TW, 4], tl.float32)
    sxy = tl.zeros([TH, TW, 4], tl.float32)
    for k in range(2 * R + 1):
        offset, inside = _tap(rows, cols, ch, H, W, k, R, True)
        xv = tl.load(x_ptr + base + offset, mask=inside, other=0.0)
        yv = tl.load(y_ptr + base + offset, mask=inside, other=0.0)
        weight = tl.load(g_ptr + k)
        sx += weight * xv
        sy += weight * yv
        sxx += weight * xv * xv
        syy += weight * yv * yv
        sxy += weight * xv * yv
    centre, valid = _tap(rows, cols, ch, H, W, R, R, True)
    at = out_ptr + base + centre
    tl.store(at, sx, mask=valid)
    tl.store(at + plane, sy, mask=valid)
    tl.store(at + 2 * plane, sxx, mask=valid)
    tl.store(at + 3 * plane, syy, mask=valid)
    tl.store(at + 4 * plane, sxy, mask=valid)


@triton.jit(do_not_specialize=["H", "W"])
def _ssim_along_columns(
    x_ptr, y_ptr, g_ptr, moments_ptr, d_ptr, partial_ptr, H, W,
    C1: tl.constexpr, C2: tl.constexpr, R: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
):
    """The pass along columns, then SSIM: its three partial-derivative maps -> d [3, B, H, W, 3],
    and this tile's sums of SSIM and |x - y| -> partial [programs, 2]."""
    rows, cols, ch, base, plane = _tile(H, W, TH, TW)
    mu_x, mu_y, e_xx = _blur(moments_ptr + base, g_ptr, rows, cols, ch, H, W, 3, R, False, TH, TW)
    e_yy, e_xy, _ = _blur(moments_ptr + 3 * plane + base, g_ptr, rows, cols, ch, H, W, 2, R, False, TH, TW)
    a1 = 2 * mu_x * mu_y + C1
    a2 = 2 * (e_xy - mu_x * mu_y) + C2
    b1 = mu_x * mu_x + mu_y * mu_y + C1
    b2 = (e_xx - mu_x * mu_x) + (e_yy - mu_y * mu_y) + C2
    s = a1 * a2 / (b1 * b2)
    centre, valid = _tap(rows, cols, ch, H, W, R, R, False)
    at = d_ptr + base + centre
    tl.store(at, 2 * mu_y * (a2 - a1) / (b1 * b2) - 2 * mu_x * s * (1 / b1 - 1 / b2), mask=valid)
    tl.store(at + plane, -s / b2, mask=valid)
    tl.store(at + 2 * plane, 2 * a1 / (b1 * b2), mask=valid)
    xc = tl.load(x_ptr + base + centre, mask=valid, other=0.0)
    yc = tl.load(y_ptr + base + centre, mask=valid, other=0.0)
    program = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
    tl.store(partial_ptr + 2 * program, tl.sum(tl.sum(tl.sum(tl.where(valid, s, 0.0), 2), 1), 0))
    tl.store(partial_ptr + 2 * program + 1, tl.sum(tl.sum(tl.sum(tl.abs(xc - yc), 2), 1), 0))


@triton.jit(do_not_specialize=["H", "W"])
def _blur_derivatives_along_rows(d_ptr, g_ptr, out_ptr, H, W, R: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """The pass along rows of the window over the three maps d [3, B, H, W, 3] -> out."""
    rows, cols, ch, base, plane = _tile(H, W, TH, TW)
    first, second, third = _blur(d_ptr + base, g_ptr, rows, cols, ch, H, W, 3, R, True, TH, TW)
    centre, valid = _tap(rows, cols, ch, H, W, R, R, True)
    at = out_ptr + base + centre
    tl.store(at, first, mask=valid)
    tl.store(at + plane, second, mask=valid)
    tl.store(at + 2 * plane, third, mask=valid)


@triton.jit(do_not_specialize=["H", "W"])
def _gradient_along_columns(
    x_ptr, y_ptr, g_ptr, d_ptr, grad_out_ptr, grad_ptr, H, W, l1_scale, ssim_scale,
    R: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
):
    """The pass along columns over the row-blurred maps d [3, B, H, W, 3], then dL/dx."""
    rows, cols, ch, base, _ = _tile(H, W, TH, TW)
    blur_mu, blur_xx, blur_xy = _blur(d_ptr + base, g_ptr, rows, cols, ch, H, W, 3, R, False, TH, TW)
    centre, valid = _tap(rows, cols, ch, H, W, R, R, False)
    xc = tl.load(x_ptr + base + centre, mask=valid, other=0.0)
    yc = tl.load(y_ptr + base + centre, mask=valid, other=0.0)
    sign = tl.where(xc > yc, 1.0, tl.where(xc < yc, -1.0, 0.0))
    grad = l1_scale * sign + ssim_scale * (blur_mu + 2 * xc * blur_xx + yc * blur_xy)
    tl.store(grad_ptr + base + centre, tl.load(grad_out_ptr) * grad, mask=valid)


@lru_cache(maxsize=4)
def _window(device: torch.device) -> torch.Tensor:
    return gaussian_window(device, torch.float32)


_TILE = {"R": SSIM_WINDOW // 2, "TH": _TILE_H, "TW": _TILE_W}


def _grid(x: torch.Tensor) -> tuple[int, int, int]:
    """Programs over the tiles of images x [B, H, W, 3]."""
    batch, height, width, _ = x.shape
    return (triton.cdiv(width, _TILE_W), triton.cdiv(height, _TILE_H), batch)


def _moments(x: torch.Tensor, y: torch.Tensor, moments: torch.Tensor) -> None:
    _moments_along_rows[_grid(x)](x, y, _window(x.device), moments, x.shape[1], x.shape[2], **_TILE)


def _ssim(x: torch.Tensor, y: torch.Tensor, moments: torch.Tensor, derivatives: torch.Tensor, partials: torch.Tensor) -> None:
    _ssim_along_columns[_grid(x)](x, y, _window(x.device), moments, derivatives, partials, x.shape[1], x.shape[2], C1=SSIM_C1, C2=SSIM_C2, **_TILE)


def _blur_derivatives(derivatives: torch.Tensor, blurred: torch.Tensor) -> None:
    _blur_derivatives_along_rows[_grid(derivatives[0])](derivatives, _window(derivatives.device), blurred, derivatives.shape[2], derivatives.shape[3], **_TILE)


def _gradient(x: torch.Tensor, y: torch.Tensor, blurred: torch.Tensor, grad_out: torch.Tensor, grad: torch.Tensor, ssim_weight: float) -> None:
    n = x.numel()
    _gradient_along_columns[_grid(x)](
        x, y, _window(x.device), blurred, grad_out, grad, x.shape[1], x.shape[2], (1.0 - ssim_weight) / n, -ssim_weight / n, **_TILE
    )


class _PhotometricLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rendered: torch.Tensor, target: torch.Tensor, ssim_weight: float) -> torch.Tensor:  # type: ignore[override]
        x, y = rendered.contiguous(), target.contiguous()
        moments = torch.empty((5, *x.shape), device=x.device, dtype=torch.float32)
        _moments(x, y, moments)
        derivatives = torch.empty((3, *x.shape), device=x.device, dtype=torch.float32)
        partials = torch.empty(math.prod(_grid(x)), 2, device=x.device, dtype=torch.float32)
        _ssim(x, y, moments, derivatives, partials)
        ctx.save_for_backward(x, y, derivatives)
        ctx.ssim_weight = ssim_weight
        ssim_sum, l1_sum = partials.sum(0) / x.numel()
        return (1.0 - ssim_weight) * l1_sum + ssim_weight * (1.0 - ssim_sum)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        x, y, derivatives = ctx.saved_tensors
        blurred = torch.empty_like(derivatives)
        _blur_derivatives(derivatives, blurred)
        grad = torch.empty_like(x)
        _gradient(x, y, blurred, grad_out.contiguous(), grad, ctx.ssim_weight)
        return grad, None, None


def first_launches(device: torch.device) -> list[Callable[[], None]]:
    """One launch of each kernel on a small scratch image: the first launch compiles a kernel
    (sizes are not specialized on, so these serve every image size)."""
    x = torch.zeros(1, _TILE_H, _TILE_W, 3, device=device)
    maps = torch.zeros(3, *x.shape, device=device)
    return [
        lambda: _moments(x, x, torch.empty(5, *x.shape, device=device)),
        lambda: _ssim(x, x, torch.zeros(5, *x.shape, device=device), torch.empty_like(maps), torch.empty(1, 2, device=device)),
        lambda: _blur_derivatives(maps, torch.empty_like(maps)),
        lambda: _gradient(x, x, maps, torch.ones((), device=device), torch.empty_like(x), 0.2),
    ]


def photometric_loss(rendered: torch.Tensor, target: torch.Tensor, ssim_weight: float) -> torch.Tensor:
    """``losses.photometric_loss`` of [B, H, W, 3] float32 images on a CUDA device; the
    gradient reaches ``rendered`` only."""
    return _PhotometricLoss.apply(rendered, target.detach(), float(ssim_weight))
