"""CPU tests of backend.render: reference rasterizer, cameras, Blender conversions."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.gaussians.frames import quat_to_matrix as quat_to_rotmat
from backend.gaussians.splats import Splats
from backend.render.camera import Cameras, intrinsics, look_at, orbit_cameras, project
from backend.render.rasterize import render
from backend.render.reference import project_gaussians
from backend.render.settings import RasterSettings
from backend.render.sh import sh_basis, sh_to_rgb
from backend.wire import blender_camera_math as bcm

F64 = torch.float64
BG = torch.tensor([0.2, 0.3, 0.4], dtype=F64)


def front_camera(width: int = 48, height: int = 40, focal: float = 60.0, dtype=F64) -> Cameras:
    """Camera at the origin looking down +z (world_to_cam = identity)."""
    K = intrinsics(width, height, focal_px=focal, dtype=dtype)[None]
    return Cameras(K, torch.eye(4, dtype=dtype)[None], width, height)


def splats_of(means, scales, opacities, colors, quats=None) -> Splats:
    means = torch.as_tensor(means, dtype=F64)
    n = means.shape[0]
    if quats is None:
        quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=F64).expand(n, 4).clone()
    return Splats(
        means,
        torch.as_tensor(quats, dtype=F64),
        torch.as_tensor(scales, dtype=F64),
        torch.as_tensor(opacities, dtype=F64),
        torch.as_tensor(colors, dtype=F64),
    )


def analytic_alpha(mean, quat, scale, opacity, cam: Cameras) -> torch.Tensor:
    """[H, W] alpha of one Gaussian from the closed-form EWA 2D Gaussian (camera = identity)."""
    R = quat_to_rotmat(quat)
    cov3 = R @ torch.diag(scale**2) @ R.T
    x, y, z = mean
    f = cam.K[0, 0, 0]
    J = torch.tensor([[f / z, 0, -f * x / z**2], [0, f / z, -f * y / z**2]], dtype=F64)
    cov2 = J @ cov3 @ J.T + 0.3 * torch.eye(2, dtype=F64)
    centre = torch.stack([f * x / z + cam.K[0, 0, 2], f * y / z + cam.K[0, 1, 2]])
    ys, xs = torch.meshgrid(
        torch.arange(cam.height, dtype=F64) + 0.5, torch.arange(cam.width, dtype=F64) + 0.5, indexing="ij"
    )
    d = torch.stack([xs, ys], dim=-1) - centre
    maha = torch.einsum("hwi,ij,hwj->hw", d, torch.linalg.inv(cov2), d)
    alpha = torch.clamp(opacity * torch.exp(-0.5 * maha), max=0.999)
    return torch.where(alpha >= 1 / 255, alpha, torch.zeros_like(alpha))


# --- rasterizer ---------------------------------------------------------------------------


def test_single_gaussian_matches_closed_form():
    cam = front_camera()
    mean = torch.tensor([0.05, -0.03, 2.0], dtype=F64)
    quat = F.normalize(torch.tensor([0.9, 0.2, -0.3, 0.4], dtype=F64), dim=0)
    scale = torch.tensor([0.06, 0.02, 0.04], dtype=F64)
    color = torch.tensor([0.9, 0.5, 0.1], dtype=F64)
    out = render(splats_of(mean[None], scale[None], [0.8], color[None], quat[None]), cam, BG)
    alpha = analytic_alpha(mean, quat, scale, 0.8, cam)
    assert alpha.max() > 0.5 and (alpha == 0).any()
    torch.testing.assert_close(out.alpha[0, ..., 0], alpha, atol=1e-9, rtol=0)
    expected_rgb = alpha[..., None] * color + (1 - alpha[..., None]) * BG
    torch.testing.assert_close(out.rgb[0], expected_rgb, atol=1e-9, rtol=0)
    expected_depth = torch.where(alpha > 0, 2.0, 0.0).to(F64)
    torch.testing.assert_close(out.depth[0, ..., 0], expected_depth, atol=1e-9, rtol=0)


def test_eps2d_widens_small_gaussians():
    cam = front_camera()
    tiny = splats_of([[0.0, 0.0, 2.0]], [[1e-5] * 3], [0.9], [[1.0, 1.0, 1.0]])
    out = render(tiny, cam, BG)
    # Centre pixel sits 0.5 px from the mean in x and y; only the 0.3 px^2 blur remains.
    expected = 0.9 * math.exp(-0.5 * (0.25 + 0.25) / 0.3)
    assert out.alpha[0, 20, 24, 0].item() == pytest.approx(expected, rel=1e-6)


def two_layer_scene(z_red: float, z_blue: float) -> Splats:
    return splats_of(
        [[0.0, 0.0, z_red], [0.0, 0.0, z_blue]],
        [[0.3, 0.3, 0.01], [0.3, 0.3, 0.01]],
        [0.7, 0.6],
        [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
    )


def test_front_to_back_compositing():
    cam = front_camera()
    front = render(two_layer_scene(2.0, 3.0), cam, BG)
    back = render(two_layer_scene(3.0, 2.0), cam, BG)
    layers = two_layer_scene(2.0, 3.0)
    a_red, a_blue = (
        analytic_alpha(layers.means[i], layers.quats[i], layers.scales[i], layers.opacities[i], cam)[20, 24]
        for i in range(2)
    )
    red, blue = torch.tensor([1.0, 0, 0], dtype=F64), torch.tensor([0, 0, 1.0], dtype=F64)
    expected = a_red * red + (1 - a_red) * a_blue * blue + (1 - a_red) * (1 - a_blue) * BG
    torch.testing.assert_close(front.rgb[0, 20, 24], expected)
    assert front.alpha[0, 20, 24, 0].item() == pytest.approx(1 - (1 - a_red) * (1 - a_blue))
    assert front.rgb[0, 20, 24, 0] > front.rgb[0, 20, 24, 2]
    assert back.rgb[0, 20, 24, 2] > back.rgb[0, 20, 24, 0]
    # Expected depth is the alpha-weighted mean of the two planes.
    w_front, w_back = a_red, (1 - a_red) * a_blue
    assert front.depth[0, 20, 24, 0].item() == pytest.approx((2 * w_front + 3 * w_back) / (w_front + w_back))


def test_compositing_stops_before_transmittance_falls_below_1e4():
    cam = front_camera()
    # Opaque layers: alpha clamps to 0.999, so the second would leave T = 1e-6 <= 1e-4 and is
    # not composited at all (gsplat's rule); the image keeps T = 1e-3 of background.
    layers = splats_of(
        [[0.0, 0.0, 2.0], [0.0, 0.0, 2.5], [0.0, 0.0, 3.0]],
        [[1.0, 1.0, 0.01]] * 3,
        [1.0, 1.0, 1.0],
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    )
    out = render(layers, cam, BG)
    assert out.alpha[0, 20, 24, 0].item() == pytest.approx(0.999, abs=1e-9)
    expected = 0.999 * torch.tensor([1.0, 0, 0], dtype=F64) + 0.001 * BG
    torch.testing.assert_close(out.rgb[0, 20, 24], expected)
    assert out.depth[0, 20, 24, 0].item() == pytest.approx(2.0)


@pytest.mark.parametrize("xy", [(0.0, 0.0), (0.35, -0.25)])
def test_depth_is_planar_z(xy):
    cam = front_camera(focal=40.0)
    fronto = splats_of([[xy[0], xy[1], 2.0]], [[0.1, 0.1, 1e-4]], [0.9], [[1.0, 1.0, 1.0]])
    out = render(fronto, cam, BG)
    u, v = project(fronto.means, cam)[0][0, 0].tolist()
    # Planar z, not the ray length (which exceeds 2 off-axis), at the centre and everywhere.
    assert out.depth[0, int(v), int(u), 0].item() == pytest.approx(2.0, abs=1e-9)
    covered = out.depth[out.alpha > 0]
    torch.testing.assert_close(covered, torch.full_like(covered, 2.0))
    # Asked for colour only, the same colour comes back and no depth.
    rgb_only = render(fronto, cam, BG, depth=False)
    assert rgb_only.depth is None and torch.equal(rgb_only.rgb, out.rgb) and torch.equal(rgb_only.alpha, out.alpha)


def test_background_only_where_transparent():
    cam = front_camera()
    scene = two_layer_scene(2.0, 3.0)
    bg2 = torch.tensor([0.9, 0.0, 0.5], dtype=F64)
    a, b = render(scene, cam, BG), render(scene, cam, bg2)
    torch.testing.assert_close(a.rgb - b.rgb, (1 - a.alpha) * (BG - bg2))
    torch.testing.assert_close(a.alpha, b.alpha)
    behind = replace(scene, means=scene.means * torch.tensor([1.0, 1.0, -1.0], dtype=F64))
    empty = render(behind, cam, BG)
    torch.testing.assert_close(empty.rgb, BG.expand_as(empty.rgb))
    assert empty.alpha.abs().max() == 0 and empty.depth.abs().max() == 0


def random_scene(n: int, gen: torch.Generator, dtype=F64) -> Splats:
    means = torch.randn(n, 3, generator=gen, dtype=dtype) * torch.tensor([0.3, 0.25, 0.3], dtype=dtype)
    means[:, 2] += 2.5
    return Splats(
        means,
        torch.randn(n, 4, generator=gen, dtype=dtype),
        0.02 + 0.1 * torch.rand(n, 3, generator=gen, dtype=dtype),
        0.1 + 0.85 * torch.rand(n, generator=gen, dtype=dtype),
        torch.rand(n, 3, generator=gen, dtype=dtype),
    )


def brute_force(splats: Splats, cam: Cameras) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense per-pixel compositing of every Gaussian in depth order with gsplat's rules."""
    s = RasterSettings()
    proj = project_gaussians(
        splats.means, splats.quats, splats.scales, splats.opacities, cam.world_to_cam, cam.K,
        cam.width, cam.height, s,
    )
    ys, xs = torch.meshgrid(
        torch.arange(cam.height, dtype=F64) + 0.5, torch.arange(cam.width, dtype=F64) + 0.5, indexing="ij"
    )
    T = torch.ones(cam.height, cam.width, dtype=F64)
    done = torch.zeros_like(T, dtype=torch.bool)
    rgb = torch.zeros(cam.height, cam.width, 3, dtype=F64)
    depth = torch.zeros_like(T)
    for i in torch.argsort(proj.depths[0]).tolist():
        if not (proj.radii[0, i] > 0).all():
            continue
        a, b, c = proj.conics[0, i]
        dx, dy = xs - proj.means2d[0, i, 0], ys - proj.means2d[0, i, 1]
        alpha = (splats.opacities[i] * torch.exp(-(0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy))).clamp(max=0.999)
        use = (alpha >= 1 / 255) & ~done
        next_T = T * (1 - alpha)
        done |= use & (next_T <= 1e-4)
        use &= next_T > 1e-4
        w = torch.where(use, alpha * T, 0.0)
        rgb += w[..., None] * splats.colors[i]
        depth += w * proj.depths[0, i]
        T = torch.where(use, next_T, T)
    alpha = 1 - T
    return rgb + T[..., None] * BG, alpha[..., None], (depth / alpha.clamp_min(1e-10))[..., None]


