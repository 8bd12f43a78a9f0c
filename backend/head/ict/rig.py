"""Joints and skinning weights for the ICT head, in FLAME's layout (frame: FLAME's, metres).

ICT-FaceKit has no skeleton: its jaw and eyes move with blendshapes (jawOpen, eyeLook*).
FLAME's five joints are added here so FLAME poses drive it too:

- the jaw joint is the pivot of the rigid motion that ICT's own ``jawOpen`` gives the lower
  teeth (a least-squares rotation about the x axis), and the jaw's skinning weight of each
  vertex is how much of that rigid motion ``jawOpen`` gives it, so the falloff over cheeks
  and lips is the one ICT's artists sculpted;
- each eye joint is its eyeball's centre and owns that eyeball alone;
- the neck joint sits at the base of the skull and the root low in the neck, at the heights
  the built-in head uses (the ICT head is placed in the same frame, see ``build.py``).

Every joint is a convex combination of template vertices (``j_regressor``), so joints
follow identity shape.
"""

from __future__ import annotations

import numpy as np

from backend.head.builtin.features import smoothstep

PARENTS = np.array([-1, 0, 1, 1, 1], dtype=np.int64)
# (y, z) of the root and neck joints in FLAME's frame, metres: the built-in head's values
# (docs/head.md), valid because the ICT head is placed with its eyes where the built-in's are.
ROOT_YZ = (-0.120, -0.030)
NECK_YZ = (-0.060, -0.026)
# The lower neck follows the root joint below ROOT_FADE[1] and the neck joint above ROOT_FADE[0].
ROOT_FADE = (-0.10, -0.17)
# jawOpen moves a vertex by less than this (metres) -> no jaw weight; keeps the ratio of two
# tiny displacements near the pivot from becoming noise.
JAW_MIN_MOTION = 0.0005


def jaw_pivot(lower_teeth: np.ndarray, lower_teeth_open: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The rigid motion ICT's jawOpen gives the lower teeth, as a rotation about an x-parallel axis.

    Args:
        lower_teeth: [N, 3] neutral positions; lower_teeth_open: [N, 3] with jawOpen = 1.
    Returns:
        (pivot [3] with x = 0, rotation [3, 3], residual RMS in metres of the rigid fit).
    """
    p, q = lower_teeth[:, 1:], lower_teeth_open[:, 1:]  # (y, z): opening is a turn about x
    pc, qc = p.mean(0), q.mean(0)
    h = (p - pc).T @ (q - qc)
    angle = np.arctan2(h[0, 1] - h[1, 0], h[0, 0] + h[1, 1])
    c, s = np.cos(angle), np.sin(angle)
    r2 = np.array([[c, -s], [s, c]])
    t = qc - r2 @ pc
    # The fixed point of y -> R y + t is the pivot.
    pivot_yz = np.linalg.solve(np.eye(2) - r2, t)
    residual = float(np.sqrt(((p @ r2.T + t - q) ** 2).sum(1).mean()))
    rot = np.eye(3)
    rot[1:, 1:] = r2
    return np.array([0.0, *pivot_yz]), rot, residual


def jaw_weights(vertices: np.ndarray, jaw_open: np.ndarray, pivot: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """[V] jaw weight in [0, 1]: the share of the rigid jaw motion each vertex makes in jawOpen.

    Args:
        vertices: [V, 3] neutral; jaw_open: [V, 3] the jawOpen displacement; pivot, rot: the
            rigid jaw motion from ``jaw_pivot``.
    """
    rigid = (vertices - pivot) @ rot.T + pivot - vertices
    along = (jaw_open * rigid).sum(1) / np.maximum((rigid**2).sum(1), JAW_MIN_MOTION**2)
    return np.where(np.linalg.norm(jaw_open, axis=1) < JAW_MIN_MOTION, 0.0, np.clip(along, 0.0, 1.0))


def side_midpoint(vertices: np.ndarray, faces: np.ndarray, y: float, z: float) -> np.ndarray:
    """[V] convex weights averaging the outermost surface points at (y, z) on the left and right.

    Each side's point is the barycentric combination of the triangle whose (y, z) projection
    holds (y, z) and that lies farthest out in x on that side; their midpoint is (≈0, y, z).
    """
    tri = vertices[faces]
    a, b, c = tri[:, 0, 1:], tri[:, 1, 1:], tri[:, 2, 1:]
    det = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
    det = np.where(np.abs(det) < 1e-15, 1e-15, det)
    l1 = ((y - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (z - a[:, 1])) / det
    l2 = ((b[:, 0] - a[:, 0]) * (z - a[:, 1]) - (y - a[:, 0]) * (b[:, 1] - a[:, 1])) / det
    bary = np.stack([1 - l1 - l2, l1, l2], axis=1)
    inside = (bary >= -1e-9).all(axis=1)
    w = np.zeros(len(vertices))
    for sign in (1.0, -1.0):
        cand = np.nonzero(inside & ((sign * tri[:, :, 0]) > 0.02).all(axis=1))[0]
        if len(cand) == 0:
            raise ValueError(f"no surface on the {'left' if sign > 0 else 'right'} side of the head at y={y}, z={z}")
        f = cand[np.argmax(sign * tri[cand, :, 0].mean(axis=1))]
        np.add.at(w, faces[f], 0.5 * bary[f])
    return w


def joint_regressor(vertices: np.ndarray, skin_faces: np.ndarray, pivot: np.ndarray, eyes: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """[5, V] convex weights: root, neck and jaw from side points of the skin, eyes from their centre rings.

    Args:
        vertices: [V, 3] template; skin_faces: [F', 3] skin triangles; pivot: [3] jaw pivot;
        eyes: (left, right) [V] float weights whose weighted mean is each eyeball's centre.
    """
    reg = np.zeros((5, len(vertices)))
    for j, (y, z) in ((0, ROOT_YZ), (1, NECK_YZ), (2, (pivot[1], pivot[2]))):
        reg[j] = side_midpoint(vertices, skin_faces, y, z)
    reg[3], reg[4] = eyes
    return reg


def skinning_weights(vertices: np.ndarray, jaw: np.ndarray, left_eye: np.ndarray, right_eye: np.ndarray) -> np.ndarray:
    """[V, 5] weights, rows summing to 1: root low in the neck, jaw as given, eyeballs rigid on their joint.

    Args:
        vertices: [V, 3] template; jaw: [V] jaw weight in [0, 1]; left_eye, right_eye: [V] bool
            eyeball vertex masks.
    """
    root = smoothstep(ROOT_FADE[0], ROOT_FADE[1], vertices[:, 1])
    jaw = jaw * (1.0 - root)
    w = np.stack([root, 1.0 - root - jaw, jaw, np.zeros_like(root), np.zeros_like(root)], axis=1)
    for j, mask in ((3, left_eye), (4, right_eye)):
        w[mask] = 0.0
        w[mask, j] = 1.0
    return w
