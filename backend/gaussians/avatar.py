"""The avatar: Gaussians bound to a head model's triangles, and their deformation.

Local parameters live in each parent triangle's frame (see frames.py). Posing the head
with FLAME parameters moves, turns and scales every Gaussian with its triangle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F

from backend.gaussians.frames import TriangleFrames, quat_multiply, surface_points, triangle_frames
from backend.gaussians.layout import Binding
from backend.gaussians.splats import Splats
from backend.head.model import HeadModel
from backend.head.params import FlameParams
from backend.wire.errors import InputError

SH_C0 = 0.28209479177387814  # Y_0^0: colour = 0.5 + SH_C0 * f_dc


@dataclass
class LocalGaussians:
    """Per-Gaussian parameters in the parent triangle's frame (the optimized quantities).

    Attributes:
        offset: [N, 3] position relative to the bound surface point, in triangle units (k).
        rotation: [N, 4] quaternion (w, x, y, z) relative to the triangle frame; any norm.
        log_scale: [N, 3] log of the standard deviations in triangle units.
        opacity_logit: [N] logit of the opacity.
        sh: [N, K, 3] spherical-harmonics colour coefficients, K = (degree + 1)^2
            (3DGS convention: colour = 0.5 + SH_C0 * sh[:, 0] for degree 0).
    """

    offset: torch.Tensor
    rotation: torch.Tensor
    log_scale: torch.Tensor
    opacity_logit: torch.Tensor
    sh: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.offset.shape[0])

    @property
    def sh_degree(self) -> int:
        return int(math.isqrt(self.sh.shape[1])) - 1

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def map(self, fn) -> LocalGaussians:  # type: ignore[no-untyped-def]
        return LocalGaussians(**{k: fn(v) for k, v in self.tensors().items()})

    def validate(self, count: int) -> None:
        expect = {"offset": (count, 3), "rotation": (count, 4), "log_scale": (count, 3), "opacity_logit": (count,)}
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise InputError(f"avatar '{name}' has shape {list(got)}, expected {list(shape)}")
        k = self.sh.shape[1] if self.sh.ndim == 3 else -1
        if self.sh.ndim != 3 or self.sh.shape[0] != count or self.sh.shape[2] != 3 or math.isqrt(k) ** 2 != k:
            raise InputError(f"avatar 'sh' has shape {list(self.sh.shape)}, expected [{count}, (degree+1)^2, 3]")
        for name, t in self.tensors().items():
            if not bool(torch.isfinite(t).all()):
                raise InputError(f"avatar '{name}' contains NaN or Inf")


@dataclass
class Avatar:
    """A complete avatar: which head model, the identity, the binding and local parameters.

    Attributes:
        head_name: name of the head model it is bound to (e.g. "builtin-v1").
        head_fingerprint: hash of that model's topology and template (see head.registry).
        shape: [S] identity coefficients of the subject.
        static_offset: optional [V, 3] per-vertex template offset, metres.
        binding: parent faces and barycentric coordinates (frozen).
        local: per-Gaussian parameters.
        meta: free-form JSON-able metadata (source, creation time, notes).
    """

    head_name: str
    head_fingerprint: str
    shape: torch.Tensor
    binding: Binding
    local: LocalGaussians
    static_offset: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def count(self) -> int:
        return self.binding.count

    def params_for(self, params: FlameParams) -> FlameParams:
        """``params`` with this avatar's identity and static offset."""
        return replace(params, shape=self.shape.to(params.expr), static_offset=None if self.static_offset is None else self.static_offset.to(params.expr))

    def to(self, device: torch.device | str) -> Avatar:
        return replace(
            self,
            shape=self.shape.to(device),
            binding=self.binding.to(device),
            local=self.local.map(lambda t: t.to(device)),
            static_offset=None if self.static_offset is None else self.static_offset.to(device),
        )