def test_banded_sparse_rasterizer_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    scene = random_scene(60, gen)
    cam = front_camera(width=56, height=44, focal=50.0)
    expected = brute_force(scene, cam)
    # A tiny pair budget forces many bands.
    for settings in (RasterSettings(), RasterSettings(tile_size=8, max_pairs_per_chunk=500)):
        out = render(scene, cam, BG, settings=settings)
        for got, want in zip(out, expected):
            torch.testing.assert_close(got[0], want, atol=1e-9, rtol=1e-9)


def test_projection_matches_gsplat_torch_reference():
    impl = pytest.importorskip("gsplat.cuda._torch_impl")
    gen = torch.Generator().manual_seed(1)
    scene = random_scene(40, gen)
    cams = orbit_cameras(3, 2.5, 64, 48, fov_deg=50.0, target=(0.0, 0.0, 2.5)).to(dtype=F64)
    mine = project_gaussians(
        scene.means, scene.quats, scene.scales, scene.opacities, cams.world_to_cam, cams.K, 64, 48, RasterSettings()
    )
    covars, _ = impl._quat_scale_to_covar_preci(scene.quats, scene.scales, compute_preci=False)
    radii, means2d, depths, conics, _ = impl._fully_fused_projection(
        scene.means, covars, cams.world_to_cam, cams.K, 64, 48
    )
    both = (radii > 0).all(-1) & (mine.radii > 0).all(-1)
    assert both.sum() > 20
    torch.testing.assert_close(mine.means2d[both], means2d[both])
    torch.testing.assert_close(mine.conics[both], conics[both])
    torch.testing.assert_close(mine.depths[both], depths[both])


