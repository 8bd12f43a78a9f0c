"""Bound Gaussians placed on precomputed triangle frames, with the anti-spike and depth
hinges, in one Triton kernel forward and one backward.

The reference is ``place_gaussians`` + ``assemble_splats`` on frames gathered for the step's
frames, plus ``spike_loss`` + ``depth_loss``: a few dozen element-wise kernels each way. Here
each Gaussian's row of the packed parameters is read once, its triangle's vertices and frame
are gathered in the kernel, and the backward writes the row of the packed gradient directly.
For Gaussian i on triangle f (frame R, quaternion q_f, size k) and packed row
(o, q, s, a, c):

    mean = sum_j bary_j v_j + k R o      quat = q_f (x) q / |q|      scale = k exp(s)
    opacity = sigmoid(a)                 colour = max(0.5 + C0 c, 0)   (SH degree 0)

and the hinges of ``regularizers.py`` (weights over N, so their sum is the mean). Their
(sub)gradients: the largest log-scale carries the scale hinge's, the largest and smallest
the anisotropy hinge's (the first one on ties), and the depth hinge's reaches the quaternion
through n = p(q) / |q|^2, p = (2(xz - wy), 2(yz + wx), w^2 + z^2 - x^2 - y^2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from backend.gaussians.avatar import SH_C0
from backend.gaussians.frames import TriangleFrames
from backend.gaussians.splats import Splats
from backend.refine.packed import PackLayout
from backend.refine.regularizers import AntiSpike, SurfaceHinge

_BLOCK = 256


@triton.jit
def _load_row(packed_ptr, i, ok, D: tl.constexpr):
    row = packed_ptr + i * D
    o = (tl.load(row, mask=ok, other=0.0), tl.load(row + 1, mask=ok, other=0.0), tl.load(row + 2, mask=ok, other=0.0))
    q = (
        tl.load(row + 3, mask=ok, other=1.0), tl.load(row + 4, mask=ok, other=0.0),
        tl.load(row + 5, mask=ok, other=0.0), tl.load(row + 6, mask=ok, other=0.0),
    )
    s = (tl.load(row + 7, mask=ok, other=0.0), tl.load(row + 8, mask=ok, other=0.0), tl.load(row + 9, mask=ok, other=0.0))
    return o, q, s


@triton.jit
def _triangle(frame_ptr, b, face_idx_ptr, i, ok, rot_ptr, quat_ptr, size_ptr, F):
    """The frame (R row-major, q_f, k) of Gaussian i's triangle at the b-th step frame."""
    t = tl.load(frame_ptr + b)
    tri = t * F + tl.load(face_idx_ptr + i, mask=ok, other=0)
    r = rot_ptr + tri * 9
    rot = (
        tl.load(r, mask=ok, other=0.0), tl.load(r + 1, mask=ok, other=0.0), tl.load(r + 2, mask=ok, other=0.0),
        tl.load(r + 3, mask=ok, other=0.0), tl.load(r + 4, mask=ok, other=0.0), tl.load(r + 5, mask=ok, other=0.0),
        tl.load(r + 6, mask=ok, other=0.0), tl.load(r + 7, mask=ok, other=0.0), tl.load(r + 8, mask=ok, other=0.0),
    )
    qf = quat_ptr + tri * 4
    quat = (tl.load(qf, mask=ok, other=1.0), tl.load(qf + 1, mask=ok, other=0.0), tl.load(qf + 2, mask=ok, other=0.0), tl.load(qf + 3, mask=ok, other=0.0))
    return t, rot, quat, tl.load(size_ptr + tri, mask=ok, other=0.0)


