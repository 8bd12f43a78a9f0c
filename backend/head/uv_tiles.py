"""UV maps spread over several unit tiles (UDIM style: u in [k, k + 1]) packed into one
[0, 1] square, so layouts, footprints and the generator's UV image see every triangle.

Tile (i, j) becomes cell c of a ceil(sqrt(n)) x ceil(sqrt(n)) grid of the n tiles in use,
scaled by 1 / side: areas keep their proportions, charts of different tiles never overlap.
"""

from __future__ import annotations

import math

import numpy as np


def spans_tiles(uv: np.ndarray) -> bool:
    """True when some UV lies outside [0, 1]."""
    return bool(uv.size) and (float(uv.min()) < 0.0 or float(uv.max()) > 1.0)


def pack_uv_tiles(uv: np.ndarray, uv_faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uv [T', 2] float32 in [0, 1], uv_faces [F, 3]) with every tile packed into the unit
    square; unchanged when the UVs already lie in it.

    Args:
        uv: [T, 2] UVs, v up; uv_faces: [F, 3] indices into uv.
    A triangle's tile is the one holding its centroid; a UV vertex used by triangles of
    several tiles is duplicated, once per tile.
    """
    if not spans_tiles(uv):
        return uv, uv_faces
    uv64 = uv.astype(np.float64)
    tile_of_face = np.floor(uv64[uv_faces].mean(axis=1)).astype(np.int64)  # [F, 2]
    tiles, tile_id = np.unique(tile_of_face, axis=0, return_inverse=True)
    tile_id = tile_id.reshape(-1)
    side = math.ceil(math.sqrt(len(tiles)))
    key = uv_faces.astype(np.int64) * len(tiles) + tile_id[:, None]  # one new vertex per (vertex, tile)
    unique_keys, new_faces = np.unique(key.reshape(-1), return_inverse=True)
    vertex, tile = unique_keys // len(tiles), unique_keys % len(tiles)
    local = (uv64[vertex] - tiles[tile]).clip(0.0, 1.0)
    cell = np.stack([tile % side, tile // side], axis=1)
    return ((cell + local) / side).astype(np.float32), new_faces.reshape(-1, 3).astype(uv_faces.dtype)