def test_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(2)
    # Five overlapping layers, so gradients also flow through transmittance.
    means = torch.tensor([[0.0, 0.0, 2.0], [0.1, 0.05, 2.3], [-0.1, 0.06, 2.6], [0.05, -0.1, 2.9], [0.0, 0.0, 3.2]],
                         dtype=F64)
    scene = Splats(
        means + 0.02 * torch.randn(5, 3, generator=gen, dtype=F64),
        torch.randn(5, 4, generator=gen, dtype=F64),
        0.05 + 0.1 * torch.rand(5, 3, generator=gen, dtype=F64),
        0.4 + 0.5 * torch.rand(5, generator=gen, dtype=F64),
        torch.rand(5, 3, generator=gen, dtype=F64),
    )
    cam = front_camera(width=20, height=16, focal=24.0)
    weights = [torch.rand(1, 16, 20, k, generator=gen, dtype=F64) for k in (3, 1, 1)]
    names = ("means", "quats", "scales", "opacities", "colors")
    params = {n: getattr(scene, n).clone().requires_grad_() for n in names}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        out = render(Splats(**p), cam, BG)
        return sum((o * w).sum() for o, w in zip(out, weights))

    loss(params).backward()
    eps = 1e-6
    for name in names:
        base = params[name].detach()
        numeric = torch.zeros_like(base)
        for i in range(base.numel()):
            delta = torch.zeros_like(base).view(-1)
            delta[i] = eps
            plus = dict(params, **{name: base + delta.view_as(base)})
            minus = dict(params, **{name: base - delta.view_as(base)})
            numeric.view(-1)[i] = (loss(plus) - loss(minus)).item() / (2 * eps)
        torch.testing.assert_close(params[name].grad, numeric, rtol=1e-4, atol=1e-6, msg=name)


