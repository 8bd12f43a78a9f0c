"""Deterministic layouts: where on the mesh each Gaussian is bound.

A layout is one Gaussian per covered texel of an R x R grid over the head model's UV map
(the texel centre's UV triangle gives the parent face and barycentric coordinates). R is
the smallest resolution that covers at least N texels; the surplus is dropped at evenly
spaced positions, so N is exact and the same inputs always give the same layout. Keeping
the texel of every Gaussian gives the generator a UV image to decode into.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from backend.wire.errors import InputError

MIN_GAUSSIANS = 1_000
MAX_GAUSSIANS = 400_000
# Share of a head's triangles that no Gaussian count reaches before a layout warns: a few UV
# fold-overs are common in scanned heads (ICT has 6 of 47,220) and cost nothing visible.
UNREACHABLE_WARN_SHARE = 0.01


@dataclass(frozen=True)
class Binding:
    """Where each of N Gaussians is bound; frozen after layout.

    Attributes:
        face_idx: [N] int64 parent triangle.
        bary: [N, 3] float32 barycentric coordinates in the parent triangle.
        texel: [N, 2] int64 (row, col) of the Gaussian's texel in the R x R UV grid.
        resolution: R.
    """

    face_idx: torch.Tensor
    bary: torch.Tensor
    texel: torch.Tensor
    resolution: int

    @property
    def count(self) -> int:
        return int(self.face_idx.shape[0])

    def to(self, device: torch.device | str) -> Binding:
        return Binding(self.face_idx.to(device), self.bary.to(device), self.texel.to(device), self.resolution)


def _edge(u: np.ndarray, v: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Twice the signed area of (u, v, p), positive when p lies left of u -> v (y up).

    Evaluated with the edge's endpoints in one canonical order, so the two triangles that
    share an edge compute bit-identical values of opposite sign: a texel centre exactly on
    it is decided the same way by both, and the top-left rule gives it to exactly one."""
    swap = (u[..., 0] > v[..., 0]) | ((u[..., 0] == v[..., 0]) & (u[..., 1] > v[..., 1]))
    lo = np.where(swap[..., None], v, u)
    hi = np.where(swap[..., None], u, v)
    e = (hi[..., 0] - lo[..., 0]) * (p[..., 1] - lo[..., 1]) - (hi[..., 1] - lo[..., 1]) * (p[..., 0] - lo[..., 0])
    return np.where(swap, -e, e)


