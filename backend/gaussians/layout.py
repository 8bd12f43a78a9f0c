"""Deterministic layouts: where on the mesh each Gaussian is bound.

A layout is one Gaussian per covered texel of an R x R grid over the head model's UV map
(the texel centre's UV triangle gives the parent face and barycentric coordinates). R is
the smallest resolution that covers at least N texels; the surplus is dropped at evenly
spaced positions, so N is exact and the same inputs always give the same layout. Keeping
the texel of every Gaussian gives the generator a UV image to decode into.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from backend.errors import InputError

MIN_GAUSSIANS = 1_000
MAX_GAUSSIANS = 400_000


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


def _rasterize_uv(uv: np.ndarray, uv_faces: np.ndarray, res: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Texels of an res x res grid whose centres fall in a UV triangle.

    Returns (texel_index [M] row-major, face [M], bary [M, 3]); each texel at most once (the
    lowest face index wins on shared edges).
    """
    tri = uv[uv_faces] * res  # [F, 3, 2] in texel units, v up
    lo = np.floor(tri.min(axis=1) - 0.5).astype(np.int64).clip(0, res - 1)
    hi = np.ceil(tri.max(axis=1) - 0.5).astype(np.int64).clip(0, res - 1)
    span = hi - lo + 1
    texels, owners, barys = [], [], []
    # Triangles grouped by bounding-box size keep the work vectorized without padding to the largest box.
    keys = span[:, 0] * (res + 1) + span[:, 1]
    for key in np.unique(keys):
        sel = np.nonzero(keys == key)[0]
        w, h = span[sel[0]]
        gx, gy = np.meshgrid(np.arange(w), np.arange(h), indexing="xy")
        px = lo[sel, 0, None] + gx.reshape(1, -1)  # [S, w*h] column
        py = lo[sel, 1, None] + gy.reshape(1, -1)  # [S, w*h] row from the bottom (v up)
        p = np.stack([px + 0.5, py + 0.5], axis=-1)
        a, b, c = tri[sel, 0, None], tri[sel, 1, None], tri[sel, 2, None]
        v0, v1, v2 = b - a, c - a, p - a
        den = v0[..., 0] * v1[..., 1] - v1[..., 0] * v0[..., 1]
        den = np.where(np.abs(den) < 1e-12, np.nan, den)
        l1 = (v2[..., 0] * v1[..., 1] - v1[..., 0] * v2[..., 1]) / den
        l2 = (v0[..., 0] * v2[..., 1] - v2[..., 0] * v0[..., 1]) / den
        l0 = 1.0 - l1 - l2
        inside = (l0 >= -1e-9) & (l1 >= -1e-9) & (l2 >= -1e-9)
        s_idx, p_idx = np.nonzero(inside)
        texels.append(py[s_idx, p_idx] * res + px[s_idx, p_idx])
        owners.append(sel[s_idx])
        barys.append(np.stack([l0, l1, l2], axis=-1)[s_idx, p_idx])
    texel = np.concatenate(texels)
    face = np.concatenate(owners)
    bary = np.concatenate(barys).clip(0.0, 1.0)
    bary /= bary.sum(axis=1, keepdims=True)
    order = np.lexsort((face, texel))
    texel, face, bary = texel[order], face[order], bary[order]
    first = np.ones(texel.shape[0], bool)
    first[1:] = texel[1:] != texel[:-1]
    return texel[first], face[first], bary[first]


def sample_layout(uv_coords: np.ndarray, uv_faces: np.ndarray, count: int) -> Binding:
    """A layout of exactly ``count`` Gaussians over a UV map.

    Args:
        uv_coords: [T, 2] UVs in [0, 1]; uv_faces: [F, 3] indices into uv_coords.
        count: number of Gaussians N.
    """
    if not MIN_GAUSSIANS <= count <= MAX_GAUSSIANS:
        raise InputError(f"Gaussian count {count} is outside [{MIN_GAUSSIANS}, {MAX_GAUSSIANS}]")
    e1 = uv_coords[uv_faces[:, 1]] - uv_coords[uv_faces[:, 0]]
    e2 = uv_coords[uv_faces[:, 2]] - uv_coords[uv_faces[:, 0]]
    uv_area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).sum()
    res = max(8, int(np.sqrt(count / max(uv_area, 1e-6))) - 2)
    while True:
        texel, face, bary = _rasterize_uv(uv_coords, uv_faces, res)
        if texel.shape[0] >= count:
            break
        res += max(1, int(res * (np.sqrt(count / max(texel.shape[0], 1)) - 1)))
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
