"""Skin topology (pole, grid, slit copies), its faces and UVs, and vertex placement.

Vertex order: the crown pole, then the grid row by row, then the lower-lip copies of the
mouth slit, then the lower-lid copies of the left and right eye slits. A slit's original
vertices belong to the side above it (upper lip, upper lid); its copies to the side below.
Corner vertices of a slit are not copied, so each slit closes at its corners.

The eye openings are made in ray space: rays of the upper lid tilt up and rays of the lower
lid tilt down by an almond-shaped amount (``LidState``), fading over the rows away from the
slit. The same machinery moves the lids for the blink and squint expressions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend.head.builtin.features import FaceShape, smoothstep
from backend.head.builtin.spec import HeadSpec
from backend.head.builtin.surface import SkinGrid, eye_slit_point, ray_dirs, skin_radius

# Rows (as polar angle, radians) over which the lid opening fades out above and below the slit.
_FADE_UP = np.radians(14.0)
_FADE_DOWN = np.radians(9.0)


@dataclass(frozen=True)
class LidState:
    """Lid margins of both eyes, as offsets (metres, + = away from the slit) along each eye.

    upper / lower: [2, K] for (left, right) eye at the K columns of the eye slit, from the
    inner to the outer corner. The neutral state is ``SkinLayout.neutral_lids``.
    """

    upper: np.ndarray
    lower: np.ndarray


@dataclass(frozen=True)
class SkinLayout:
    """Index bookkeeping of the skin mesh.

    Attributes:
        grid: the ray grid.
        grid_index: [R, C] vertex index of each grid vertex.
        mouth_copy: [C] lower-lip copy index per column, -1 outside the slit interior.
        eye_copy: [2, C] lower-lid copy index per column for (left, right), -1 elsewhere.
        eye_span: [2, K] slit columns of (left, right) eye, inner corner first.
        num_vertices: skin vertices.
        faces: [F, 3] skin faces (outward, counter-clockwise).
        uv_faces: [F, 3] indices into ``skin_uv``.
    """

    grid: SkinGrid
    grid_index: np.ndarray
    mouth_copy: np.ndarray
    eye_copy: np.ndarray
    eye_span: np.ndarray
    num_vertices: int
    faces: np.ndarray
    uv_faces: np.ndarray

    @property
    def mouth_span(self) -> np.ndarray:
        a, b = self.grid.mouth_cols
        return np.arange(a, b + 1)

    def upper_lip_row(self) -> np.ndarray:
        """Vertex indices of the upper edge of the mouth slit, right corner to left corner."""
        return self.grid_index[self.grid.mouth_row, self.mouth_span]

    def lower_lip_row(self) -> np.ndarray:
        """Vertex indices of the lower edge of the mouth slit, right corner to left corner."""
        cols = self.mouth_span
        copies = self.mouth_copy[cols]
        return np.where(copies >= 0, copies, self.grid_index[self.grid.mouth_row, cols])

    def lid_rows(self, eye: int) -> tuple[np.ndarray, np.ndarray]:
        """(upper margin, lower margin) vertex indices of eye 0 (left) or 1 (right), inner corner first."""
        cols = self.eye_span[eye]
        upper = self.grid_index[self.grid.eye_row, cols]
        copies = self.eye_copy[eye, cols]
        return upper, np.where(copies >= 0, copies, upper)

    def neutral_lids(self, spec: HeadSpec) -> LidState:
        k = self.eye_span.shape[1]
        xi = np.linspace(0.0, 1.0, k)
        # Almond: the upper lid peaks a little toward the nose, the lower lid toward the temple.
        upper = spec.lid_open_up * _arch(xi, 0.45, 0.7)
        lower = spec.lid_open_down * _arch(xi, 0.58, 0.8)
        return LidState(np.stack([upper, upper]), np.stack([lower, lower]))


def _arch(xi: np.ndarray, peak: float, power: float) -> np.ndarray:
    """0 at both ends, 1 at ``peak``: a skewed sine arch."""
    skew = xi ** (np.log(0.5) / np.log(peak))
    return np.sin(np.pi * skew) ** power


def build_layout(spec: HeadSpec, grid: SkinGrid) -> SkinLayout:
    """Vertex indices, faces and UVs of the skin."""
    r, c = grid.rows, grid.cols
    grid_index = 1 + np.arange(r * c).reshape(r, c)
    n = 1 + r * c
    mouth_copy = np.full(c, -1)
    a, b = grid.mouth_cols
    inner = np.arange(a + 1, b)
    mouth_copy[inner] = n + np.arange(len(inner))
    n += len(inner)
    inner_col, outer_col = grid.eye_cols
    left = np.arange(inner_col, outer_col + 1)
    eye_span = np.stack([left, grid.mirror_col(left)])
    eye_copy = np.full((2, c), -1)
    for e in range(2):
        cols = eye_span[e, 1:-1]
        eye_copy[e, cols] = n + np.arange(len(cols))
        n += len(cols)
    faces, uv_faces = _faces_and_uv(grid, grid_index, n, mouth_copy, eye_copy)
    return SkinLayout(grid, grid_index, mouth_copy, eye_copy, eye_span, n, faces, uv_faces)


def _faces_and_uv(grid: SkinGrid, idx: np.ndarray, n: int, mouth_copy: np.ndarray, eye_copy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Skin faces and UV faces. UV index k is vertex k; then the back-seam copies of column 0
    (one per row) and the pole's copies (one per column) follow."""
    r, c = grid.rows, grid.cols
    # Vertex index of the top corners of the quads below each row: slit rows use the copies.
    top = idx.copy()
    top[grid.mouth_row] = np.where(mouth_copy >= 0, mouth_copy, top[grid.mouth_row])
    for e in range(2):
        top[grid.eye_row] = np.where(eye_copy[e] >= 0, eye_copy[e], top[grid.eye_row])
    # One extra column closes the ring; in UV it is a separate seam column at u = 1.
    top_v = np.concatenate([top, top[:, :1]], axis=1)
    low_v = np.concatenate([idx, idx[:, :1]], axis=1)
    seam = (n + np.arange(r))[:, None]
    top_t = np.concatenate([top, seam], axis=1)
    low_t = np.concatenate([idx, seam], axis=1)
    i, j = np.meshgrid(np.arange(r - 1), np.arange(c), indexing="ij")
    # Diagonals mirror across the midline so the mesh is left/right symmetric.
    left = (j >= c // 2)[..., None]

    def quads(t: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, bb, cc, d = t[i, j], b[i + 1, j], t[i, j + 1], b[i + 1, j + 1]
        tri1 = np.where(left, np.stack([a, bb, cc], -1), np.stack([a, bb, d], -1))
        tri2 = np.where(left, np.stack([cc, bb, d], -1), np.stack([a, d, cc], -1))
        return np.concatenate([tri1.reshape(-1, 3), tri2.reshape(-1, 3)])

    cols = np.arange(c)
    cap = np.stack([np.zeros(c, np.int64), idx[0, cols], low_v[0, cols + 1]], -1)
    ucap = np.stack([n + r + cols, idx[0, cols], low_t[0, cols + 1]], -1)
    faces = np.concatenate([cap, quads(top_v, low_v)])
    uv_faces = np.concatenate([ucap, quads(top_t, low_t)])
    return faces.astype(np.int64), uv_faces.astype(np.int64)


def skin_uv(layout: SkinLayout, theta: np.ndarray) -> np.ndarray:
    """[T, 2] UVs of the skin in its own unit square, from the opened rays' polar angles [N].

    u is the column over the number of columns (the back seam at u = 0 and 1); v follows the
    row, read at the opened polar angle so the eye openings are holes in UV space as well.
    """
    g = layout.grid
    r, c = g.rows, g.cols
    n = layout.num_vertices
    uv = np.zeros((n + r + c, 2))
    # Fractional row of every vertex, read in its own column.
    col = np.zeros(n, np.int64)
    col[layout.grid_index] = np.arange(c)[None]
    col[layout.mouth_copy[layout.mouth_copy >= 0]] = np.nonzero(layout.mouth_copy >= 0)[0]
    for e in range(2):
        col[layout.eye_copy[e][layout.eye_copy[e] >= 0]] = np.nonzero(layout.eye_copy[e] >= 0)[0]
    row_of = np.zeros(n)
    for j in range(c):
        at = col == j
        row_of[at] = np.interp(theta[at], g.theta[:, j], np.arange(r))
    uv[:n, 0] = col / c
    uv[:n, 1] = 1.0 - (row_of + 1.0) / r
    uv[0] = (0.5, 1.0)
    uv[n : n + r, 0] = 1.0
    uv[n : n + r, 1] = uv[layout.grid_index[:, 0], 1]
    uv[n + r :, 0] = (np.arange(c) + 0.5) / c
    uv[n + r :, 1] = 1.0
    return uv


def vertex_rays(spec: HeadSpec, layout: SkinLayout, lids: LidState) -> tuple[np.ndarray, np.ndarray]:
    """[N] polar angle and azimuth of every skin vertex's ray, with the eyes opened by ``lids``."""
    g = layout.grid
    r, c = g.rows, g.cols
    theta = np.zeros(layout.num_vertices)
    phi = np.zeros(layout.num_vertices)
    theta[layout.grid_index] = g.theta
    phi[layout.grid_index] = g.phi
    mouth_cols = np.nonzero(layout.mouth_copy >= 0)[0]
    theta[layout.mouth_copy[mouth_cols]] = g.theta[g.mouth_row, mouth_cols]
    phi[layout.mouth_copy[mouth_cols]] = g.phi[g.mouth_row, mouth_cols]
    # Distance from the ray centre to the lids converts margin offsets (metres) to angles.
    lid_dist = float(np.linalg.norm(np.asarray(eye_slit_point(spec, spec.eye_centre[0])) - np.asarray(spec.centre)))
    theta_e = g.theta[g.eye_row][None]
    rows = np.arange(r)[:, None]
    for e in range(2):
        cols = layout.eye_span[e]
        up = np.zeros(c)
        dn = np.zeros(c)
        up[cols] = lids.upper[e] / lid_dist
        dn[cols] = lids.lower[e] / lid_dist
        above = rows <= g.eye_row
        fade_up = np.clip(1.0 - (theta_e - g.theta) / _FADE_UP, 0.0, 1.0) ** 2
        fade_dn = np.clip(1.0 - (g.theta - theta_e) / _FADE_DOWN, 0.0, 1.0) ** 2
        shift = np.where(above, -up[None] * fade_up, dn[None] * fade_dn)
        touched = (up != 0) | (dn != 0)
        sel = np.broadcast_to(touched[None], (r, c))
        theta[layout.grid_index[sel]] += shift[sel]
        copies = layout.eye_copy[e][cols[1:-1]]
        theta[copies] = theta_e[0, cols[1:-1]] + dn[cols[1:-1]]
        phi[copies] = g.phi[g.eye_row, cols[1:-1]]
    return theta, phi


@dataclass(frozen=True)
class SkinPose:
    """Skin positions [N, 3] and the rays [N] (polar angle, azimuth) they were cast along."""

    vertices: np.ndarray
    theta: np.ndarray
    phi: np.ndarray


def skin_vertices(spec: HeadSpec, shape: FaceShape, layout: SkinLayout, lids: LidState, reference: SkinPose | None = None) -> SkinPose:
    """Skin positions (metres) with the eyelids at ``lids``.

    With a ``reference`` only the rays that differ from it are cast again (lid changes touch
    a few hundred rays), the rest are copied.
    """
    theta, phi = vertex_rays(spec, layout, lids)
    margins = [np.unique(np.concatenate(layout.lid_rows(e))) for e in range(2)]
    if reference is None:
        cast = np.ones(len(theta), bool)
        verts = np.zeros((len(theta), 3))
    else:
        cast = (theta != reference.theta) | (phi != reference.phi)
        verts = reference.vertices.copy()
    for m in margins:
        cast[m] = True
    dirs = ray_dirs(theta[cast], phi[cast])  # the pole's ray (theta 0) points straight up
    c = np.asarray(spec.centre)
    verts[cast] = c + skin_radius(shape, dirs)[:, None] * dirs
    # Lid margins tuck in to rest on the eyeball, which gives the lids a visible edge.
    ex, ey, ez = spec.eye_centre
    for margin, sx in zip(margins, (1.0, -1.0)):
        centre = np.array([sx * ex, ey, ez])
        d = verts[margin] - centre
        verts[margin] = centre + d / np.linalg.norm(d, axis=1, keepdims=True) * (spec.eye_radius + spec.lid_margin_gap)
    # The lips meet in a crease: the slit row sinks a little behind the lip surfaces.
    mouth = np.concatenate([layout.upper_lip_row(), layout.lower_lip_row()[1:-1]])
    mouth = mouth[cast[mouth]]
    verts[mouth, 2] -= 0.0012 * smoothstep(spec.mouth_half_width, 0.5 * spec.mouth_half_width, np.abs(verts[mouth, 0]))
    return SkinPose(verts, theta, phi)
