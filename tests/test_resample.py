"""UV images of per-Gaussian values, and avatars carried onto a layout of another count."""

from __future__ import annotations

import torch

from backend.gaussians.avatar import deform, rgb_to_sh_dc
from backend.gaussians.resample import resample_avatar
from backend.gaussians.surface import surface_avatar
from backend.gaussians.uv_image import filled_uv_image, push_pull_fill, read_at_texels
from backend.head.model import HeadModel
from backend.refine.losses import psnr
from backend.render.camera import orbit_cameras
from backend.render.rasterize import render


def test_push_pull_fill_keeps_known_and_fills_gaps() -> None:
    grid = torch.zeros(1, 3, 16, 16)
    weight = torch.zeros(1, 1, 16, 16)
    grid[..., :8, :] = torch.tensor([0.2, 0.4, 0.6])[:, None, None]
    weight[..., :8, :] = 1.0
    filled = push_pull_fill(grid, weight)
    assert torch.allclose(filled[..., :8, :], grid[..., :8, :])
    assert torch.allclose(filled[..., 8:, :], torch.tensor([0.2, 0.4, 0.6])[:, None, None].expand(3, 8, 16)[None], atol=1e-5)


def _uv_colour(binding) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """[N, 3] a smooth colour field over the UV square, read at each texel's centre."""
    uv = (binding.texel.float() + 0.5) / binding.resolution
    return torch.stack([0.5 + 0.4 * torch.sin(3 * uv[:, 0]), 0.5 + 0.4 * torch.cos(2 * uv[:, 1]), uv.sum(-1) / 2], dim=-1)


def test_uv_image_reads_back_its_own_texels_and_a_denser_layouts(head: HeadModel) -> None:
    coarse = surface_avatar(head, torch.zeros(head.n_shape), 4_000, lambda f, b: torch.zeros(len(f), 3)).binding
    dense = surface_avatar(head, torch.zeros(head.n_shape), 16_000, lambda f, b: torch.zeros(len(f), 3)).binding
    image = filled_uv_image(_uv_colour(coarse), coarse)
    assert torch.allclose(read_at_texels(image, coarse), _uv_colour(coarse), atol=1e-5)
    # A smooth field comes back at the denser layout's texels to within a coarse texel's change.
    assert float((read_at_texels(image, dense) - _uv_colour(dense)).abs().max()) < 2.0 / coarse.resolution


def test_resampled_surface_avatar_is_the_denser_layouts_surface_start(head: HeadModel) -> None:
    shape = torch.zeros(head.n_shape)
    coarse = surface_avatar(head, shape, 8_000, lambda f, b: torch.full((len(f), 3), 0.3))
    dense = surface_avatar(head, shape, 20_000, lambda f, b: torch.full((len(f), 3), 0.3))
    coarse.static_offset = 0.001 * torch.ones(head.data.v_template.shape[0], 3)
    coarse.local.rotation = -coarse.local.rotation  # the same rotations with the other sign
    got = resample_avatar(coarse, head, 20_000)
    assert got.count == 20_000 and torch.equal(got.binding.face_idx, dense.binding.face_idx)
    # Each layout's Gaussians are as wide as its own texel spacing makes them.
    assert torch.allclose(got.local.log_scale, dense.local.log_scale, atol=1e-4)
    assert torch.allclose(got.local.rotation, dense.local.rotation, atol=1e-5)
    assert torch.allclose(got.local.opacity_logit, dense.local.opacity_logit, atol=1e-4)
    assert torch.allclose(got.local.sh, dense.local.sh, atol=1e-5)
    assert torch.equal(got.static_offset, coarse.static_offset) and got.meta["resampled_from"] == 8_000
    assert resample_avatar(coarse, head, 8_000) is coarse


def test_resampled_avatar_renders_as_the_one_it_came_from(head: HeadModel) -> None:
    shape = torch.zeros(head.n_shape)
    coarse = surface_avatar(head, shape, 8_000, lambda f, b: torch.zeros(len(f), 3))
    coarse.local.sh[:, 0] = rgb_to_sh_dc(_uv_colour(coarse.binding))
    dense = resample_avatar(coarse, head, 30_000)
    params = head.neutral_params(1)
    cams = orbit_cameras(4, 0.8, 128, 128, focal_px=300)
    coarse_rgb, dense_rgb = (render(deform(a, head, params).frame(0), cams, torch.zeros(3)).rgb for a in (coarse, dense))
    assert psnr(dense_rgb, coarse_rgb) > 30.0
    # A denser layout's plain surface start, coloured by a different field, does not.
    other = resample_avatar(coarse, head, 30_000)
    other.local.sh[:, 0] = rgb_to_sh_dc(_uv_colour(other.binding).flip(-1))
    assert psnr(render(deform(other, head, params).frame(0), cams, torch.zeros(3)).rgb, coarse_rgb) < 25.0
