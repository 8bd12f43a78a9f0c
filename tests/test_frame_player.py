"""The frame player: the same frames as posing and rendering eagerly, replayed or not."""

from __future__ import annotations

import pytest
import torch

from backend.gaussians.avatar import deform
from backend.gaussians.surface import surface_avatar
from backend.head.registry import load_head_model
from backend.render.animation import HeadFraming, ViewConfig, view_cameras
from backend.render.frame_player import FramePlayer, PlayerConfig
from backend.render.gsplat_backend import gsplat_available
from backend.render.rasterize import render
from tests.helpers import random_params

BACKGROUND = torch.tensor([0.2, 0.4, 0.6])
needs_cuda = pytest.mark.skipif(not gsplat_available(), reason="needs a CUDA GPU and the gsplat package")


def scene(gaussians: int, frames: int, size: int, seed: int = 0):  # type: ignore[no-untyped-def]
    head = load_head_model()
    gen = torch.Generator().manual_seed(seed)
    avatar = surface_avatar(head, torch.randn(head.n_shape, generator=gen), gaussians, lambda f, b: torch.rand(f.shape[0], 3, generator=gen))
    return head, avatar, random_params(head, frames, gen), view_cameras(ViewConfig(size=size), frames)


def eager(avatar, head, params, cams, depth: bool = False, background: torch.Tensor = BACKGROUND):  # type: ignore[no-untyped-def]
    device = avatar.local.offset.device
    with torch.no_grad():
        return render(deform(avatar, head, params.to(device)), cams.to(device), background.to(device), depth=depth)


def on_cuda(gaussians: int, frames: int, size: int):  # type: ignore[no-untyped-def]
    head, avatar, params, cams = scene(gaussians, frames, size)
    return head.to("cuda"), avatar.to("cuda"), params, cams


def assert_replays_eager(out, avatar, head, params, cams, background: torch.Tensor = BACKGROUND, fused: bool = False) -> None:  # type: ignore[no-untyped-def]
    """The captured path takes the same kernels; tile lists in fixed slots sort the same pairs.
    ``fused``: posing compiled into other kernels rounds a few ulps differently, which can swap
    two Gaussians at nearly equal depth in a tile; a handful of pixels may then differ, by as
    much as the two Gaussians' colours do (seen on the H100: 3 to 12 of 49,152, up to 0.03)."""
    ref = eager(avatar, head, params, cams, background=background).rgb
    if not fused:
        torch.testing.assert_close(out.rgb, ref, atol=2e-4, rtol=0)
        return
    diff = (out.rgb - ref).abs()
    assert float((diff > 2e-4).float().mean()) < 1e-3 and float(diff.mean()) < 2e-5


def test_player_matches_eager_posing_and_rendering_on_the_cpu() -> None:
    head, avatar, params, cams = scene(2000, 3, 48)
    player = FramePlayer(avatar, head, BACKGROUND, config=PlayerConfig(depth=True))
    out, ref = player(params, cams), eager(avatar, head, params, cams, depth=True)
    assert out.rgb.shape == (3, 1, 48, 48, 3)
    torch.testing.assert_close(out.rgb, ref.rgb)
    torch.testing.assert_close(out.depth, ref.depth)
    assert not player.graphed and player.captures == 0


def test_one_rig_serves_every_frame_and_a_wrong_camera_count_is_refused() -> None:
    head, avatar, params, cams = scene(1000, 2, 32)
    player = FramePlayer(avatar, head, BACKGROUND)
    rig = cams.frame(0)
    torch.testing.assert_close(player(params, rig).rgb, eager(avatar, head, params, rig.expand(2)).rgb)
    with pytest.raises(ValueError, match="2 frames of parameters but cameras for 3"):
        player(params, view_cameras(ViewConfig(size=32), 3))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("batch, compiled", [(1, False), (4, False), (1, True)])
def test_replayed_frames_equal_eager_ones_call_after_call(batch: int, compiled: bool) -> None:
    """New parameter values each call replay one capture; compiled posing too, without
    compiling again."""
    head, avatar, params, cams = on_cuda(20_000, 5 * batch, 128)
    player = FramePlayer(avatar, head, BACKGROUND, config=PlayerConfig(compile=compiled))
    assert player.graphed
    for start in range(0, 5 * batch, batch):
        idx = list(range(start, start + batch))
        p, c = params.index(idx), cams.frames(idx)
        assert_replays_eager(player(p, c), avatar, head, p, c, fused=compiled)
    assert player.captures == 1


@pytest.mark.cuda
@needs_cuda
def test_a_frame_that_needs_more_tile_slots_is_rendered_again_after_the_budget_grows() -> None:
    head, avatar, params, _ = on_cuda(20_000, 2, 128)
    away = view_cameras(ViewConfig(size=128), 1, HeadFraming(centre=(3.0, 0.0, 0.0)))  # the head is out of view
    facing = view_cameras(ViewConfig(size=128), 1)
    player = FramePlayer(avatar, head, BACKGROUND, config=PlayerConfig(headroom=1.0))
    p = params.index([0])
    player(p, away)
    player(p, away)  # captured with a budget sized for an empty view
    first = player.captures
    assert_replays_eager(player(p, facing), avatar, head, p, facing)
    assert player.captures == first  # the same batch shape, captured again in place
    assert player.recaptures >= 1


@pytest.mark.cuda
@needs_cuda
def test_a_new_background_reaches_the_captured_graph() -> None:
    head, avatar, params, cams = on_cuda(20_000, 1, 96)
    player = FramePlayer(avatar, head, BACKGROUND)
    for _ in range(3):  # warm-up, capture, replay
        player(params, cams)
    assert player.captures == 1
    black = torch.zeros(3)
    assert_replays_eager(player(params, cams, black), avatar, head, params, cams, background=black)
    assert player.captures == 1


@pytest.mark.cuda
@needs_cuda
def test_the_least_recently_used_batch_shape_is_dropped_beyond_the_limit() -> None:
    head, avatar, params, _ = on_cuda(5_000, 1, 32)
    player = FramePlayer(avatar, head, BACKGROUND, config=PlayerConfig(max_captures=2, warmup=0))
    for size in (32, 48, 64, 32):
        cams = view_cameras(ViewConfig(size=size), 1)
        assert_replays_eager(player(params, cams), avatar, head, params, cams)
    assert player.captures == 2  # 64 and 32 kept: 32 was dropped for 64, then captured again in place of 48