def deform_local(vertices: torch.Tensor, faces: torch.Tensor, binding: Binding, local: LocalGaussians) -> Splats:
    """World-space Gaussians for posed vertices (the functional core; differentiable).

    Args:
        vertices: [B, V, 3] posed vertices, metres.
        faces: [F, 3] vertex indices.
        binding: N bound Gaussians.
        local: their local parameters.
    Returns:
        Splats with means/quats/scales [B, N, ...]; opacities [N] and colours shared by the batch.
    """
    means, quats, scales = deform_geometry(vertices, faces, binding.face_idx, binding.bary, local.offset, local.rotation, local.log_scale)
    return assemble_splats(means, quats, scales, local)


def appearance(local: LocalGaussians) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """What does not move with the head: opacities [N] in [0, 1]; colours, [N, 3] plain RGB
    for SH degree 0, else the [N, K, 3] coefficients; and the SH degree (None for plain RGB)."""
    opacities = torch.sigmoid(local.opacity_logit)
    if local.sh_degree == 0:
        return opacities, (0.5 + SH_C0 * local.sh[:, 0]).clamp_min(0.0), None
    return opacities, local.sh, local.sh_degree


def assemble_splats(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, local: LocalGaussians) -> Splats:
    """Splats from posed geometry plus the local opacity and colour (``appearance``)."""
    return Splats(means, quats, scales, *appearance(local))


def deform_geometry(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    face_idx: torch.Tensor,
    bary: torch.Tensor,
    offset: torch.Tensor,
    rotation: torch.Tensor,
    log_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensors-only core of ``deform_local``: frames of the posed mesh, then ``place_gaussians``.

    Args:
        vertices: [B, V, 3]; faces: [F, 3]; face_idx: [N]; bary: [N, 3];
        offset: [N, 3], rotation: [N, 4], log_scale: [N, 3] local parameters.
    Returns:
        means [B, N, 3] (metres), quats [B, N, 4] (unit, w first), scales [B, N, 3] (metres).
    """
    return place_gaussians(vertices, faces, triangle_frames(vertices, faces), face_idx, bary, offset, rotation, log_scale)


def place_gaussians(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    frames: TriangleFrames,
    face_idx: torch.Tensor,
    bary: torch.Tensor,
    offset: torch.Tensor,
    rotation: torch.Tensor,
    log_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """World Gaussians from posed vertices and their (possibly precomputed) triangle frames.

    Rotations compose as quaternions: each face's frame quaternion is computed once per face,
    F being far fewer than the N Gaussians. Same shapes as ``deform_geometry``.
    """
    size = frames.size[:, face_idx, None]  # [B, N, 1]
    anchor = surface_points(vertices, faces, face_idx, bary)
    # A broadcast product rather than a batched matmul: 3x3 matmuls are too small for BLAS,
    # and as element-wise work torch.compile fuses them with the rest of the placement.
    means = anchor + size * (frames.rotation[:, face_idx] * offset[None, :, None, :]).sum(-1)
    quats = quat_multiply(frames.quat[:, face_idx], F.normalize(rotation, dim=-1)[None])
    scales = size * torch.exp(log_scale)[None]
    return means, quats, scales


def deform(avatar: Avatar, head: HeadModel, params: FlameParams) -> Splats:
    """Pose ``avatar`` for a batch of B FLAME parameter sets in one call -> Splats [B, N, ...]."""
    out = head(avatar.params_for(params))
    return deform_local(out.vertices, head.faces, avatar.binding, avatar.local)


def identity_rotation(count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[N, 4] identity quaternions."""
    q = torch.zeros(count, 4, device=device)
    q[:, 0] = 1.0
    return q


def rgb_to_sh_dc(rgb: torch.Tensor) -> torch.Tensor:
    """[..., 3] colour in [0, 1] -> degree-0 SH coefficient."""
    return (rgb - 0.5) / SH_C0


def sh_dc_to_rgb(dc: torch.Tensor) -> torch.Tensor:
    """[..., 3] degree-0 SH coefficient -> base colour (unclamped; [0, 1] when displayable)."""
    return 0.5 + SH_C0 * dc


def logit(p: torch.Tensor | float) -> torch.Tensor:
    p = torch.as_tensor(p).clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)
