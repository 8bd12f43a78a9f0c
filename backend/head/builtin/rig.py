"""Joints and skinning of the built-in head, in FLAME's layout.

Joints: 0 global (root, low in the neck), 1 neck (base of the skull), 2 jaw (the hinge,
in front of the ears), 3 left eye, 4 right eye. Each joint is a convex combination of
template vertices (``j_regressor``), so joints follow identity shape: the eyes are the mean
of their eyeball; the others are the midpoint of two mirrored skin points on the sides of
the head or neck at the joint's height and depth.
"""

from __future__ import annotations

import numpy as np

from backend.head.builtin.features import smoothstep
from backend.head.builtin.mesh import HeadMesh
from backend.head.builtin.spec import HeadSpec

PARENTS = np.array([-1, 0, 1, 1, 1], dtype=np.int64)


def joint_regressor(spec: HeadSpec, mesh: HeadMesh) -> np.ndarray:
    """[5, V] convex weights over template vertices for each joint."""
    v = mesh.vertices
    reg = np.zeros((5, len(v)))
    for j, (y, z) in ((0, spec.root_joint), (1, spec.neck_joint), (2, spec.jaw_joint)):
        reg[j] = _side_midpoint(mesh, y, z)
    for j, (a, b) in ((3, mesh.eyes[0]), (4, mesh.eyes[1])):
        reg[j, a:b] = 1.0 / (b - a)
    return reg


def _side_midpoint(mesh: HeadMesh, y: float, z: float) -> np.ndarray:
    """[V] weights averaging the skin point at (y, z) on the left side with its mirror image."""
    v = mesh.vertices
    faces = mesh.faces[: mesh.layout.faces.shape[0]]
    tri = v[faces]
    side = (tri[:, :, 0] > 0.02).all(axis=1)
    a, b, c = tri[:, 0, 1:], tri[:, 1, 1:], tri[:, 2, 1:]
    p = np.array([y, z])
    det = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
    det = np.where(np.abs(det) < 1e-15, 1e-15, det)
    l1 = ((p[0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (p[1] - a[:, 1])) / det
    l2 = ((b[:, 0] - a[:, 0]) * (p[1] - a[:, 1]) - (p[0] - a[:, 0]) * (b[:, 1] - a[:, 1])) / det
    bary = np.stack([1 - l1 - l2, l1, l2], axis=1)
    hit = side & (bary >= -1e-9).all(axis=1)
    if not hit.any():
        raise ValueError(f"no skin on the side of the head at y={y}, z={z}")
    # The outermost surface at that (y, z): the side of the head, not an ear fold behind it.
    cand = np.nonzero(hit)[0]
    f = cand[np.argmax(tri[cand, :, 0].mean(axis=1))]
    w = np.zeros(len(v))
    for k in range(3):
        w[faces[f, k]] += 0.5 * bary[f, k]
        w[mesh.mirror[faces[f, k]]] += 0.5 * bary[f, k]
    return w


def skinning_weights(spec: HeadSpec, mesh: HeadMesh) -> np.ndarray:
    """[V, 5] smooth skinning weights, rows summing to 1.

    The lower neck follows the root; the head follows the neck joint; the jaw takes the chin,
    lower lip, mouth floor and lower cheeks. Its boundary runs from the hinge through the
    mouth corners: wide and smooth over the cheeks, a hard split between the lips.
    """
    v = mesh.vertices
    n_skin = mesh.num_skin
    w = np.zeros((len(v), 5))
    y, z = v[:, 1], v[:, 2]
    root = smoothstep(-0.10, -0.17, y)
    jy, jz = spec.jaw_joint
    ym, zm = spec.stomion
    # Angle below the hinge's forward horizontal, measured from the line through the lips.
    delta = np.arctan2(jy - y, z - jz) - np.arctan2(jy - ym, zm - jz)
    layout = mesh.layout
    upper = layout.upper_lip_row()[1:-1]
    lower = layout.lower_lip_row()[1:-1]
    narrow = np.radians(1.0)
    delta[upper] = -narrow
    delta[lower] = narrow
    # Between the lips the split is a step; beyond the corners it widens over the cheeks.
    half = narrow + np.radians(18.0) * smoothstep(0.6 * spec.mouth_half_width, 1.8 * spec.mouth_half_width, np.abs(v[:, 0]))
    jaw = smoothstep(-half, half, delta)
    # Not behind the hinge (ears, back of the head) and not below the mandible (the throat).
    jaw *= smoothstep(jz - 0.035, jz + 0.008, z)
    gy, gz = -0.085, -0.004  # gonion (jaw angle)
    my, mz = -0.121, 0.078  # menton (under the chin)
    ny, nz = my - gy, mz - gz
    below_mandible = ((z - gz) * ny - (y - gy) * nz) / np.hypot(ny, nz)
    jaw *= smoothstep(0.022, -0.004, below_mandible)
    jaw *= 1.0 - root
    w[:n_skin, 0] = root[:n_skin]
    w[:n_skin, 2] = jaw[:n_skin]
    w[:n_skin, 1] = 1.0 - root[:n_skin] - jaw[:n_skin]
    for j, (a, b) in ((3, mesh.eyes[0]), (4, mesh.eyes[1])):
        w[a:b, j] = 1.0
    # The mouth pocket hangs from the lip edge: each vertex skins like the edge vertex it
    # grew from; the deepest point is shared between the jaw and the head.
    a, b = mesh.mouth
    parent = mesh.mouth_parent
    w[a:b] = np.where(parent[:, None] >= 0, w[np.maximum(parent, 0)], [0.0, 0.5, 0.5, 0.0, 0.0])
    return w
