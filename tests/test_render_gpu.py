"""gsplat (CUDA) against the pure-torch reference (CPU) on a head-shaped scene."""

from __future__ import annotations

import pytest
import torch

from backend.gaussians.splats import Splats
from backend.render.camera import Cameras, orbit_cameras
from backend.render.gsplat_backend import gsplat_available
from backend.render.rasterize import RenderOutput, render
from backend.render.tile_intersect import TileBudget, tile_lists
from tests.benchmarks.scenes import head_splats

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not gsplat_available(), reason="needs a CUDA GPU and the gsplat package"),
]

PARAMS = ("means", "quats", "scales", "opacities", "colors")
BACKGROUND = torch.tensor([0.2, 0.4, 0.6])


def render_with_grads(
    scene: Splats, cameras: Cameras, device: str, backend: str, weights: list[torch.Tensor], budget: TileBudget | None = None
) -> tuple[RenderOutput, dict[str, torch.Tensor]]:
    """Render on ``device`` and backprop a fixed random linear loss of rgb and depth."""
    leaves = {name: getattr(scene, name).to(device).requires_grad_() for name in PARAMS}
    splats = Splats(**leaves, sh_degree=scene.sh_degree)
    out = render(splats, cameras.to(device), BACKGROUND.to(device), backend=backend, budget=budget)
    mask = (out.alpha.detach() > 0.5).float()
    loss = (out.rgb * weights[0].to(device)).sum() + (out.depth * mask * weights[1].to(device)).sum()
    loss.backward()
    cpu = RenderOutput(*(t.detach().cpu() for t in out))
    return cpu, {name: leaf.grad.cpu() for name, leaf in leaves.items()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10.0 * torch.log10(1.0 / torch.mean((a - b) ** 2)))


@pytest.mark.parametrize(("size", "sh_degree"), [(256, None), (512, 3)])
def test_gsplat_matches_reference(size: int, sh_degree: int | None):
    scene = head_splats(20000, seed=size, sh_degree=sh_degree)
    cameras = orbit_cameras(2, 0.6, size, size, fov_deg=25.0, elevation_deg=10.0, azimuth_offset_deg=-30.0)
    gen = torch.Generator().manual_seed(size)
    weights = [torch.rand(2, size, size, k, generator=gen) for k in (3, 1)]
    fast, fast_grads = render_with_grads(scene, cameras, "cuda", "gsplat", weights)
    ref, ref_grads = render_with_grads(scene, cameras, "cpu", "reference", weights)

    assert psnr(fast.rgb, ref.rgb) >= 40.0
    covered = (fast.alpha > 0.5) & (ref.alpha > 0.5)
    assert covered.float().mean() > 0.2
    rel = ((fast.depth - ref.depth).abs() / ref.depth)[covered]
    assert rel.max() <= 0.01
    for name in PARAMS:
        cos = torch.nn.functional.cosine_similarity(fast_grads[name].flatten(), ref_grads[name].flatten(), dim=0)
        assert cos >= 0.99, f"{name}: gradient cosine similarity {cos:.4f}"


def test_auto_dispatch_and_batches_on_cuda():
    frames = [head_splats(5000, seed=s) for s in (1, 2)]
    batched = Splats(*(torch.stack([getattr(f, n) for f in frames]).cuda() for n in PARAMS))
    rig = orbit_cameras(3, 0.6, 128, 128, fov_deg=25.0)
    cameras = Cameras(
        torch.stack([rig.K, rig.K]), torch.stack([rig.world_to_cam, rig.world_to_cam.flip(0)]), 128, 128
    ).to("cuda")
    auto = render(batched, cameras, BACKGROUND.cuda())
    forced = render(batched, cameras, BACKGROUND.cuda(), backend="gsplat")
    torch.testing.assert_close(auto.rgb, forced.rgb)
    assert auto.rgb.shape == (2, 3, 128, 128, 3)
    for b in range(2):
        single = render(batched.frame(b), cameras.frame(b), BACKGROUND.cuda(), backend="gsplat")
        torch.testing.assert_close(auto.rgb[b], single.rgb, atol=1e-5, rtol=1e-5)
        reference = render(batched.frame(b), cameras.frame(b), BACKGROUND.cuda(), backend="reference")
        assert psnr(auto.rgb[b], reference.rgb) >= 40.0


