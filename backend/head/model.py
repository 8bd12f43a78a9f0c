"""One interface for FLAME-format head models.

``HeadModelData`` holds the arrays of a FLAME-format model (the built-in head or a real
FLAME file); ``HeadModel`` poses them for a batch of ``FlameParams`` with smplx's linear
blend skinning, so real FLAME and the built-in head share one code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from smplx.lbs import batch_rodrigues, blend_shapes, transform_mat, vertices2joints

from backend.head.params import FlameParams
from backend.wire.errors import InputError

# FLAME's shapedirs hold the identity basis in columns [0, 300) and expressions from 300 on.
FLAME_SHAPE_SPACE = 300
JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")

JAW_EXPRESSION = "jawOpen"  # an expression of this name carries the jaw (ARKit's naming)


@dataclass(frozen=True)
class HeadModelData:
    """Arrays of a FLAME-format head model, in FLAME's own conventions (metres, +y up, +z forward).

    Attributes:
        name: short identifier, e.g. "builtin-v1" or "flame2023".
        v_template: [V, 3] float32 neutral template.
        faces: [F, 3] int64 vertex indices, counter-clockwise seen from outside.
        shapedirs: [V, 3, 300 + E] float32; identity in [..., :300], expression in [..., 300:].
        posedirs: [V, 3, (J - 1) * 9] float32 pose correctives (may be zero).
        j_regressor: [J, V] float32, joints from shaped vertices.
        weights: [V, J] float32 skinning weights, rows sum to 1.
        parents: [J] int64, parents[0] == -1.
        uv_coords: [T, 2] float32 in [0, 1], v up.
        uv_faces: [F, 3] int64 indices into uv_coords.
        lmk_faces: [68] int64 face index of each iBUG-68 landmark.
        lmk_bary: [68, 3] float32 barycentric coordinates in that face.
        n_shape: identity components in use (<= 300).
        n_expr: expression components in use.
        expr_names: names of the leading expression components (FACS-like units), may be
            shorter than n_expr.
        part_masks: optional named [V] bool vertex masks (e.g. "left_eyeball", "lips").
    """

    name: str
    v_template: np.ndarray
    faces: np.ndarray
    shapedirs: np.ndarray
    posedirs: np.ndarray
    j_regressor: np.ndarray
    weights: np.ndarray
    parents: np.ndarray
    uv_coords: np.ndarray
    uv_faces: np.ndarray
    lmk_faces: np.ndarray
    lmk_bary: np.ndarray
    n_shape: int
    n_expr: int
    expr_names: tuple[str, ...] = ()
    part_masks: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def jaw_expression(self) -> int | None:
        """Index of the expression that carries the jaw (``JAW_EXPRESSION``), or None when
        the jaw joint does. A head named after ARKit (ICT's) opens its mouth, teeth and chin
        with ``jawOpen``: whoever animates it leaves the joint at rest, or the jaw opens twice."""
        return self.expr_names.index(JAW_EXPRESSION) if JAW_EXPRESSION in self.expr_names else None

    @property
    def num_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    @property
    def num_joints(self) -> int:
        return int(self.parents.shape[0])

    def validate(self) -> None:
        """Raise InputError if any array disagrees with the others."""
        v, f, j = self.num_vertices, self.num_faces, self.num_joints
        expect = {
            "v_template": (v, 3),
            "faces": (f, 3),
            "posedirs": (v, 3, (j - 1) * 9),
            "j_regressor": (j, v),
            "weights": (v, j),
            "uv_faces": (f, 3),
            "lmk_faces": (68,),
            "lmk_bary": (68, 3),
        }
        for key, shape in expect.items():
            got = tuple(getattr(self, key).shape)
            if got != shape:
                raise InputError(f"head model '{self.name}': '{key}' has shape {list(got)}, expected {list(shape)}")
        if self.shapedirs.shape[:2] != (v, 3) or self.shapedirs.shape[2] < FLAME_SHAPE_SPACE + self.n_expr:
            raise InputError(
                f"head model '{self.name}': 'shapedirs' has shape {list(self.shapedirs.shape)}, "
                f"expected [{v}, 3, >= {FLAME_SHAPE_SPACE + self.n_expr}]"
            )
        if not 0 < self.n_shape <= FLAME_SHAPE_SPACE:
            raise InputError(f"head model '{self.name}': n_shape={self.n_shape} outside (0, {FLAME_SHAPE_SPACE}]")
        if self.faces.min() < 0 or self.faces.max() >= v:
            raise InputError(f"head model '{self.name}': face indices outside [0, {v})")
        if self.uv_faces.max() >= self.uv_coords.shape[0]:
            raise InputError(f"head model '{self.name}': uv face indices outside the uv array")
        if self.lmk_faces.min() < 0 or self.lmk_faces.max() >= f:
            raise InputError(f"head model '{self.name}': landmark face indices outside [0, {f})")


class HeadOutput(NamedTuple):
    """Posed head for a batch of B parameter sets (world frame = FLAME frame, metres)."""

    vertices: torch.Tensor  # [B, V, 3]
    joints: torch.Tensor  # [B, J, 3] posed joint locations
    landmarks: torch.Tensor  # [B, 68, 3]


class HeadModel(torch.nn.Module):
    """A FLAME-format head model: FLAME parameters in, posed vertices out (differentiable)."""

    def __init__(self, data: HeadModelData) -> None:
        super().__init__()
        data.validate()
        self.data = data
        self.name = data.name
        self.n_shape = data.n_shape
        self.n_expr = data.n_expr
        self.expr_names = data.expr_names
        f32 = torch.float32
        self.register_buffer("v_template", torch.as_tensor(data.v_template, dtype=f32))
        self.register_buffer("faces", torch.as_tensor(data.faces, dtype=torch.long))
        dirs = np.concatenate(
            [data.shapedirs[..., : data.n_shape], data.shapedirs[..., FLAME_SHAPE_SPACE : FLAME_SHAPE_SPACE + data.n_expr]],
            axis=-1,
        )
        self.register_buffer("dirs", torch.as_tensor(dirs, dtype=f32))
        # smplx wants the pose basis as [(J-1)*9, V*3].
        posedirs = data.posedirs.reshape(-1, data.posedirs.shape[-1]).T
        self.register_buffer("posedirs", torch.as_tensor(np.ascontiguousarray(posedirs), dtype=f32))
        self.register_buffer("j_regressor", torch.as_tensor(data.j_regressor, dtype=f32))
        self.register_buffer("weights", torch.as_tensor(data.weights, dtype=f32))
        self.register_buffer("parents", torch.as_tensor(data.parents, dtype=torch.long))
        self.joint_parents: tuple[int, ...] = tuple(int(p) for p in data.parents)  # host copy for the chain walk
        self.register_buffer("uv_coords", torch.as_tensor(data.uv_coords, dtype=f32))
        self.register_buffer("uv_faces", torch.as_tensor(data.uv_faces, dtype=torch.long))
        self.register_buffer("lmk_faces", torch.as_tensor(data.lmk_faces, dtype=torch.long))
        self.register_buffer("lmk_bary", torch.as_tensor(data.lmk_bary, dtype=f32))

    @property
    def num_vertices(self) -> int:
        return self.data.num_vertices

    @property
    def num_faces(self) -> int:
        return self.data.num_faces

    def neutral_params(self, batch: int = 1) -> FlameParams:
        return FlameParams.neutral(batch, self.n_shape, self.n_expr, device=self.v_template.device, expr_names=self.expr_names)

    def forward(self, params: FlameParams, check: bool = True) -> HeadOutput:
        """Pose the model. ``check=False`` skips validation (a device sync) in inner loops."""
        if check:
            params.validate()
            params.check_head(self.name, self.expr_names)
        # Files from other tools carry 300 / 100 coefficients, ours may carry fewer: pad or trim losslessly.
        params = params.conformed(self.n_shape, self.n_expr)
        b = params.batch_size
        coeffs = torch.cat([params.shape.expand(b, -1), params.expr], dim=1)
        pose = torch.cat([params.rotation, params.neck_pose, params.jaw_pose, params.eyes_pose], dim=1)
        template = self.v_template if params.static_offset is None else self.v_template + params.static_offset
        verts, joints = self.skin(coeffs, pose, template)
        verts = verts + params.translation[:, None]
        joints = joints + params.translation[:, None]
        return HeadOutput(verts, joints, self.landmarks(verts))

    def skin(self, coeffs: torch.Tensor, pose: torch.Tensor, template: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """smplx's linear blend skinning, walking the joint tree from a host tuple.

        smplx's ``lbs`` indexes a Python list with elements of the device ``parents`` tensor,
        a device-to-host read per joint; this walk reads nothing back, so a posing step can be
        captured in a CUDA graph. Same formulas, built from smplx's own pieces (a test holds it
        to ``smplx.lbs.lbs``).

        Args:
            coeffs: [B, n_shape + n_expr] shape then expression coefficients.
            pose: [B, 3 * J] axis-angle per joint (global, neck, jaw, eyes).
            template: [V, 3] or [B, V, 3] rest vertices, metres.
        Returns:
            vertices [B, V, 3] and joints [B, J, 3], metres (no translation).
        """
        b, nj = pose.shape[0], len(self.joint_parents)
        shaped = template + blend_shapes(coeffs, self.dirs)  # [B, V, 3]
        joints = vertices2joints(self.j_regressor, shaped)  # [B, J, 3]
        rot = batch_rodrigues(pose.reshape(-1, 3)).reshape(b, nj, 3, 3)
        eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
        posed = shaped + ((rot[:, 1:] - eye).reshape(b, -1) @ self.posedirs).reshape(b, -1, 3)
        parents = self.joint_parents
        rel = torch.stack([joints[:, 0]] + [joints[:, i] - joints[:, parents[i]] for i in range(1, nj)], dim=1)
        local = transform_mat(rot.reshape(-1, 3, 3), rel.reshape(-1, 3, 1)).reshape(b, nj, 4, 4)
        chain = [local[:, 0]]
        for i in range(1, nj):
            chain.append(chain[parents[i]] @ local[:, i])
        world = torch.stack(chain, dim=1)  # [B, J, 4, 4] joint frames
        # Skinning transforms act on rest-pose points: subtract each joint's rotated rest position.
        skinning = world - F.pad(world[..., :3, :3] @ joints[..., None], (3, 0, 0, 1))
        T = (self.weights @ skinning.reshape(b, nj, 16)).reshape(b, -1, 4, 4)  # [B, V, 4, 4]
        verts = (T[..., :3, :3] @ posed[..., None])[..., 0] + T[..., :3, 3]
        return verts, world[..., :3, 3]

    def landmarks(self, vertices: torch.Tensor) -> torch.Tensor:
        """[B, V, 3] vertices -> [B, 68, 3] iBUG-68 landmark positions."""
        tri = vertices[:, self.faces[self.lmk_faces]]  # [B, 68, 3, 3]
        return (tri * self.lmk_bary[None, :, :, None]).sum(dim=2)

    def sizes(self) -> dict[str, float]:
        """Extent of the neutral template in metres, and its mean edge length."""
        v = self.v_template
        ext = (v.max(0).values - v.min(0).values).tolist()
        e = v[self.faces] - v[self.faces.roll(1, dims=1)]
        return {"width": ext[0], "height": ext[1], "depth": ext[2], "mean_edge": float(e.norm(dim=-1).mean())}