def _top_left(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Edges u -> v of counter-clockwise triangles (y up) that own the points on them: the
    left edges (going down) and the top ones (horizontal, going left)."""
    return (v[..., 1] < u[..., 1]) | ((v[..., 1] == u[..., 1]) & (v[..., 0] < u[..., 0]))


def _rasterize_uv(uv: np.ndarray, uv_faces: np.ndarray, res: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Texels of an res x res grid whose centres fall in a UV triangle.

    Returns (texel_index [M] row-major, face [M], bary [M, 3], hidden [H]). Every texel centre
    inside the charts lands in exactly one triangle (where charts overlap, the lowest face
    index; ``hidden`` lists the faces that lost every centre they hold that way): the inside
    test runs in float64 on edge functions shared bit for bit by neighbouring triangles, with
    the top-left rule on ties (a centre on a shared edge or vertex; float32 barycentrics
    dropped some from both).
    """
    tri = uv.astype(np.float64)[uv_faces] * res  # [F, 3, 2] in texel units, v up
    area = (tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1]) - (tri[:, 2, 0] - tri[:, 0, 0]) * (tri[:, 1, 1] - tri[:, 0, 1])
    tri = np.where((area < 0)[:, None, None], tri[:, [0, 2, 1]], tri)  # counter-clockwise
    corner = np.where(area < 0, 1, 0)  # which corner of the original order moved, to undo below
    valid = area != 0
    lo = np.floor(tri.min(axis=1) - 0.5).astype(np.int64).clip(0, res - 1)
    hi = np.ceil(tri.max(axis=1) - 0.5).astype(np.int64).clip(0, res - 1)
    span = hi - lo + 1
    texels, owners, barys = [], [], []
    # Triangles grouped by bounding-box size keep the work vectorized without padding to the largest box.
    keys = np.where(valid, span[:, 0] * (res + 1) + span[:, 1], -1)
    for key in np.unique(keys[valid]):
        sel = np.nonzero(keys == key)[0]
        w, h = span[sel[0]]
        gx, gy = np.meshgrid(np.arange(w), np.arange(h), indexing="xy")
        px = lo[sel, 0, None] + gx.reshape(1, -1)  # [S, w*h] column
        py = lo[sel, 1, None] + gy.reshape(1, -1)  # [S, w*h] row from the bottom (v up)
        p = np.stack([px + 0.5, py + 0.5], axis=-1)
        a, b, c = tri[sel, 0, None], tri[sel, 1, None], tri[sel, 2, None]
        w0, w1, w2 = _edge(b, c, p), _edge(c, a, p), _edge(a, b, p)  # weights of a, b, c
        inside = np.ones(w0.shape, bool)
        for e, (u, v) in zip((w0, w1, w2), ((b, c), (c, a), (a, b))):
            inside &= (e > 0) | ((e == 0) & _top_left(u, v))
        s_idx, p_idx = np.nonzero(inside)
        weights = np.stack([w0, w1, w2], axis=-1)[s_idx, p_idx]
        flipped = corner[sel[s_idx]] == 1
        weights[flipped] = weights[flipped][:, [0, 2, 1]]  # back to the face's own corner order
        texels.append(py[s_idx, p_idx] * res + px[s_idx, p_idx])
        owners.append(sel[s_idx])
        barys.append(weights / weights.sum(axis=1, keepdims=True))
    texel = np.concatenate(texels)
    face = np.concatenate(owners)
    bary = np.concatenate(barys).clip(0.0, 1.0)
    order = np.lexsort((face, texel))
    texel, face, bary = texel[order], face[order], bary[order]
    first = np.ones(texel.shape[0], bool)  # charts that overlap in UV: the lowest face wins
    first[1:] = texel[1:] != texel[:-1]
    hidden = np.setdiff1d(face, face[first])
    return texel[first], face[first], bary[first], hidden


def sample_layout(uv_coords: np.ndarray, uv_faces: np.ndarray, count: int) -> Binding:
    """A layout of exactly ``count`` Gaussians over a UV map.

    Args:
        uv_coords: [T, 2] UVs in [0, 1]; uv_faces: [F, 3] indices into uv_coords.
        count: number of Gaussians N.
    """
    if not MIN_GAUSSIANS <= count <= MAX_GAUSSIANS:
        raise InputError(f"Gaussian count {count} is outside [{MIN_GAUSSIANS}, {MAX_GAUSSIANS}]")
    _warn_outside(uv_coords, uv_faces)
    e1 = uv_coords[uv_faces[:, 1]] - uv_coords[uv_faces[:, 0]]
    e2 = uv_coords[uv_faces[:, 2]] - uv_coords[uv_faces[:, 0]]
    face_area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    res = max(8, int(np.sqrt(count / max(face_area.sum(), 1e-6))) - 2)
    while True:
        texel, face, bary, hidden = _rasterize_uv(uv_coords, uv_faces, res)
        if texel.shape[0] >= count:
            break
        res += max(1, int(res * (np.sqrt(count / max(texel.shape[0], 1)) - 1)))
    _warn_unreachable(int((face_area == 0).sum()), hidden.shape[0], len(uv_faces))
    keep = np.round(np.linspace(0, texel.shape[0] - 1, count)).astype(np.int64)
    texel, face, bary = texel[keep], face[keep], bary[keep]
    # Row 0 at the top of the UV image (v = 1), as images are stored.
    rows = res - 1 - texel // res
    cols = texel % res
    return Binding(
        face_idx=torch.from_numpy(face.astype(np.int64)),
        bary=torch.from_numpy(bary.astype(np.float32)),
        texel=torch.from_numpy(np.stack([rows, cols], axis=1).astype(np.int64)),
        resolution=res,
    )