@triton.jit
def _hinge_terms(o, q, s, max_scale, log_max_ratio, max_offset, max_depth):
    """Hinge values and what their gradients need, per Gaussian."""
    s_max = tl.maximum(tl.maximum(s[0], s[1]), s[2])
    s_min = tl.minimum(tl.minimum(s[0], s[1]), s[2])
    # First index of the largest and the smallest log-scale.
    arg_max = tl.where(s[0] == s_max, 0, tl.where(s[1] == s_max, 1, 2))
    arg_min = tl.where(s[0] == s_min, 0, tl.where(s[1] == s_min, 1, 2))
    big = tl.exp(s_max)
    o_norm = tl.sqrt(o[0] * o[0] + o[1] * o[1] + o[2] * o[2])
    w, x, y, z = q
    qq = w * w + x * x + y * y + z * z
    p = (2 * (x * z - w * y), 2 * (y * z + w * x), w * w + z * z - x * x - y * y)
    u = (p[0] / qq * tl.exp(s[0]), p[1] / qq * tl.exp(s[1]), p[2] / qq * tl.exp(s[2]))
    sigma = tl.sqrt(u[0] * u[0] + u[1] * u[1] + u[2] * u[2] + 1e-12)
    values = (
        tl.maximum(big - max_scale, 0.0),
        tl.maximum(s_max - s_min - log_max_ratio, 0.0),
        tl.maximum(o_norm - max_offset, 0.0),
        tl.maximum(tl.abs(o[2]) + sigma - max_depth, 0.0),
    )
    return values, arg_max, arg_min, big, o_norm, qq, p, u, sigma


@triton.jit(do_not_specialize=["N", "V", "F"])
def _place_forward(
    packed_ptr, frame_ptr, verts_ptr, faces_ptr, rot_ptr, quat_ptr, size_ptr, face_idx_ptr, bary_ptr,
    means_ptr, quats_ptr, scales_ptr, opacity_ptr, colour_ptr, partial_ptr, N, V, F,
    w_scale, max_scale, w_aniso, log_max_ratio, w_offset, max_offset, w_depth, max_depth,
    D: tl.constexpr, C0: tl.constexpr, BLOCK: tl.constexpr,
):
    pid, b = tl.program_id(0), tl.program_id(1)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    o, q, s = _load_row(packed_ptr, i, ok, D)
    t, rot, qf, k = _triangle(frame_ptr, b, face_idx_ptr, i, ok, rot_ptr, quat_ptr, size_ptr, F)
    corners = faces_ptr + tl.load(face_idx_ptr + i, mask=ok, other=0) * 3
    out = (b * N + i) * 3
    for axis in tl.static_range(3):
        anchor = tl.zeros([BLOCK], tl.float32)
        for j in tl.static_range(3):
            vertex = tl.load(corners + j, mask=ok, other=0)
            anchor += tl.load(bary_ptr + i * 3 + j, mask=ok, other=0.0) * tl.load(verts_ptr + (t * V + vertex) * 3 + axis, mask=ok, other=0.0)
        turned = rot[3 * axis] * o[0] + rot[3 * axis + 1] * o[1] + rot[3 * axis + 2] * o[2]
        tl.store(means_ptr + out + axis, anchor + k * turned, mask=ok)
        tl.store(scales_ptr + out + axis, k * tl.exp(s[axis]), mask=ok)
    inv = 1.0 / tl.maximum(tl.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]), 1e-12)
    bw, bx, by, bz = q[0] * inv, q[1] * inv, q[2] * inv, q[3] * inv
    aw, ax, ay, az = qf
    quat_out = quats_ptr + (b * N + i) * 4
    tl.store(quat_out, aw * bw - ax * bx - ay * by - az * bz, mask=ok)
    tl.store(quat_out + 1, aw * bx + ax * bw + ay * bz - az * by, mask=ok)
    tl.store(quat_out + 2, aw * by - ax * bz + ay * bw + az * bx, mask=ok)
    tl.store(quat_out + 3, aw * bz + ax * by - ay * bx + az * bw, mask=ok)
    if b == 0:  # opacity, colour and hinges are per Gaussian, not per frame
        tl.store(opacity_ptr + i, tl.sigmoid(tl.load(packed_ptr + i * D + 10, mask=ok, other=0.0)), mask=ok)
        for channel in tl.static_range(3):
            sh = tl.load(packed_ptr + i * D + 11 + channel, mask=ok, other=0.0)
            tl.store(colour_ptr + i * 3 + channel, tl.maximum(0.5 + C0 * sh, 0.0), mask=ok)
        values, _, _, _, _, _, _, _, _ = _hinge_terms(o, q, s, max_scale, log_max_ratio, max_offset, max_depth)
        hinge = w_scale * values[0] + w_aniso * values[1] + w_offset * values[2] + w_depth * values[3]
        tl.store(partial_ptr + pid, tl.sum(tl.where(ok, hinge, 0.0), 0))