def test_tile_lists_equal_gsplat_intersections():
    from gsplat.cuda._wrapper import fully_fused_projection, isect_offset_encode, isect_tiles

    scene = head_splats(30000, seed=7, device="cuda")
    rig = orbit_cameras(3, 0.6, 200, 168, fov_deg=25.0).to("cuda")
    radii, means2d, depths, _, _ = fully_fused_projection(
        scene.means, None, scene.quats, scene.scales, rig.world_to_cam, rig.K, 200, 168, opacities=scene.opacities
    )
    cols, rows = 13, 11  # 200 x 168 pixels: partial tiles on both edges
    _, isect_ids, flatten_ids = isect_tiles(means2d, radii, depths, 16, cols, rows)
    offsets = isect_offset_encode(isect_ids, 3, cols, rows)
    total = flatten_ids.numel()
    ours = tile_lists(means2d, radii, depths, 16, cols, rows, capacity=total + 1000)
    assert int(ours.total) == total
    assert torch.equal(ours.flatten_ids[:total], flatten_ids)
    assert torch.equal(ours.offsets[:, :rows], offsets)


def test_budget_render_matches_gsplat_rasterization():
    scene = head_splats(20000, seed=11, sh_degree=3)
    cameras = orbit_cameras(2, 0.6, 250, 190, fov_deg=25.0, elevation_deg=10.0)
    gen = torch.Generator().manual_seed(3)
    weights = [torch.rand(2, 190, 250, k, generator=gen) for k in (3, 1)]
    plain, plain_grads = render_with_grads(scene, cameras, "cuda", "gsplat", weights)
    _, again_grads = render_with_grads(scene, cameras, "cuda", "gsplat", weights)
    budget = TileBudget(1 << 20).to("cuda")
    ours, our_grads = render_with_grads(scene, cameras, "cuda", "gsplat", weights, budget=budget)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name in PARAMS:
        # The backward kernels sum with atomics, so two plain renders already differ a little;
        # ours may differ from plain by no more than that.
        noise = (again_grads[name] - plain_grads[name]).abs().max()
        assert (our_grads[name] - plain_grads[name]).abs().max() <= 4 * noise + 1e-6, name
    assert 0 < int(budget.peak) < budget.capacity


def test_budget_render_replays_from_a_cuda_graph():
    """Captured once, a render and its backward follow new inputs copied into the same tensors."""
    scenes = [head_splats(10000, seed=s, device="cuda") for s in (1, 2, 3)]
    rig = orbit_cameras(1, 0.6, 128, 128, fov_deg=25.0).to("cuda")
    means = scenes[0].means.clone().requires_grad_()
    budget = TileBudget(1 << 19).to("cuda")
    background = BACKGROUND.cuda()  # made before the capture: a capture may not copy from pageable memory

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        out = render(Splats(means, *(getattr(scenes[0], n) for n in PARAMS[1:])), rig, background, budget=budget)
        out.rgb.square().sum().backward()
        return out.rgb, means.grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    means.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rgb, grad = step()
    for scene in scenes[1:]:
        with torch.no_grad():
            means.copy_(scene.means)
        graph.replay()
        expected_means = scene.means.clone().requires_grad_()
        expected = render(Splats(expected_means, *(getattr(scenes[0], n) for n in PARAMS[1:])), rig, background)
        expected.rgb.square().sum().backward()
        torch.testing.assert_close(rgb, expected.rgb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, expected_means.grad, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("budgeted", [False, True])
def test_a_render_without_depth_matches_the_colour_of_one_with_it(budgeted: bool):
    """Training renders skip the depth channel; colour, alpha and the colour's gradients must
    not change (the depth channel's gradient is zero when the loss reads only colour)."""
    scene = head_splats(20000, seed=5)
    cameras = orbit_cameras(2, 0.6, 200, 160, fov_deg=25.0).to("cuda")
    weights = torch.rand(2, 160, 200, 3, generator=torch.Generator().manual_seed(5)).cuda()
    results = []
    for depth in (True, False):
        leaves = {name: getattr(scene, name).cuda().requires_grad_() for name in PARAMS}
        budget = TileBudget(1 << 20).to("cuda") if budgeted else None
        out = render(Splats(**leaves), cameras, BACKGROUND.cuda(), budget=budget, depth=depth)
        (out.rgb * weights).sum().backward()
        results.append((out, {name: leaf.grad for name, leaf in leaves.items()}))
    (with_depth, grads_with), (without, grads_without) = results
    assert with_depth.depth is not None and without.depth is None
    torch.testing.assert_close(without.rgb, with_depth.rgb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(without.alpha, with_depth.alpha, atol=1e-5, rtol=1e-5)
    for name in PARAMS:
        # Atomic sums in the backward pass: compare with a tolerance relative to the gradient's size.
        scale = grads_with[name].abs().max()
        assert (grads_without[name] - grads_with[name]).abs().max() <= 1e-3 * scale + 1e-7, name