def test_batched_equals_per_frame():
    gen = torch.Generator().manual_seed(3)
    scene = random_scene(30, gen, dtype=torch.float32)
    shift = torch.tensor([[0.0, 0.0, 0.0], [0.1, -0.05, 0.2]])
    batched = Splats(
        scene.means[None] + shift[:, None],
        scene.quats.expand(2, -1, -1),
        scene.scales.expand(2, -1, -1),
        scene.opacities,  # shared by both frames
        torch.stack([scene.colors, scene.colors.flip(-1)]),
    )
    rig = orbit_cameras(2, 2.5, 40, 32, fov_deg=60.0, target=(0.0, 0.0, 2.5))
    cams = Cameras(
        torch.stack([rig.K, rig.K * torch.tensor([[1.1], [1.1], [1.0]])]),
        torch.stack([rig.world_to_cam, rig.world_to_cam.flip(0)]),
        40,
        32,
    )
    out = render(batched, cams, BG.float())
    assert out.rgb.shape == (2, 2, 32, 40, 3) and out.depth.shape == (2, 2, 32, 40, 1)
    for b in range(2):
        single = render(batched.frame(b), cams.frame(b), BG.float())
        for got, want in zip(out, single):
            torch.testing.assert_close(got[b], want)
    shared = render(batched, rig, BG.float())  # one rig for every frame
    torch.testing.assert_close(shared.rgb[1], render(batched.frame(1), rig, BG.float()).rgb)


