"""Tile intersections in a fixed number of slots, computed without a host sync.

gsplat sizes its intersection list on the host (it reads the total back from the GPU before
allocating), so a training step that renders cannot be captured in a CUDA graph and the host
waits for the GPU mid-step. Here the list has a fixed capacity: the same (tile, Gaussian)
pairs in the same order as gsplat's ``isect_tiles`` + ``isect_offset_encode``, followed by
padding slots that all belong to one extra, masked tile row, which the rasterizer skips.
Pure torch: it runs (and is tested) on the CPU too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


@dataclass
class TileBudget:
    """Fixed-size intersection lists for renders that must not sync with the host.

    Attributes:
        capacity: (tile, Gaussian) slots per render, over all images of the call. A render
            that needs more keeps the first ``capacity`` pairs, image by image and nearest
            Gaussian first, and drops the rest; ``peak`` shows it.
        peak: [] int64 on the render device: the most pairs any render asked for since the
            budget was made (read it when a sync is cheap, e.g. at a log line).
    """

    capacity: int
    peak: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"a tile budget needs at least one slot, got {self.capacity}")

    @classmethod
    def probe(cls, device: torch.device | str) -> TileBudget:
        """A one-slot budget that only counts: render the views with it, then ``sized``."""
        return cls(1, torch.zeros((), dtype=torch.int64, device=device))

    def sized(self, headroom: float) -> TileBudget:
        """A new budget of ``headroom`` times the most pairs seen so far (reads ``peak``)."""
        return TileBudget(int(headroom * int(self.peak)) + 1, self.peak.clone())

    def grow(self, headroom: float, margin: float = 1.0) -> bool:
        """Resize to ``headroom`` x ``peak`` once ``peak`` exceeds ``capacity / margin``
        (margin 1: only after pairs were dropped). Reads ``peak``; True if resized."""
        peak = int(self.peak)
        if peak * margin <= self.capacity:
            return False
        self.capacity = int(headroom * peak) + 1
        return True

    def to(self, device: torch.device | str) -> TileBudget:
        """The budget with its counter on ``device`` (a copy when it moves)."""
        return TileBudget(self.capacity, self.peak.to(device))


class TileLists(NamedTuple):
    """What gsplat's ``rasterize_to_pixels`` takes, for a grid with one extra tile row.

    Attributes:
        offsets: [I, tile_rows + 1, tile_cols] int32: where each tile's pairs start in
            ``flatten_ids`` (the last row holds only padding).
        flatten_ids: [capacity] int32 indices into the flattened [I * N] Gaussians.
        masks: [I, tile_rows + 1, tile_cols] bool, False on the extra row.
        total: [] int64 pairs the render needed (more than ``capacity`` means some dropped).
    """

    offsets: torch.Tensor
    flatten_ids: torch.Tensor
    masks: torch.Tensor
    total: torch.Tensor


def tile_lists(
    means2d: torch.Tensor,
    radii: torch.Tensor,
    depths: torch.Tensor,
    tile_size: int,
    tile_cols: int,
    tile_rows: int,
    capacity: int,
) -> TileLists:
    """Sorted (tile, Gaussian) pairs of I images in ``capacity`` slots, with no host sync.

    Args:
        means2d: [I, N, 2] projected centres, pixels.
        radii: [I, N, 2] int32 screen radii in pixels (x, y); 0 marks a culled Gaussian.
        depths: [I, N] positive camera-space z; pairs of one tile are ordered front to back.
        tile_size: pixels per tile side.
        tile_cols, tile_rows: the image's tile grid (without the extra row).
        capacity: slots in the returned lists.

    Returns:
        TileLists; within a tile, pairs are sorted by depth and, at equal depth, by Gaussian
        index, exactly as gsplat's stable radix sort leaves them.
    """
    images, n = depths.shape
    device = depths.device
    # Pairs are laid out nearest Gaussian first within each image, so one stable sort by tile
    # alone leaves every tile front to back: the slots' sort needs only the tile's few bits,
    # and the depth order comes from a sort over the Gaussians, not over the slots.
    by_depth = torch.sort(depths, dim=-1, stable=True).indices  # [I, N]; ties in Gaussian order
    gaussian = (by_depth + n * torch.arange(images, device=device)[:, None]).reshape(-1)  # [I * N]
    x_lo, x_hi = _tile_span(means2d[..., 0], radii[..., 0], tile_size, tile_cols)
    y_lo, y_hi = _tile_span(means2d[..., 1], radii[..., 1], tile_size, tile_rows)
    visible = (radii[..., 0] > 0) & (radii[..., 1] > 0)
    cols = (x_hi - x_lo).clamp_min(0)
    counts = torch.where(visible, cols * (y_hi - y_lo).clamp_min(0), 0).reshape(-1)[gaussian]  # [I * N], depth order
    ends = torch.cumsum(counts, 0)
    total = ends[-1]

    slot = torch.arange(capacity, device=device)
    place = torch.searchsorted(ends, slot, right=True).clamp_max(images * n - 1)  # [capacity]
    owner = gaussian[place]
    k = slot - (ends[place] - counts[place])  # the slot's place in its Gaussian's tile rectangle
    width = cols.reshape(-1)[owner].clamp_min(1)
    row = y_lo.reshape(-1)[owner] + torch.div(k, width, rounding_mode="floor")
    col = x_lo.reshape(-1)[owner] + k % width
    tiles = (tile_rows + 1) * tile_cols
    pad_tile = images * tiles - 1  # the last tile of the last image's extra row
    key_dtype = torch.int16 if pad_tile <= torch.iinfo(torch.int16).max else torch.int32
    tile = torch.where(slot < total, torch.div(owner, n, rounding_mode="floor") * tiles + row * tile_cols + col, pad_tile)
    tile, order = torch.sort(tile.to(key_dtype), stable=True)
    flatten_ids = owner[order].to(torch.int32)
    starts = torch.searchsorted(tile, torch.arange(images * tiles, device=device, dtype=key_dtype))
    offsets = starts.to(torch.int32).reshape(images, tile_rows + 1, tile_cols)
    masks = torch.ones(images, tile_rows + 1, tile_cols, dtype=torch.bool, device=device)
    masks[:, -1] = False
    return TileLists(offsets, flatten_ids, masks, total)


def _tile_span(centre: torch.Tensor, radius: torch.Tensor, tile_size: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last tile index a Gaussian's box covers along one axis, clamped to
    [0, tiles], with gsplat's rounding (floor of the low edge, ceil of the high edge)."""
    c = centre / tile_size
    r = radius.to(centre.dtype) / tile_size
    lo = torch.floor(c - r).clamp(0, tiles).to(torch.int64)
    hi = torch.ceil(c + r).clamp(0, tiles).to(torch.int64)
    return lo, hi
