"""The built-in stand-in head: a procedural FLAME-format head model ("builtin-v1").

Everything is generated from analytic shapes by the code in this package (no data files):
``features`` describes the head as solids and a face height field, ``surface``/``skin`` cast
a ray grid onto it and cut the mouth and eyelid slits, ``parts`` adds the eyeballs and the
mouth pocket, ``rig`` the joints and skinning, ``identity``/``expressions`` the bases,
``landmarks`` the iBUG-68 embedding and ``masks`` the named regions. See docs/head.md.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from backend.head.builtin.expressions import BLINK_CLOSED, EXPRESSION_NAMES, expression_basis
from backend.head.builtin.features import FaceShape
from backend.head.builtin.identity import IDENTITY_UNITS, identity_basis
from backend.head.builtin.landmarks import MIRROR_PAIRS, landmark_embedding
from backend.head.builtin.masks import part_masks
from backend.head.builtin.mesh import build_mesh
from backend.head.builtin.rig import PARENTS, joint_regressor, skinning_weights
from backend.head.builtin.spec import SPEC, HeadSpec
from backend.head.model import HeadModelData

NAME = "builtin-v1"

__all__ = [
    "BLINK_CLOSED",
    "EXPRESSION_NAMES",
    "IDENTITY_UNITS",
    "MIRROR_PAIRS",
    "NAME",
    "SPEC",
    "HeadSpec",
    "build_builtin_head",
    "generate_head",
]


def generate_head(spec: HeadSpec = SPEC) -> HeadModelData:
    """Build the head model for ``spec`` (deterministic: fixed seeds, no randomness at call time)."""
    shape = FaceShape(spec)
    mesh = build_mesh(spec, shape)
    v = len(mesh.vertices)
    shapedirs = np.concatenate([identity_basis(spec, shape, mesh), expression_basis(spec, shape, mesh)], axis=-1)
    lmk_faces, lmk_bary = landmark_embedding(spec, shape, mesh)
    data = HeadModelData(
        name=NAME,
        v_template=mesh.vertices.astype(np.float32),
        faces=mesh.faces.astype(np.int64),
        shapedirs=shapedirs.astype(np.float32),
        posedirs=np.zeros((v, 3, (len(PARENTS) - 1) * 9), np.float32),
        j_regressor=joint_regressor(spec, mesh).astype(np.float32),
        weights=skinning_weights(spec, mesh).astype(np.float32),
        parents=PARENTS.copy(),
        uv_coords=mesh.uv.astype(np.float32),
        uv_faces=mesh.uv_faces.astype(np.int64),
        lmk_faces=lmk_faces,
        lmk_bary=lmk_bary.astype(np.float32),
        n_shape=spec.n_shape,
        n_expr=spec.n_expr,
        expr_names=EXPRESSION_NAMES,
        part_masks=part_masks(spec, shape, mesh),
    )
    data.validate()
    return data


@lru_cache(maxsize=1)
def build_builtin_head() -> HeadModelData:
    """The built-in head with the default spec, built once per process.

    The arrays are shared between callers: treat them as read-only.
    """
    return generate_head(SPEC)