def _warn_outside(uv_coords: np.ndarray, uv_faces: np.ndarray) -> None:
    """Warn when triangles lie outside the [0, 1] UV square: the grid cannot reach them, so
    they get no Gaussians (the head loaders pack multi-tile maps into one square first)."""
    tri = uv_coords.astype(np.float64)[uv_faces]
    centre = tri.mean(axis=1)
    outside = ((centre < 0.0) | (centre > 1.0)).any(axis=1)
    if outside.any():
        e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
        area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
        warnings.warn(
            f"layout: {int(outside.sum())} of {len(uv_faces)} triangles ({100 * area[outside].sum() / max(area.sum(), 1e-12):.0f}% "
            "of the UV area) lie outside the [0, 1] UV square and carry no Gaussians; pack the tiles first (backend.head.uv_tiles)",
            stacklevel=3,
        )


def _warn_unreachable(flat: int, hidden: int, faces: int) -> None:
    """Warn about triangles that no Gaussian count reaches: UVs of no area (they hold no
    texel centre) or UVs lying under lower-numbered triangles' (overlapping charts, e.g. a
    mirrored half sharing one chart), whose texels those triangles take."""
    if flat + hidden < UNREACHABLE_WARN_SHARE * faces:
        return
    parts = [f"{flat} have UVs of no area"] if flat else []
    parts += [f"{hidden} lie under other triangles' UVs (overlapping charts: the lower-numbered triangle takes the texels)"] if hidden else []
    warnings.warn(
        f"layout: {flat + hidden} of {faces} triangles ({100 * (flat + hidden) / faces:.1f}%) carry no Gaussians at any count: "
        f"{' and '.join(parts)}; give every triangle its own area in the head's UV map",
        stacklevel=3,
    )


def texel_footprint(vertices: torch.Tensor, faces: torch.Tensor, uv_coords: torch.Tensor, uv_faces: torch.Tensor, binding: Binding) -> torch.Tensor:
    """Side length, in metres, of each Gaussian's texel mapped onto its parent triangle.

    Args:
        vertices: [V, 3] metres; faces: [F, 3]; uv_coords: [T, 2]; uv_faces: [F, 3].
    Returns:
        [N] sqrt(3D area / UV area) of the parent face divided by R: the spacing of neighbours.
    """

    def area(p: torch.Tensor) -> torch.Tensor:
        e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
        if p.shape[-1] == 2:
            return 0.5 * (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).abs()
        return 0.5 * torch.cross(e1, e2, dim=-1).norm(dim=-1)

    idx = binding.face_idx
    ratio = area(vertices[faces[idx]]) / area(uv_coords[uv_faces[idx]]).clamp_min(1e-12)
    return torch.sqrt(ratio) / binding.resolution


def fill_missing(binding: Binding, values: torch.Tensor, known: torch.Tensor, max_steps: int = 256) -> torch.Tensor:
    """Fill values of Gaussians that have none from their UV-grid neighbours.

    Known values are scattered into the R x R texel grid and grown outward by 3x3 averaging
    until every Gaussian's texel is reached; what no known value reaches (an island with
    nothing known) takes the mean of the known values.

    Args:
        values: [N, C]; known: [N] bool.
    Returns:
        [N, C] with known rows unchanged.
    """
    r = binding.resolution
    c = values.shape[1]
    if not bool(known.any()):
        return values.clone()
    flat = binding.texel[:, 0] * r + binding.texel[:, 1]
    grid = torch.zeros(r * r, c, dtype=values.dtype)
    weight = torch.zeros(r * r, dtype=values.dtype)
    grid[flat[known]] = values[known]
    weight[flat[known]] = 1.0
    grid, weight = grid.T.reshape(1, c, r, r), weight.reshape(1, 1, r, r)
    kernel = torch.ones(1, 1, 3, 3, dtype=values.dtype)
    need = torch.zeros(r * r, dtype=torch.bool)
    need[flat] = True
    need = need.reshape(1, 1, r, r)
    for _ in range(max_steps):
        if bool((weight[need] > 0).all()):
            break
        w_sum = torch.nn.functional.conv2d(weight, kernel, padding=1)
        v_sum = torch.nn.functional.conv2d(grid * weight, kernel.expand(c, 1, 3, 3), padding=1, groups=c)
        grow = (weight == 0) & (w_sum > 0)
        grid = torch.where(grow, v_sum / w_sum.clamp_min(1e-12), grid)
        weight = torch.where(grow, torch.ones_like(weight), weight)
    filled = grid.reshape(c, r * r).T[flat]
    reached = weight.reshape(-1)[flat] > 0
    filled[~reached] = values[known].mean(0)
    return torch.where(known[:, None], values, filled)