def test_project_matches_rendered_blob_centre():
    cams = orbit_cameras(2, 2.0, 64, 48, fov_deg=40.0, elevation_deg=10.0)
    point = torch.tensor([[0.2, -0.1, 0.15]])
    blob = Splats(point, torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.01), torch.ones(1), torch.ones(1, 3))
    out = render(blob, cams, torch.zeros(3))
    uv, depth = project(point, cams)
    assert uv.shape == (2, 1, 2) and depth.shape == (2, 1)
    ys, xs = torch.meshgrid(torch.arange(48) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    for c in range(2):
        w = out.alpha[c, ..., 0]
        centroid = torch.stack([(w * xs).sum(), (w * ys).sum()]) / w.sum()
        torch.testing.assert_close(centroid, uv[c, 0], atol=0.02, rtol=0)


def test_sh_colours_follow_gsplat_convention():
    dirs = F.normalize(torch.randn(50, 3, generator=torch.Generator().manual_seed(4), dtype=F64), dim=-1)
    impl = pytest.importorskip("gsplat.cuda._torch_impl")
    torch.testing.assert_close(sh_basis(3, dirs), impl._eval_sh_bases_fast(16, dirs))
    coeffs = torch.zeros(1, 4, 3, dtype=F64)
    coeffs[0, 0] = torch.tensor([1.0, -3.0, 0.0])
    coeffs[0, 2] = torch.tensor([0.0, 0.0, 1.0])  # band 1, m = 0: + C1 * z
    rgb = sh_to_rgb(1, coeffs, torch.tensor([[0.0, 0.0, 2.0]], dtype=F64), torch.zeros(1, 3, dtype=F64))
    c0, c1 = 0.28209479177387814, 0.4886025119029199
    torch.testing.assert_close(rgb[0, 0], torch.tensor([c0 + 0.5, 0.0, c1 + 0.5], dtype=F64))


def test_sh_splats_render_like_evaluated_colours():
    cam = front_camera()
    coeffs = torch.zeros(1, 16, 3, dtype=F64)
    coeffs[0, 0] = torch.tensor([0.5, 0.2, -0.4])
    coeffs[0, 3] = torch.tensor([0.3, 0.0, 0.1])
    sh = Splats(torch.tensor([[0.3, 0.0, 2.0]], dtype=F64), torch.tensor([[1.0, 0, 0, 0]], dtype=F64),
                torch.full((1, 3), 0.1, dtype=F64), torch.tensor([0.9], dtype=F64), coeffs, sh_degree=3)
    rgb = sh_to_rgb(3, coeffs, sh.means, cam.centers)[0]
    torch.testing.assert_close(render(sh, cam, BG).rgb, render(replace(sh, colors=rgb, sh_degree=None), cam, BG).rgb)


def test_shape_errors_are_explicit():
    cam = front_camera()
    scene = two_layer_scene(2.0, 3.0)
    with pytest.raises(ValueError, match="colors"):
        render(replace(scene, colors=scene.colors[:1]), cam, BG)
    with pytest.raises(ValueError, match="batch shape"):
        render(scene, Cameras(cam.K[None], cam.world_to_cam[None], cam.width, cam.height), BG)
    with pytest.raises(ValueError, match="background"):
        render(scene, cam, torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match="backend"):
        render(scene, cam, BG, backend="vulkan")
    with pytest.raises((RuntimeError, ValueError), match="gsplat"):
        render(scene, cam, BG, backend="gsplat")
    with pytest.raises(ValueError, match="world_to_cam"):
        Cameras(cam.K, cam.world_to_cam[:, :3], 48, 40)


# --- cameras ------------------------------------------------------------------------------


def test_look_at_is_orthonormal_and_points_at_target():
    eye, target = torch.tensor([0.3, 0.4, 1.5], dtype=F64), torch.tensor([0.0, 0.1, 0.0], dtype=F64)
    w2c = look_at(eye, target)
    R = w2c[:3, :3]
    torch.testing.assert_close(R @ R.T, torch.eye(3, dtype=F64))
    assert torch.linalg.det(R).item() == pytest.approx(1.0)
    cam = Cameras(intrinsics(64, 48, fov_deg=40.0, dtype=F64)[None], w2c[None], 64, 48)
    torch.testing.assert_close(cam.centers[0], eye)
    uv, depth = project(torch.stack([target, target + torch.tensor([0.0, 0.1, 0.0], dtype=F64)]), cam)
    torch.testing.assert_close(uv[0, 0], torch.tensor([32.0, 24.0], dtype=F64))
    assert depth[0, 0].item() == pytest.approx(torch.linalg.norm(target - eye).item())
    assert uv[0, 1, 1] < uv[0, 0, 1]  # world up is image up
    with pytest.raises(ValueError, match="parallel"):
        look_at((0.0, 2.0, 0.0), (0.0, 0.0, 0.0))


def test_orbit_ring():
    target = (0.0, 0.05, 0.02)
    cams = orbit_cameras(8, 0.7, 64, 64, fov_deg=30.0, elevation_deg=20.0, target=target)
    centres = cams.centers
    offsets = centres - torch.tensor(target)
    torch.testing.assert_close(torch.linalg.norm(offsets, dim=-1), torch.full((8,), 0.7))
    torch.testing.assert_close(offsets[:, 1], torch.full((8,), 0.7 * math.sin(math.radians(20.0))))
    assert offsets[0, 2] > 0 and offsets[0, 0].abs() < 1e-6  # first camera faces the face
    uv, _ = project(torch.tensor([target]), cams)
    torch.testing.assert_close(uv[:, 0], torch.full((8, 2), 32.0), atol=1e-4, rtol=0)
    assert cams.K[0, 0, 0].item() == pytest.approx(32.0 / math.tan(math.radians(15.0)))


# --- Blender ------------------------------------------------------------------------------


def blender_K(**kw) -> torch.Tensor:
    args = dict(lens_mm=50.0, sensor_width=36.0, sensor_height=24.0, sensor_fit="AUTO", shift_x=0.0,
                shift_y=0.0, res_x=1920, res_y=1080)
    args.update(kw)
    return torch.from_numpy(bcm.K_from_blender(**args))


BLENDER_FROM_WORLD = torch.from_numpy(bcm.BLENDER_FROM_WORLD)


def world_to_cam_from_blender(matrix_world) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The shared numpy conversion, on float64 tensors."""
    return torch.from_numpy(bcm.world_to_cam_from_blender(np.asarray(matrix_world, np.float64)))


@pytest.mark.parametrize(
    ("kw", "fx", "fy", "cx", "cy"),
    [
        ({}, 50 * 1920 / 36, 50 * 1920 / 36, 960, 540),
        # AUTO on a portrait image fits the sensor *width* to the (larger) height.
        ({"res_x": 1080, "res_y": 1920}, 50 * 1920 / 36, 50 * 1920 / 36, 540, 960),
        ({"sensor_fit": "VERTICAL"}, 50 * 1080 / 24, 50 * 1080 / 24, 960, 540),
        ({"sensor_fit": "HORIZONTAL", "res_x": 1080, "res_y": 1920}, 50 * 1080 / 36, 50 * 1080 / 36, 540, 960),
        ({"res_percent": 50}, 50 * 960 / 36, 50 * 960 / 36, 480, 270),
        # Shift is in units of the fitted (larger) dimension: +x moves the principal point left,
        # +y moves it up.
        ({"shift_x": 0.1, "shift_y": 0.1}, 50 * 1920 / 36, 50 * 1920 / 36, 960 - 192, 540 + 192),
        ({"shift_x": -0.2, "res_x": 1080, "res_y": 1920}, 50 * 1920 / 36, 50 * 1920 / 36, 540 + 384, 960),
        # Wide pixels: the horizontal fit keeps fx; fy doubles (each pixel row covers less).
        ({"res_x": 1000, "res_y": 1000, "pixel_aspect_x": 2.0}, 50 * 1000 / 36, 2 * 50 * 1000 / 36, 500, 500),
        # Tall pixels: 1 * 1000 < 2 * 1000, so AUTO fits vertically; fx = 2 fy.
        ({"res_x": 1000, "res_y": 1000, "pixel_aspect_y": 2.0, "shift_y": 0.1},
         2 * 50 * 1000 / 36, 50 * 1000 / 36, 500, 500 + 0.1 * 1000),
    ],
)
def test_K_from_blender(kw, fx, fy, cx, cy):
    K = blender_K(**kw)
    torch.testing.assert_close(K, torch.tensor([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=F64))


def test_blender_resolution_rounds_down_like_blender():
    assert bcm.blender_resolution(640, 480, 33) == (211, 158)


def test_blender_front_camera_equals_look_at():
    # Blender camera at (0, -1, 0) with rotation X = 90 deg looks along +Y with +Z up: the
    # "Front" view. In the backend world that is a camera at z = 1 looking at the face.
    matrix_world = torch.tensor(
        [[1.0, 0, 0, 0], [0, 0, -1, -1], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=F64
    )
    w2c = world_to_cam_from_blender(matrix_world)
    torch.testing.assert_close(w2c, look_at((0.0, 0.0, 1.0), (0.0, 0.0, 0.0)).to(F64))
    torch.testing.assert_close(BLENDER_FROM_WORLD[:3, :3] @ torch.tensor([1.0, 2.0, 3.0], dtype=F64),
                               torch.tensor([1.0, -3.0, 2.0], dtype=F64))


def test_blender_round_trip_and_optical_axis():
    gen = torch.Generator().manual_seed(5)
    q = F.normalize(torch.randn(4, generator=gen, dtype=F64), dim=0)
    matrix_world = torch.eye(4, dtype=F64)
    matrix_world[:3, :3] = quat_to_rotmat(q) * 2.5  # camera object scale is ignored
    matrix_world[:3, 3] = torch.tensor([0.3, -1.2, 0.4], dtype=F64)
    w2c = world_to_cam_from_blender(matrix_world)
    back = torch.from_numpy(bcm.blender_matrix_world_from_world_to_cam(w2c.numpy()))
    torch.testing.assert_close(back[:3, :3], matrix_world[:3, :3] / 2.5)
    torch.testing.assert_close(back[:3, 3], matrix_world[:3, 3])
    K = blender_K(shift_x=0.05, shift_y=-0.1, sensor_fit="VERTICAL")
    cam = Cameras(K[None], w2c[None], 1920, 1080)
    # A point on the camera's -Z axis (Blender), seen in the backend world.
    on_axis_blender = matrix_world[:3, 3] - 3.0 * back[:3, 2]
    world = torch.linalg.solve(BLENDER_FROM_WORLD[:3, :3], on_axis_blender)
    uv, depth = project(world[None], cam)
    torch.testing.assert_close(uv[0, 0], K[:2, 2])
    assert depth[0, 0].item() == pytest.approx(3.0)


@pytest.mark.blender
def test_blender_conversions_match_bpy():
    bpy = pytest.importorskip("bpy")
    from bpy_extras.object_utils import world_to_camera_view  # noqa: PLC0415
    from mathutils import Vector  # noqa: PLC0415

    # An own camera: other tests may have left an empty scene behind in this process.
    scene = bpy.context.scene
    cam = bpy.data.objects.new("conversion_test_camera", bpy.data.cameras.new("conversion_test_camera"))
    scene.collection.objects.link(cam)
    cam.location = (7.36, -6.93, 4.96)
    cam.rotation_euler = (1.11, 0.0, 0.81)
    scene.camera = cam
    cases = [
        ("AUTO", 0.1, -0.2, 1080, 1920, 1.0, 1.0),
        ("VERTICAL", 0.05, 0.1, 1920, 1080, 1.0, 1.0),
        ("HORIZONTAL", 0.2, 0.1, 1080, 1920, 1.0, 1.3),
        ("AUTO", -0.1, 0.3, 1000, 1000, 2.0, 1.0),
        ("AUTO", 0.0, 0.1, 1000, 1000, 1.0, 2.0),
    ]
    for fit, sx, sy, rx, ry, ax, ay in cases:
        cam.data.lens, cam.data.sensor_width, cam.data.sensor_height = 35.0, 36.0, 24.0
        cam.data.sensor_fit, cam.data.shift_x, cam.data.shift_y = fit, sx, sy
        render_settings = scene.render
        render_settings.resolution_x, render_settings.resolution_y = rx, ry
        render_settings.resolution_percentage = 100
        render_settings.pixel_aspect_x, render_settings.pixel_aspect_y = ax, ay
        bpy.context.view_layer.update()
        K = torch.from_numpy(bcm.K_from_blender(35.0, 36.0, 24.0, fit, sx, sy, rx, ry, 100, ax, ay))
        w2c = world_to_cam_from_blender([list(r) for r in cam.matrix_world])
        cams = Cameras(K[None], w2c[None], rx, ry)
        for local in ((0.3, -0.2, -2.0), (-0.5, 0.4, -4.0)):
            p = cam.matrix_world @ Vector(local)
            ndc = world_to_camera_view(scene, cam, p)
            world = torch.linalg.solve(BLENDER_FROM_WORLD[:3, :3], torch.tensor(tuple(p), dtype=F64))
            uv, depth = project(world[None], cams)
            expected = torch.tensor([ndc.x * rx, (1 - ndc.y) * ry], dtype=F64)
            torch.testing.assert_close(uv[0, 0], expected, atol=2e-3, rtol=0)
            assert depth[0, 0].item() == pytest.approx(ndc.z, abs=1e-5)


def test_animation_cameras_face_a_head_posed_away_from_the_origin(head) -> None:  # type: ignore[no-untyped-def]
    """A tracked animation's head sits in its tracking camera's frame: the default view must
    still put it in the middle of the image and look at its face."""
    from smplx.lbs import batch_rodrigues

    from backend.render.animation import ViewConfig, head_framing, view_cameras

    params = head.neutral_params(3)
    params.translation[:] = torch.tensor([0.3, -0.2, -1.5])
    params.rotation[:, 1] = math.radians(140.0)  # turned well away from +z
    view = ViewConfig(size=128)
    framing = head_framing(head, params)
    cams = view_cameras(view, 3, framing)
    centre = head(params, check=False).vertices.mean(dim=(0, 1))
    uv, depth = project(centre[None].expand(3, 1, 3), cams)
    assert torch.allclose(uv[:, 0, 0], torch.full((3, 2), 64.0), atol=0.5) and torch.all(depth > 0)
    # The camera is in front of the face: the head's forward axis points at it.
    forward = batch_rodrigues(params.rotation[:1]) @ torch.tensor([0.0, 0.0, 1.0])
    eye = torch.linalg.inv(cams.world_to_cam[0, 0].double())[:3, 3].float()
    assert float(torch.dot(torch.nn.functional.normalize(eye - centre, dim=0), forward[0])) > math.cos(math.radians(view.elevation_degrees)) - 1e-3
    # Without the framing the same camera looks at the origin, where this head is not.
    uv0, _ = project(centre[None].expand(3, 1, 3), view_cameras(view, 3))
    assert float((uv0[0, 0, 0] - 64.0).abs().max()) > 30.0


def test_one_head_shot_frames_synthetic_captures_and_animation_renders() -> None:
    """Synthetic captures and animation renders take their distance and focal length from one
    ``HeadShot``: frontal cameras of both agree, sit ``distance`` in front of the head, and a
    point half the field of view off the axis lands on the image's edge."""
    from backend.data.synthetic import SynthConfig, capture_cameras
    from backend.render.animation import ViewConfig, view_cameras
    from backend.render.camera import HeadShot

    for shot in (HeadShot(), HeadShot(distance=1.2, focal=3.0)):
        synth = capture_cameras(SynthConfig(size=96, shot=shot))
        anim = view_cameras(ViewConfig(size=96, shot=shot, elevation_degrees=0.0), 1)
        torch.testing.assert_close(anim.K[0], synth.K)
        torch.testing.assert_close(anim.world_to_cam[0], synth.world_to_cam)
        torch.testing.assert_close(synth.centers, torch.tensor([[0.0, 0.0, shot.distance]]))
        half = shot.distance * math.tan(math.radians(shot.fov_deg) / 2)
        uv, _ = project(torch.tensor([[half, 0.0, 0.0], [0.0, half, 0.0]]), synth)
        torch.testing.assert_close((uv[0] - 48.0).abs(), torch.tensor([[48.0, 0.0], [0.0, 48.0]]), atol=1e-3, rtol=0)


def test_cameras_frames_picks_the_rigs_of_those_frames() -> None:
    cams = orbit_cameras(4, radius=1.0, width=8, height=8, focal_px=10.0)
    batched = Cameras(cams.K[:, None], cams.world_to_cam[:, None], 8, 8)  # [4 frames, 1 camera]
    picked = batched.frames([3, 1])
    assert picked.K.shape == (2, 1, 3, 3)
    assert torch.equal(picked.world_to_cam[0], batched.world_to_cam[3]) and torch.equal(picked.world_to_cam[1], batched.world_to_cam[1])
    with pytest.raises(ValueError, match="batched"):
        cams.frames([0])
