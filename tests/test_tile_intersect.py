"""The sync-free tile lists against a plain-Python statement of gsplat's intersection rules."""

from __future__ import annotations

import math

import pytest
import torch

from backend.gaussians.splats import Splats
from backend.render.rasterize import render
from backend.render.tile_intersect import TileBudget, tile_lists

TILE = 16


def random_projection(images: int, n: int, cols: int, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Screen centres spilling past the image, radii up to a few tiles (some culled), and
    depths with deliberate ties so the order at equal depth is exercised."""
    g = torch.Generator().manual_seed(seed)
    means2d = torch.rand(images, n, 2, generator=g) * torch.tensor([cols * TILE * 1.3, rows * TILE * 1.3]) - 0.15 * TILE * torch.tensor([cols, rows])
    radii = torch.randint(0, 3 * TILE, (images, n, 2), generator=g, dtype=torch.int32)
    radii[torch.rand(images, n, generator=g) < 0.1] = 0
    depths = torch.randint(1, 6, (images, n), generator=g).float() * 0.25
    return means2d, radii, depths


def brute_force(means2d, radii, depths, cols: int, rows: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Per (image, tile), the flat Gaussian ids front to back, ties in Gaussian order."""
    images, n = depths.shape
    lists: list[list[tuple[float, int]]] = [[] for _ in range(images * rows * cols)]
    for i in range(images):
        for g in range(n):
            rx, ry = int(radii[i, g, 0]), int(radii[i, g, 1])
            if rx <= 0 or ry <= 0:
                continue
            x, y = float(means2d[i, g, 0]) / TILE, float(means2d[i, g, 1]) / TILE
            x0, x1 = (min(max(0, f), cols) for f in (math.floor(x - rx / TILE), math.ceil(x + rx / TILE)))
            y0, y1 = (min(max(0, f), rows) for f in (math.floor(y - ry / TILE), math.ceil(y + ry / TILE)))
            for ty in range(y0, y1):
                for tx in range(x0, x1):
                    lists[(i * rows + ty) * cols + tx].append((float(depths[i, g]), i * n + g))
    return [[gid for _, gid in sorted(tile, key=lambda p: p[0])] for tile in lists]  # sorted() is stable


def read_back(lists, images: int, cols: int, rows: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """The pairs of every real tile, read through the offsets as the rasterizer does."""
    offsets = lists.offsets.reshape(images, (rows + 1) * cols)
    ends = torch.cat((offsets.reshape(-1)[1:], torch.tensor([lists.flatten_ids.numel()], dtype=torch.int32)))
    ends = ends.reshape(images, (rows + 1) * cols)
    out = []
    for i in range(images):
        for t in range(rows * cols):
            out.append(lists.flatten_ids[offsets[i, t] : ends[i, t]].tolist())
    return out


@pytest.mark.parametrize(
    ("images", "n", "seed", "cols", "rows"),
    [(1, 300, 0, 5, 4), (3, 120, 1, 5, 4), (2, 400, 3, 130, 130)],  # the last grid outgrows 16-bit tile keys
)
def test_tile_lists_match_gsplat_rules(images: int, n: int, seed: int, cols: int, rows: int) -> None:
    means2d, radii, depths = random_projection(images, n, cols, rows, seed)
    expected = brute_force(means2d, radii, depths, cols, rows)
    need = sum(len(t) for t in expected)
    lists = tile_lists(means2d, radii, depths, TILE, cols, rows, capacity=need + 37)
    assert int(lists.total) == need
    assert read_back(lists, images, cols, rows) == expected
    # Padding goes to the last image's extra row, which is masked out; real rows are not.
    assert lists.masks[:, :rows].all() and not lists.masks[:, rows].any()
    assert int(lists.offsets[-1, rows, cols - 1]) == need


def test_overflow_keeps_the_nearest_gaussians_pairs() -> None:
    cols, rows, n = 5, 4, 200
    means2d, radii, depths = random_projection(1, n, cols, rows, seed=2)
    per_tile = brute_force(means2d, radii, depths, cols, rows)
    # Slot order: nearest Gaussian first (ties in Gaussian order), each one's tiles row by row.
    slots = sorted((float(depths[0, gid]), gid, tile) for tile, ids in enumerate(per_tile) for gid in ids)
    capacity = len(slots) // 2
    lists = tile_lists(means2d, radii, depths, TILE, cols, rows, capacity)
    assert int(lists.total) == len(slots)  # the total still tells how many were asked for
    got = sorted((gid, tile) for tile, ids in enumerate(read_back(lists, 1, cols, rows)) for gid in ids)
    assert got == sorted((gid, tile) for _, gid, tile in slots[:capacity])
    kept_far = max(float(depths[0, gid]) for gid, _ in got)
    assert all(float(depths[0, gid]) >= kept_far for gid, tile in {(g, t) for _, g, t in slots} - set(got))


def test_budget_needs_gsplat() -> None:
    splats = Splats(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.ones(1, 3), torch.ones(1), torch.ones(1, 3))
    from tests.test_render import front_camera

    with pytest.raises(ValueError, match="tile budget"):
        render(splats, front_camera(dtype=torch.float32), torch.zeros(3), budget=TileBudget(8))
    with pytest.raises(ValueError, match="at least one slot"):
        TileBudget(0)


def test_a_budget_grows_near_its_top_with_a_margin_and_only_after_overflow_without() -> None:
    roomy = TileBudget(1000, torch.tensor(700))
    assert not roomy.grow(1.5, margin=1.5**0.5) and roomy.capacity == 1000  # 70% used: left alone
    tight = TileBudget(1000, torch.tensor(900))
    assert tight.grow(1.5, margin=1.5**0.5) and tight.capacity == int(1.5 * 900) + 1  # near the top: grown
    full = TileBudget(1000, torch.tensor(1000))
    assert not full.grow(1.5) and full.capacity == 1000  # no margin: nothing was dropped yet
    over = TileBudget(1000, torch.tensor(1500))
    assert over.grow(1.5) and over.capacity == int(1.5 * 1500) + 1  # renders asked for more than it had


def test_a_probe_sizes_a_budget_from_what_it_counted() -> None:
    probe = TileBudget.probe("cpu")
    assert probe.capacity == 1 and int(probe.peak) == 0
    torch.maximum(probe.peak, torch.tensor(400), out=probe.peak)  # as a render records its pairs
    sized = probe.sized(1.5)
    assert sized.capacity == 601 and int(sized.peak) == 400
    assert sized.peak is not probe.peak  # later renders count on the new budget alone
