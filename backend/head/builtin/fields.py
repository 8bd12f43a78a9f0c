"""Shared tools for the identity and expression bases: per-vertex facts and orthogonalisation.

A basis column is a displacement field [V, 3] in metres per unit coefficient.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import solve_triangular

from backend.head.builtin.features import smoothstep
from backend.head.builtin.mesh import HeadMesh


@dataclass(frozen=True)
class VertexFacts:
    """What the bases need to know about each vertex of the neutral mesh.

    Attributes:
        p: [V, 3] neutral positions.
        skin: [V] skin vertices. eyeball: [V] either eyeball. pocket: [V] mouth pocket.
        lip_side: [V] +1 on the upper-lip side of the mouth slit, -1 on the lower side
            (copies of the slit and everything below it), pocket vertices by their parent.
    """

    p: np.ndarray
    skin: np.ndarray
    eyeball: np.ndarray
    pocket: np.ndarray
    lip_side: np.ndarray


def vertex_facts(mesh: HeadMesh) -> VertexFacts:
    v = mesh.vertices
    n = len(v)
    skin = np.zeros(n, bool)
    skin[: mesh.num_skin] = True
    eyeball = np.zeros(n, bool)
    for a, b in mesh.eyes:
        eyeball[a:b] = True
    pocket = np.zeros(n, bool)
    pocket[mesh.mouth[0] : mesh.mouth[1]] = True
    layout = mesh.layout
    row = np.full(n, -1.0)
    row[layout.grid_index] = np.arange(layout.grid.rows)[:, None]
    row[layout.mouth_copy[layout.mouth_copy >= 0]] = layout.grid.mouth_row + 0.5
    row[layout.eye_copy[layout.eye_copy >= 0]] = layout.grid.eye_row + 0.5
    side = np.where(row <= layout.grid.mouth_row, 1.0, -1.0)
    parent = mesh.mouth_parent
    side[pocket] = np.where(parent >= 0, side[np.maximum(parent, 0)], 0.0)
    side[eyeball] = 0.0
    return VertexFacts(v, skin, eyeball, pocket, side)


def follow_pocket(mesh: HeadMesh, field: np.ndarray) -> np.ndarray:
    """Give the mouth pocket its lip edge's displacement, fading with depth (expressions)."""
    out = field.copy()
    a, b = mesh.mouth
    parent = mesh.mouth_parent
    fade = (1.0 - mesh.mouth_ring / (mesh.mouth_ring.max())) ** 1.5
    out[a:b] = np.where(parent[:, None] >= 0, field[np.maximum(parent, 0)] * fade[:, None], 0.0)
    return out


def rigid_eyes(mesh: HeadMesh, values: np.ndarray, at_eyes: np.ndarray) -> np.ndarray:
    """Make each eye region of displacement fields [V, 3, K] move rigidly.

    at_eyes: [2, 3, K] the fields' values at the left and right eyeball centres. Eyeballs
    take that value (translation only, they stay spheres); the skin around each eye blends
    toward the same translation, so the lids keep resting on the ball.
    """
    v = mesh.vertices
    out = values.copy()
    for (a, b), centre, at_centre in zip(mesh.eyes, mesh.eye_centres, at_eyes):
        near = smoothstep(0.026, 0.016, np.linalg.norm(v - centre, axis=1))
        idx = np.nonzero(near > 0)[0]
        w = near[idx, None, None]
        out[idx] = out[idx] * (1.0 - w) + at_centre[None] * w
        out[a:b] = at_centre[None]
    return out


def orthogonalize(columns: np.ndarray) -> np.ndarray:
    """Gram-Schmidt over [V, 3, K] columns (as 3V vectors) in order, keeping each residual's length.

    Earlier columns are unchanged; a later one loses only its overlap with earlier ones, so
    designed units stay close to their design. Computed as Cholesky QR: the same result as
    Gram-Schmidt, far faster, and accurate enough for these well-conditioned columns.
    """
    v, _, k = columns.shape
    a = columns.reshape(v * 3, k).astype(np.float64)
    r = np.linalg.cholesky(a.T @ a).T
    q = (solve_triangular(r, np.eye(k)).T @ a.T).T
    # Column j of q times R[j, j] is column j minus its projection on the earlier columns.
    return (q * np.diag(r)[None]).reshape(v, 3, k)
