"""Mesh-bound Gaussians: frames, layouts, deformation, avatar files and .ply export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from plyfile import PlyData

from backend.gaussians.avatar import SH_C0, deform
from backend.gaussians.files import export_ply, load_avatar, save_avatar
from backend.gaussians.frames import matrix_to_quat, quat_to_matrix, triangle_frames
from backend.gaussians.layout import fill_missing, sample_layout
from backend.gaussians.surface import surface_avatar
from backend.head.model import HeadModel
from backend.wire.errors import InputError
from tests.helpers import random_params


def grey(f: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.full((f.shape[0], 3), 0.5)


@pytest.fixture(scope="module")
def avatar(head: HeadModel):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(7)
    av = surface_avatar(head, torch.randn(head.n_shape, generator=gen), 5000, grey)
    # Non-trivial local parameters so that rotations and offsets are exercised.
    n = av.count
    av.local.offset = torch.randn(n, 3, generator=gen) * 0.2
    av.local.rotation = torch.randn(n, 4, generator=gen)
    av.local.log_scale = av.local.log_scale + torch.randn(n, 3, generator=gen) * 0.3
    av.local.sh = torch.randn(n, 4, 3, generator=gen)
    return av


def test_triangle_frames_orthonormal_right_handed(head: HeadModel, rng: torch.Generator) -> None:
    verts = head(random_params(head, 2, rng)).vertices
    fr = triangle_frames(verts, head.faces)
    r = fr.rotation
    eye = torch.eye(3).expand_as(r)
    assert torch.allclose(r.transpose(-1, -2) @ r, eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(r), torch.ones(r.shape[:-2]), atol=1e-5)
    tri = verts[:, head.faces]
    area = 0.5 * torch.cross(tri[..., 1, :] - tri[..., 0, :], tri[..., 2, :] - tri[..., 0, :], dim=-1).norm(dim=-1)
    assert torch.allclose(fr.size, torch.sqrt(2 * area), rtol=1e-4, atol=1e-7)


def test_quaternion_conversions_invert_each_other(rng: torch.Generator) -> None:
    q = torch.nn.functional.normalize(torch.randn(2000, 4, generator=rng, dtype=torch.float64), dim=-1)
    q = torch.where(q[:, :1] < 0, -q, q)
    # Include near-180-degree turns, where naive formulas lose precision.
    q[:10, 0] = 1e-4
    q = torch.nn.functional.normalize(q, dim=-1)
    assert torch.allclose(matrix_to_quat(quat_to_matrix(q)), q, atol=1e-9)


def test_layout_is_deterministic_and_exact(head: HeadModel) -> None:
    a = sample_layout(head.data.uv_coords, head.data.uv_faces, 20_000)
    b = sample_layout(head.data.uv_coords, head.data.uv_faces, 20_000)
    assert a.count == 20_000
    assert torch.equal(a.face_idx, b.face_idx) and torch.equal(a.bary, b.bary) and torch.equal(a.texel, b.texel)
    assert bool((a.bary >= 0).all()) and torch.allclose(a.bary.sum(1), torch.ones(a.count))
    # One Gaussian per texel.
    flat = a.texel[:, 0] * a.resolution + a.texel[:, 1]
    assert flat.unique().numel() == a.count
    # The layout covers the whole surface: every large-enough face receives Gaussians.
    assert a.face_idx.unique().numel() > 0.5 * head.num_faces
    with pytest.raises(InputError):
        sample_layout(head.data.uv_coords, head.data.uv_faces, 10)


def test_rigid_head_motion_moves_gaussians_rigidly(head: HeadModel, avatar, rng: torch.Generator) -> None:  # type: ignore[no-untyped-def]
    p = random_params(head, 1, rng)
    p.rotation = torch.zeros(1, 3)
    p.translation = torch.zeros(1, 3)
    base = deform(avatar, head, p)
    axis = torch.tensor([0.3, -0.8, 0.5])
    angle = 0.7
    q = p.detach_clone()
    q.rotation = (axis / axis.norm() * angle)[None]
    q.translation = torch.tensor([[0.02, -0.01, 0.05]])
    moved = deform(avatar, head, q)
    # Global rotation turns about the root joint, then translates.
    root = head(avatar.params_for(p)).joints[0, 0]
    rot = quat_to_matrix(torch.cat([torch.tensor([math.cos(angle / 2)]), torch.sin(torch.tensor(angle / 2)) * axis / axis.norm()]))
    expect = (base.means[0] - root) @ rot.T + root + q.translation[0]
    assert torch.allclose(moved.means[0], expect, atol=1e-5)
    assert torch.allclose(moved.scales, base.scales, rtol=1e-4, atol=1e-7)
    r_base, r_moved = quat_to_matrix(base.quats[0]), quat_to_matrix(moved.quats[0])
    # float32 frames: the few sliver triangles carry ~1e-4 of rounding, the rest a few 1e-6.
    err = (r_moved - rot @ r_base).abs().amax(dim=(-1, -2))
    assert float(err.max()) < 2e-4 and float(err.median()) < 1e-5


def test_gaussians_follow_their_triangle(head: HeadModel, avatar, rng: torch.Generator) -> None:  # type: ignore[no-untyped-def]
    """Zero local offset and scale 0 put a Gaussian on its bound surface point, whatever the pose."""
    p = random_params(head, 3, rng)
    splats = deform(avatar, head, p)
    verts = head(avatar.params_for(p)).vertices
    fr = triangle_frames(verts, head.faces)
    tri = verts[:, head.faces[avatar.binding.face_idx]]
    anchor = (tri * avatar.binding.bary[None, :, :, None]).sum(2)
    k = fr.size[:, avatar.binding.face_idx, None]
    r = fr.rotation[:, avatar.binding.face_idx]
    expect = anchor + k * (r @ avatar.local.offset[None, :, :, None]).squeeze(-1)
    assert torch.allclose(splats.means, expect, atol=1e-6)
    assert torch.allclose(splats.scales, k * avatar.local.log_scale.exp()[None], rtol=1e-5)


def test_batched_deform_equals_per_frame(head: HeadModel, avatar, rng: torch.Generator) -> None:  # type: ignore[no-untyped-def]
    p = random_params(head, 4, rng)
    batched = deform(avatar, head, p)
    for b in range(4):
        single = deform(avatar, head, p.index([b]))
        assert torch.allclose(batched.means[b], single.means[0], atol=1e-6)
        # As rotations (q and -q are the same turn). Batched LBS rounds differently in float32,
        # which the head's few sliver triangles amplify; everywhere else the frames agree to 1e-6.
        err = (quat_to_matrix(batched.quats[b]) - quat_to_matrix(single.quats[0])).abs().amax(dim=(-1, -2))
        assert float(err.max()) < 2e-3 and float(err.median()) < 1e-5


def test_deform_is_differentiable(head: HeadModel, avatar, rng: torch.Generator) -> None:  # type: ignore[no-untyped-def]
    p = random_params(head, 2, rng)
    p.expr.requires_grad_(True)
    local = avatar.local.map(lambda t: t.clone().requires_grad_(True))
    from backend.gaussians.avatar import deform_local

    out = deform_local(head(avatar.params_for(p)).vertices, head.faces, avatar.binding, local)
    (out.means.sum() + out.scales.sum() + out.quats.sum()).backward()
    for name, t in local.tensors().items():
        if name != "sh" and name != "opacity_logit":
            assert t.grad is not None and bool(torch.isfinite(t.grad).all()), name
    assert p.expr.grad is not None and float(p.expr.grad.abs().sum()) > 0


def test_avatar_file_round_trip(avatar, tmp_path) -> None:  # type: ignore[no-untyped-def]
    avatar.meta["note"] = "round trip"
    path = save_avatar(avatar, tmp_path / "a.npz")
    back = load_avatar(path)
    assert back.meta == avatar.meta and back.head_fingerprint == avatar.head_fingerprint
    assert torch.equal(back.binding.face_idx, avatar.binding.face_idx)
    for name, t in avatar.local.tensors().items():
        assert torch.equal(getattr(back.local, name), t), name


def test_bad_avatar_files(avatar, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = save_avatar(avatar, tmp_path / "a.npz")
    (tmp_path / "trunc.npz").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_avatar(tmp_path / "trunc.npz")
    with pytest.raises(InputError, match="not found"):
        load_avatar(tmp_path / "missing.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["offset"] = arrays["offset"][:, :2]
    np.savez(tmp_path / "shape.npz", **arrays)
    with pytest.raises(InputError, match="'offset' has shape"):
        load_avatar(tmp_path / "shape.npz")
    arrays["offset"] = np.full((avatar.count, 3), np.nan, np.float32)
    np.savez(tmp_path / "nan.npz", **arrays)
    with pytest.raises(InputError, match="'offset' contains NaN"):
        load_avatar(tmp_path / "nan.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(InputError, match="not a SpatialAvatar avatar"):
        load_avatar(tmp_path / "other.npz")


def test_ply_export_reads_back(head: HeadModel, avatar, tmp_path) -> None:  # type: ignore[no-untyped-def]
    splats = deform(avatar, head, head.neutral_params(1)).frame(0)
    export_ply(splats, avatar.local.sh, tmp_path / "a.ply")
    ply = PlyData.read(str(tmp_path / "a.ply"))
    v = ply["vertex"]
    names = [p.name for p in v.properties]
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[-8:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert len([n for n in names if n.startswith("f_rest_")]) == 9  # degree 1: 3 coefficients x 3 channels
    xyz = np.stack([v["x"], v["y"], v["z"]], 1)
    np.testing.assert_allclose(xyz, splats.means.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.exp(np.stack([v["scale_0"], v["scale_1"], v["scale_2"]], 1)), splats.scales.numpy(), rtol=1e-4)
    np.testing.assert_allclose(1 / (1 + np.exp(-v["opacity"])), splats.opacities.numpy(), atol=1e-5)
    # f_rest is channel-major: all red coefficients first.
    np.testing.assert_allclose(v["f_rest_0"], avatar.local.sh[:, 1, 0].numpy(), atol=1e-6)
    np.testing.assert_allclose(v["f_rest_3"], avatar.local.sh[:, 1, 1].numpy(), atol=1e-6)
    colour = 0.5 + SH_C0 * v["f_dc_1"]
    np.testing.assert_allclose(colour, 0.5 + SH_C0 * avatar.local.sh[:, 0, 1].numpy(), atol=1e-6)


def test_fill_missing_takes_neighbours(head: HeadModel) -> None:
    binding = sample_layout(head.data.uv_coords, head.data.uv_faces, 5000)
    values = torch.zeros(binding.count, 1)
    known = torch.zeros(binding.count, dtype=torch.bool)
    known[::7] = True
    values[known] = 3.0
    filled = fill_missing(binding, values, known)
    assert torch.equal(filled[known], values[known])
    assert torch.allclose(filled, torch.full_like(filled, 3.0))


def _square_charts(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A triangulation of the unit UV square (float32, as heads store UVs) with a seam at
    u = 0.5 (two charts whose boundary vertices are duplicated) and vertices on a 1/18 grid,
    so many texel centres fall exactly on edges and vertices at the tested resolutions."""
    from scipy.spatial import Delaunay

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(10), np.arange(19), indexing="ij"), -1).reshape(-1, 2) / np.array([18.0, 18.0])
    uvs, faces = [], []
    for left in (0.0, 0.5):
        pts = grid[(rng.random(len(grid)) < 0.5) | (grid[:, 0] % 0.5 == 0) | (grid[:, 1] % 1 == 0)] + [left, 0.0]
        tri = Delaunay(pts).simplices
        faces.append(tri + sum(len(u) for u in uvs))
        uvs.append(pts)
    return np.concatenate(uvs).astype(np.float32), np.concatenate(faces)


@pytest.mark.parametrize("res", [9, 18, 27, 36, 45, 101])
def test_every_texel_of_a_covered_square_lands_once(res: int) -> None:
    """Charts tiling the whole square: every texel centre is in exactly one triangle, also
    those exactly on the seam, on shared edges and on vertices."""
    from backend.gaussians.layout import _rasterize_uv

    for seed in range(3):
        uv, faces = _square_charts(seed)
        texel, face, bary, hidden = _rasterize_uv(uv, faces, res)
        assert hidden.size == 0  # the charts do not overlap
        assert np.array_equal(np.sort(texel), np.arange(res * res)), (seed, res * res - len(np.unique(texel)))
        corners = uv.astype(np.float64)[faces[face]] * res
        centres = np.stack([texel % res + 0.5, texel // res + 0.5], axis=1)
        assert np.allclose(np.einsum("nk,nkd->nd", bary, corners), centres, atol=1e-6)