@triton.jit(do_not_specialize=["N", "V", "F", "B"])
def _place_backward(
    packed_ptr, frame_ptr, faces_ptr, rot_ptr, quat_ptr, size_ptr, face_idx_ptr, bary_ptr,
    g_means_ptr, g_quats_ptr, g_scales_ptr, g_opacity_ptr, g_colour_ptr, g_hinge_ptr, grad_ptr,
    g_verts_ptr, g_rot_ptr, g_quat_ptr, g_size_ptr, N, V, F, B,
    w_scale, max_scale, w_aniso, log_max_ratio, w_offset, max_offset, w_depth, max_depth,
    D: tl.constexpr, C0: tl.constexpr, BLOCK: tl.constexpr, MESH: tl.constexpr,
):
    """The packed gradient's rows; with MESH also the gradients of the vertices and the
    triangle frames, added atomically (many Gaussians share a triangle)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    o, q, s = _load_row(packed_ptr, i, ok, D)
    if MESH:
        unit = 1.0 / tl.maximum(tl.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]), 1e-12)
        bw, bx, by, bz = q[0] * unit, q[1] * unit, q[2] * unit, q[3] * unit
        f_i = tl.load(face_idx_ptr + i, mask=ok, other=0)
    g_o0 = tl.zeros([BLOCK], tl.float32)
    g_o1 = tl.zeros([BLOCK], tl.float32)
    g_o2 = tl.zeros([BLOCK], tl.float32)
    g_s0 = tl.zeros([BLOCK], tl.float32)
    g_s1 = tl.zeros([BLOCK], tl.float32)
    g_s2 = tl.zeros([BLOCK], tl.float32)
    g_w = tl.zeros([BLOCK], tl.float32)  # gradient of the unit quaternion q / |q|
    g_x = tl.zeros([BLOCK], tl.float32)
    g_y = tl.zeros([BLOCK], tl.float32)
    g_z = tl.zeros([BLOCK], tl.float32)
    for b in range(B):
        t, rot, qf, k = _triangle(frame_ptr, b, face_idx_ptr, i, ok, rot_ptr, quat_ptr, size_ptr, F)
        at = (b * N + i) * 3
        gm0 = tl.load(g_means_ptr + at, mask=ok, other=0.0)
        gm1 = tl.load(g_means_ptr + at + 1, mask=ok, other=0.0)
        gm2 = tl.load(g_means_ptr + at + 2, mask=ok, other=0.0)
        g_o0 += k * (rot[0] * gm0 + rot[3] * gm1 + rot[6] * gm2)
        g_o1 += k * (rot[1] * gm0 + rot[4] * gm1 + rot[7] * gm2)
        g_o2 += k * (rot[2] * gm0 + rot[5] * gm1 + rot[8] * gm2)
        gs0 = tl.load(g_scales_ptr + at, mask=ok, other=0.0) * tl.exp(s[0])
        gs1 = tl.load(g_scales_ptr + at + 1, mask=ok, other=0.0) * tl.exp(s[1])
        gs2 = tl.load(g_scales_ptr + at + 2, mask=ok, other=0.0) * tl.exp(s[2])
        g_s0 += gs0 * k
        g_s1 += gs1 * k
        g_s2 += gs2 * k
        gq = g_quats_ptr + (b * N + i) * 4
        gW, gX = tl.load(gq, mask=ok, other=0.0), tl.load(gq + 1, mask=ok, other=0.0)
        gY, gZ = tl.load(gq + 2, mask=ok, other=0.0), tl.load(gq + 3, mask=ok, other=0.0)
        aw, ax, ay, az = qf
        # The Hamilton product is linear in its right factor: this is its transpose.
        g_w += aw * gW + ax * gX + ay * gY + az * gZ
        g_x += -ax * gW + aw * gX + az * gY - ay * gZ
        g_y += -ay * gW - az * gX + aw * gY + ax * gZ
        g_z += -az * gW + ay * gX - ax * gY + aw * gZ
        if MESH:
            tri = t * F + f_i
            gm = (gm0, gm1, gm2)
            turned = tl.zeros([BLOCK], tl.float32)
            for a in tl.static_range(3):
                turned += gm[a] * (rot[3 * a] * o[0] + rot[3 * a + 1] * o[1] + rot[3 * a + 2] * o[2])
                for c in tl.static_range(3):
                    tl.atomic_add(g_rot_ptr + tri * 9 + 3 * a + c, k * gm[a] * o[c], mask=ok)
            tl.atomic_add(g_size_ptr + tri, turned + gs0 + gs1 + gs2, mask=ok)
            # ... and linear in its left factor, the frame's quaternion.
            g_frame_quat = g_quat_ptr + tri * 4
            tl.atomic_add(g_frame_quat, bw * gW + bx * gX + by * gY + bz * gZ, mask=ok)
            tl.atomic_add(g_frame_quat + 1, -bx * gW + bw * gX - bz * gY + by * gZ, mask=ok)
            tl.atomic_add(g_frame_quat + 2, -by * gW + bz * gX + bw * gY - bx * gZ, mask=ok)
            tl.atomic_add(g_frame_quat + 3, -bz * gW - by * gX + bx * gY + bw * gZ, mask=ok)
            for j in tl.static_range(3):
                vertex = tl.load(faces_ptr + f_i * 3 + j, mask=ok, other=0)
                weight = tl.load(bary_ptr + i * 3 + j, mask=ok, other=0.0)
                for a in tl.static_range(3):
                    tl.atomic_add(g_verts_ptr + (t * V + vertex) * 3 + a, weight * gm[a], mask=ok)

    values, arg_max, arg_min, big, o_norm, qq, p, u, sigma = _hinge_terms(o, q, s, max_scale, log_max_ratio, max_offset, max_depth)
    g_hinge = tl.load(g_hinge_ptr) / N
    on = (values[0] > 0).to(tl.float32) * w_scale * g_hinge * big
    thin = (values[1] > 0).to(tl.float32) * w_aniso * g_hinge
    g_s0 += tl.where(arg_max == 0, on + thin, 0.0) - tl.where(arg_min == 0, thin, 0.0)
    g_s1 += tl.where(arg_max == 1, on + thin, 0.0) - tl.where(arg_min == 1, thin, 0.0)
    g_s2 += tl.where(arg_max == 2, on + thin, 0.0) - tl.where(arg_min == 2, thin, 0.0)
    far = (values[2] > 0).to(tl.float32) * w_offset * g_hinge / tl.where(o_norm > 0, o_norm, 1.0)
    g_o0 += far * o[0]
    g_o1 += far * o[1]
    g_o2 += far * o[2]
    deep = (values[3] > 0).to(tl.float32) * w_depth * g_hinge
    g_o2 += deep * tl.where(o[2] > 0, 1.0, tl.where(o[2] < 0, -1.0, 0.0))
    g_s0 += deep * u[0] * u[0] / sigma
    g_s1 += deep * u[1] * u[1] / sigma
    g_s2 += deep * u[2] * u[2] / sigma
    # Through n = p(q) / |q|^2 (u_j = n_j exp(s_j)).
    g_n0 = deep * u[0] * tl.exp(s[0]) / sigma
    g_n1 = deep * u[1] * tl.exp(s[1]) / sigma
    g_n2 = deep * u[2] * tl.exp(s[2]) / sigma
    w, x, y, z = q
    radial = 2 * (p[0] * g_n0 + p[1] * g_n1 + p[2] * g_n2) / (qq * qq)
    g_qw = (-2 * y * g_n0 + 2 * x * g_n1 + 2 * w * g_n2) / qq - radial * w
    g_qx = (2 * z * g_n0 + 2 * w * g_n1 - 2 * x * g_n2) / qq - radial * x
    g_qy = (-2 * w * g_n0 + 2 * z * g_n1 - 2 * y * g_n2) / qq - radial * y
    g_qz = (2 * x * g_n0 + 2 * y * g_n1 + 2 * z * g_n2) / qq - radial * z
    # Through q / max(|q|, eps).
    norm = tl.sqrt(qq)
    inv = 1.0 / tl.maximum(norm, 1e-12)
    along = (w * g_w + x * g_x + y * g_y + z * g_z) * inv * inv * (norm > 1e-12).to(tl.float32)
    g_qw += (g_w - w * along) * inv
    g_qx += (g_x - x * along) * inv
    g_qy += (g_y - y * along) * inv
    g_qz += (g_z - z * along) * inv

    row = grad_ptr + i * D
    tl.store(row, g_o0, mask=ok)
    tl.store(row + 1, g_o1, mask=ok)
    tl.store(row + 2, g_o2, mask=ok)
    tl.store(row + 3, g_qw, mask=ok)
    tl.store(row + 4, g_qx, mask=ok)
    tl.store(row + 5, g_qy, mask=ok)
    tl.store(row + 6, g_qz, mask=ok)
    tl.store(row + 7, g_s0, mask=ok)
    tl.store(row + 8, g_s1, mask=ok)
    tl.store(row + 9, g_s2, mask=ok)
    alpha = tl.sigmoid(tl.load(packed_ptr + i * D + 10, mask=ok, other=0.0))
    tl.store(row + 10, tl.load(g_opacity_ptr + i, mask=ok, other=0.0) * alpha * (1 - alpha), mask=ok)
    for channel in tl.static_range(3):
        sh = tl.load(packed_ptr + i * D + 11 + channel, mask=ok, other=0.0)
        g_colour = tl.load(g_colour_ptr + i * 3 + channel, mask=ok, other=0.0)
        tl.store(row + 11 + channel, tl.where(0.5 + C0 * sh >= 0.0, C0 * g_colour, 0.0), mask=ok)


def _hinge_args(anti_spike: AntiSpike, surface: SurfaceHinge) -> tuple[float, ...]:
    return (
        anti_spike.scale_weight, anti_spike.max_scale, anti_spike.aniso_weight, math.log(anti_spike.max_ratio),
        anti_spike.offset_weight, anti_spike.max_offset, surface.weight, surface.max_depth,
    )


def _forward(
    packed: torch.Tensor, frame: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor, frames: TriangleFrames,
    face_idx: torch.Tensor, bary: torch.Tensor, hinges: tuple[float, ...],
) -> tuple[torch.Tensor, ...]:
    """Means, quats, scales [B, N, ...], opacities [N], colours [N, 3] and hinge sums per block."""
    n, width = packed.shape
    batch, device = frame.shape[0], packed.device
    blocks = triton.cdiv(n, _BLOCK)
    out = (
        torch.empty(batch, n, 3, device=device), torch.empty(batch, n, 4, device=device), torch.empty(batch, n, 3, device=device),
        torch.empty(n, device=device), torch.empty(n, 3, device=device), torch.empty(blocks, device=device),
    )
    _place_forward[(blocks, batch)](
        packed, frame, vertices, faces, *frames, face_idx, bary, *out, n, vertices.shape[1], frames.size.shape[1], *hinges,
        D=width, C0=SH_C0, BLOCK=_BLOCK,
    )
    return out


def _backward(
    packed: torch.Tensor, frame: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor, frames: TriangleFrames,
    face_idx: torch.Tensor, bary: torch.Tensor, grads: tuple[torch.Tensor, ...], hinges: tuple[float, ...], mesh: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, TriangleFrames | None]:
    """The packed gradient [N, D] from the outputs' gradients (means ... hinge, contiguous);
    with ``mesh`` also those of ``vertices`` and ``frames`` (else None)."""
    n, width = packed.shape
    grad = torch.empty_like(packed)
    g_verts = torch.zeros_like(vertices) if mesh else None
    g_frames = TriangleFrames(*(torch.zeros_like(t) for t in frames)) if mesh else None
    unused = (grad,) * 4  # pointers the kernel does not read without MESH
    _place_backward[(triton.cdiv(n, _BLOCK),)](
        packed, frame, faces, *frames, face_idx, bary, *grads, grad, *((g_verts, *g_frames) if mesh else unused),
        n, vertices.shape[1], frames.size.shape[1], frame.shape[0], *hinges, D=width, C0=SH_C0, BLOCK=_BLOCK, MESH=mesh,
    )
    return grad, g_verts, g_frames


class _Placement(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        packed: torch.Tensor,
        frame: torch.Tensor,
        vertices: torch.Tensor,
        faces: torch.Tensor,
        rot: torch.Tensor,
        quat: torch.Tensor,
        size: torch.Tensor,
        face_idx: torch.Tensor,
        bary: torch.Tensor,
        hinges: tuple[float, ...],
    ) -> tuple[torch.Tensor, ...]:
        # The frame's fields come one by one: autograd follows tensors, not tuples of them.
        *splats, partials = _forward(packed, frame, vertices, faces, TriangleFrames(rot, quat, size), face_idx, bary, hinges)
        ctx.save_for_backward(packed, frame, vertices, faces, rot, quat, size, face_idx, bary)
        ctx.hinges = hinges
        return (*splats, partials.sum() / packed.shape[0])

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        packed, frame, vertices, faces, rot, quat, size, face_idx, bary = ctx.saved_tensors
        mesh = any(ctx.needs_input_grad[i] for i in (2, 4, 5, 6))
        grad, g_verts, g_frames = _backward(
            packed, frame, vertices, faces, TriangleFrames(rot, quat, size), face_idx, bary, tuple(g.contiguous() for g in grads), ctx.hinges, mesh
        )
        return grad, None, g_verts, None, *(g_frames or (None, None, None)), None, None, None


def first_launches(device: torch.device, mesh: bool = False) -> list[Callable[[], None]]:
    """One launch of each kernel on one Gaussian on one triangle: the first launch compiles a
    kernel (sizes are not specialized on, so these serve every layout). With ``mesh``, the
    backward that also gives the mesh's gradients (FLAME fine-tuned) is compiled too."""
    layout = PackLayout(1)
    packed = torch.zeros(1, layout.width, device=device)
    packed[:, layout.columns("rotation").start] = 1.0  # the unit quaternion
    frame, face_idx = torch.zeros(1, dtype=torch.int64, device=device), torch.zeros(1, dtype=torch.int64, device=device)
    vertices, faces, bary = torch.zeros(1, 3, 3, device=device), torch.arange(3, device=device)[None], torch.full((1, 3), 1 / 3, device=device)
    frames = TriangleFrames(torch.eye(3, device=device).expand(1, 1, 3, 3).contiguous(), torch.tensor([[[1.0, 0, 0, 0]]], device=device), torch.ones(1, 1, device=device))
    hinges = _hinge_args(AntiSpike(), SurfaceHinge())
    grads = (torch.zeros(1, 1, 3, device=device), torch.zeros(1, 1, 4, device=device), torch.zeros(1, 1, 3, device=device), torch.zeros(1, device=device), torch.zeros(1, 3, device=device), torch.ones((), device=device))
    return [lambda: _forward(packed, frame, vertices, faces, frames, face_idx, bary, hinges)] + [
        lambda with_mesh=with_mesh: _backward(packed, frame, vertices, faces, frames, face_idx, bary, grads, hinges, with_mesh)
        for with_mesh in ((False, True) if mesh else (False,))
    ]


