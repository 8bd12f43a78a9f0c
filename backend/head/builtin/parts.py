"""Separate parts: the eyeballs and the mouth pocket behind the lip slit.

Both come with a UV layout on a disc (centre at (0.5, 0.5), radius 0.5): the eyeball's
front pole (the pupil) at the centre, the pocket's deepest point at the centre and its lip
edge on the rim, so neither needs a seam.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend.head.builtin.spec import HeadSpec


@dataclass(frozen=True)
class Part:
    """A mesh piece: vertices [n, 3], faces [f, 3] into its own vertices (or, for the mouth,
    into the whole mesh), UVs [t, 2] on the unit disc and UV faces [f, 3] into them."""

    vertices: np.ndarray
    faces: np.ndarray
    uv: np.ndarray
    uv_faces: np.ndarray


def _disc(radius: np.ndarray, angle: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1)


def eyeball(spec: HeadSpec, centre: np.ndarray) -> Part:
    """UV sphere around +z: front pole, ``eye_rings`` rings, back pole; outward faces.

    Rings crowd toward the poles so the iris and pupil get several rings; they are
    symmetric about the equator, so the vertex mean is exactly the centre.
    """
    n_r, n_s = spec.eye_rings, spec.eye_segments
    t = np.arange(1, n_r + 1) / (n_r + 1)
    alpha = np.pi * (t - 0.09 * np.sin(2 * np.pi * t))
    beta = 2 * np.pi * np.arange(n_s) / n_s
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    ring = np.stack([np.sin(a) * np.cos(b), np.sin(a) * np.sin(b), np.cos(a)], -1).reshape(-1, 3)
    unit = np.concatenate([[[0.0, 0.0, 1.0]], ring, [[0.0, 0.0, -1.0]]])
    verts = centre + spec.eye_radius * unit
    back = 1 + n_r * n_s
    idx = 1 + np.arange(n_r * n_s).reshape(n_r, n_s)
    s = np.arange(n_s)
    s1 = (s + 1) % n_s
    k, ss = np.meshgrid(np.arange(n_r - 1), s, indexing="ij")
    quads_a = np.stack([idx[k, ss], idx[k + 1, ss], idx[k + 1, (ss + 1) % n_s]], -1).reshape(-1, 3)
    quads_b = np.stack([idx[k, ss], idx[k + 1, (ss + 1) % n_s], idx[k, (ss + 1) % n_s]], -1).reshape(-1, 3)
    front = np.stack([np.zeros(n_s, np.int64), idx[0, s], idx[0, s1]], -1)
    rear = np.stack([np.full(n_s, back), idx[-1, s1], idx[-1, s]], -1)
    faces = np.concatenate([front, quads_a, quads_b, rear])
    # UV: azimuthal layout, radius proportional to the angle from the pupil; the back pole
    # becomes one rim point per segment.
    uv = np.concatenate([_disc(np.zeros(1), np.zeros(1)), _disc(a.ravel() / np.pi, b.ravel()), _disc(np.ones(n_s), beta + np.pi / n_s)])
    uv_faces = faces.copy()
    uv_faces[-n_s:, 0] = back + s
    return Part(verts.astype(np.float64), faces.astype(np.int64), uv, uv_faces.astype(np.int64))


def mouth_pocket(spec: HeadSpec, loop: np.ndarray, loop_side: np.ndarray, skin: np.ndarray, first_index: int) -> Part:
    """A cavity behind the lips, attached to the slit's edge loop.

    Args:
        loop: [L] skin vertex indices around the slit: upper edge right to left, then the
            lower edge back from left to right (each corner once).
        loop_side: [L] +1 upper edge, -1 lower edge, 0 corner.
        skin: [N, 3] skin vertex positions.
        first_index: index the pocket's first new vertex will have in the whole mesh.
    Returns faces indexing the whole mesh (loop vertices included); normals face the cavity.
    """
    k_n = spec.mouth_rings
    edge = skin[loop]
    n_l = len(loop)
    f = np.arange(1, k_n + 1) / k_n
    x = edge[:, 0]
    span = np.abs(x).max()
    # The cavity opens behind the lips into a lens; the corners stay closed.
    lens = np.sqrt(np.clip(1.0 - (x / (span * 1.02)) ** 2, 0.0, 1.0))
    opening = 0.5 * spec.mouth_height * np.sin(0.5 * np.pi * f[:, None]) ** 0.8 * lens[None]
    rings = np.repeat(edge[None], k_n, axis=0)
    rings[..., 0] = x[None] * (1.0 + 0.3 * np.sin(0.5 * np.pi * f[:, None]))
    rings[..., 1] = edge[None, :, 1] + loop_side[None] * opening
    rings[..., 2] = edge[None, :, 2] - spec.mouth_depth * f[:, None] ** 0.9
    centre = np.array([[0.0, edge[:, 1].mean(), edge[:, 2].max() - spec.mouth_depth - 0.004]])
    verts = np.concatenate([rings.reshape(-1, 3), centre])
    ring_idx = np.concatenate([loop[None], first_index + np.arange(k_n * n_l).reshape(k_n, n_l)])
    tip = first_index + k_n * n_l
    k, m = np.meshgrid(np.arange(k_n), np.arange(n_l), indexing="ij")
    m1 = (m + 1) % n_l
    tri_a = np.stack([ring_idx[k, m], ring_idx[k + 1, m], ring_idx[k, m1]], -1).reshape(-1, 3)
    tri_b = np.stack([ring_idx[k, m1], ring_idx[k + 1, m], ring_idx[k + 1, m1]], -1).reshape(-1, 3)
    lcol = np.arange(n_l)
    fan = np.stack([ring_idx[-1, lcol], np.full(n_l, tip), ring_idx[-1, (lcol + 1) % n_l]], -1)
    faces = np.concatenate([tri_a, tri_b, fan])
    # UV: ring k at radius 1 - k / (k_n + 1) around the disc, the tip at the centre. UV
    # indices: the loop first (L), then the rings, then the tip.
    angle = 2 * np.pi * np.arange(n_l) / n_l
    radius = 1.0 - np.arange(k_n + 1) / (k_n + 1)
    uv = np.concatenate([_disc(np.repeat(radius, n_l), np.tile(angle, k_n + 1)), [[0.5, 0.5]]])
    uv_ring = np.arange((k_n + 1) * n_l).reshape(k_n + 1, n_l)
    uv_a = np.stack([uv_ring[k, m], uv_ring[k + 1, m], uv_ring[k, m1]], -1).reshape(-1, 3)
    uv_b = np.stack([uv_ring[k, m1], uv_ring[k + 1, m], uv_ring[k + 1, m1]], -1).reshape(-1, 3)
    uv_fan = np.stack([uv_ring[-1, lcol], np.full(n_l, (k_n + 1) * n_l), uv_ring[-1, (lcol + 1) % n_l]], -1)
    return Part(verts, faces.astype(np.int64), uv, np.concatenate([uv_a, uv_b, uv_fan]).astype(np.int64))
