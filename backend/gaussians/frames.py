"""Triangle frames: the local coordinate system every bound Gaussian lives in.

For a triangle (v0, v1, v2) the frame is

    t = normalize(v1 - v0)              (first edge)
    n = normalize((v1 - v0) x (v2 - v0)) (outward normal for counter-clockwise faces)
    b = n x t
    R = [t | b | n]                     (columns; right-handed, orthonormal)
    k = sqrt(2 * area)                  (the triangle's size, metres)

A Gaussian bound at barycentric point p with local offset o, rotation R_l and log-scale s_l
has world mean p + k R o, rotation R R_l and scales k exp(s_l): it moves, turns and grows
with its triangle, and regularizer thresholds stay in triangle units.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# Keeps degenerate (zero-area) triangles from producing NaN frames.
_EPS = 1e-12


class TriangleFrames(NamedTuple):
    rotation: torch.Tensor  # [..., F, 3, 3] columns t, b, n
    quat: torch.Tensor  # [..., F, 4] the same rotation as a unit quaternion (w, x, y, z)
    size: torch.Tensor  # [..., F] k = sqrt(2 * area), metres


def triangle_frames(vertices: torch.Tensor, faces: torch.Tensor) -> TriangleFrames:
    """Frames of every triangle.

    Args:
        vertices: [..., V, 3] metres.
        faces: [F, 3] vertex indices.
    """
    tri = vertices[..., faces, :]  # [..., F, 3, 3]
    e1 = tri[..., 1, :] - tri[..., 0, :]
    e2 = tri[..., 2, :] - tri[..., 0, :]
    cross = torch.cross(e1, e2, dim=-1)
    double_area = cross.norm(dim=-1)
    t = F.normalize(e1, dim=-1, eps=_EPS)
    n = cross / (double_area[..., None] + _EPS)
    # Re-orthogonalize: for near-degenerate triangles the float32 cross product drifts off e1.
    n = F.normalize(n - (n * t).sum(-1, keepdim=True) * t, dim=-1, eps=_EPS)
    b = torch.cross(n, t, dim=-1)
    rotation = torch.stack([t, b, n], dim=-1)
    return TriangleFrames(rotation, matrix_to_quat(rotation), torch.sqrt(double_area + _EPS))


def surface_points(vertices: torch.Tensor, faces: torch.Tensor, face_idx: torch.Tensor, bary: torch.Tensor) -> torch.Tensor:
    """Points given by (face, barycentric) on the mesh.

    Args:
        vertices: [..., V, 3]; faces: [F, 3]; face_idx: [N]; bary: [N, 3].
    Returns:
        [..., N, 3]
    """
    tri = vertices[..., faces[face_idx], :]  # [..., N, 3, 3]
    return (tri * bary[..., None]).sum(dim=-2)


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """[..., 4] quaternions (w, x, y, z), any norm -> [..., 3, 3] rotation matrices."""
    w, x, y, z = F.normalize(q, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*q.shape[:-1], 3, 3)


def normal_in_gaussian_axes(rotation: torch.Tensor) -> torch.Tensor:
    """[..., 3] the frame's z axis (a triangle's normal) in the axes of local rotations
    [..., 4] (w, x, y, z; any norm), R^T e_z: the third row of ``quat_to_matrix``, without
    building the other two (fewer kernels in the training step)."""
    w, x, y, z = rotation.unbind(-1)
    row = torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), w * w + z * z - x * x - y * y], dim=-1)
    return row / rotation.square().sum(dim=-1, keepdim=True)


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product a * b of [..., 4] quaternions (w, x, y, z): rotate by b, then by a."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def matrix_to_quat(m: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] rotation matrices -> [..., 4] unit quaternions (w, x, y, z), w >= 0.

    Each matrix picks the best-conditioned of the four standard formulas (the one whose
    divisor is largest), so the result is stable and differentiable near 180-degree turns.
    """
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    four_sq = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1
    )
    root = torch.sqrt(four_sq.clamp_min(1e-8))  # 2|w|, 2|x|, 2|y|, 2|z|
    candidates = torch.stack(
        [
            torch.stack([root[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1) / (2 * root[..., 0:1]),
            torch.stack([m21 - m12, root[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1) / (2 * root[..., 1:2]),
            torch.stack([m02 - m20, m10 + m01, root[..., 2] ** 2, m12 + m21], dim=-1) / (2 * root[..., 2:3]),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, root[..., 3] ** 2], dim=-1) / (2 * root[..., 3:4]),
        ],
        dim=-2,
    )  # [..., 4 candidates, 4]
    best = four_sq.argmax(dim=-1)
    q = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = F.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)