def place_with_hinges(
    packed: torch.Tensor,
    layout: PackLayout,
    frame: torch.Tensor,
    vertices: torch.Tensor,
    faces: torch.Tensor,
    frames: TriangleFrames,
    face_idx: torch.Tensor,
    bary: torch.Tensor,
    anti_spike: AntiSpike,
    surface: SurfaceHinge,
) -> tuple[Splats, torch.Tensor]:
    """World Gaussians at frames [B] and the weighted hinge loss (scalar), on CUDA.

    Args:
        packed: [N, D] local parameters in ``layout`` (SH degree 0 only).
        frame: [B] int64 indices into ``vertices`` [T, V, 3] (metres) and ``frames``
            (fields [T, F, ...]): precomputed for every training frame, or posed for this
            step's (T = B, ``frame`` = 0 .. B-1) when FLAME is fine-tuned.
        faces: [F, 3]; face_idx: [N]; bary: [N, 3] the binding.
    Returns:
        Splats with means, quats, scales [B, N, ...] and opacities [N], colours [N, 3]; the
        anti-spike plus depth hinges (``spike_loss`` + ``depth_loss``). The gradient reaches
        ``packed``, and ``vertices`` and ``frames`` where they require it.
    """
    if layout.sh_coeffs != 1:
        raise ValueError("the fused placement handles SH degree 0 only")
    means, quats, scales, opacities, colours, hinge = _Placement.apply(
        packed.contiguous(), frame, vertices.contiguous(), faces.contiguous(), *(t.contiguous() for t in frames),
        face_idx.contiguous(), bary.contiguous(), _hinge_args(anti_spike, surface),
    )
    return Splats(means, quats, scales, opacities, colours), hinge
