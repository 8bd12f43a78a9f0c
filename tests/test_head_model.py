"""The FLAME-format head model interface, FLAME file layout and smplx agreement."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import smplx
import torch

from backend.head.flame_files import read_flame, write_flame
from backend.head.model import HeadModel
from backend.head.params import FlameParams
from backend.head.registry import FLAME_ENV, load_head_model
from backend.wire.errors import HeadModelError, InputError
from tests.helpers import random_params


def test_shapes(head: HeadModel, rng: torch.Generator) -> None:
    out = head(random_params(head, 3, rng))
    v = head.num_vertices
    assert out.vertices.shape == (3, v, 3)
    assert out.joints.shape == (3, 5, 3)
    assert out.landmarks.shape == (3, 68, 3)
    assert 4000 <= v <= 10000
    assert head.n_shape >= 50 and head.n_expr >= 50


def test_builtin_file_loads_through_smplx_and_agrees(head: HeadModel, rng: torch.Generator, tmp_path) -> None:
    """The built-in head written in FLAME's layout gives the same vertices through smplx.FLAME."""
    folder = write_flame(head.data, tmp_path / "flame")
    ref = smplx.FLAME(str(folder), gender="neutral", num_betas=head.n_shape, num_expression_coeffs=head.n_expr, batch_size=4)
    p = random_params(head, 4, rng)
    ours = head(p).vertices
    with torch.no_grad():
        theirs = ref(
            betas=p.shape.expand(4, -1), expression=p.expr, global_orient=p.rotation, neck_pose=p.neck_pose,
            jaw_pose=p.jaw_pose, leye_pose=p.eyes_pose[:, :3], reye_pose=p.eyes_pose[:, 3:], transl=p.translation,
        ).vertices
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_flame_folder_round_trip(head: HeadModel, tmp_path) -> None:
    folder = write_flame(head.data, tmp_path / "flame")
    again = read_flame(folder, n_shape=head.n_shape, n_expr=head.n_expr)
    for key in ("v_template", "faces", "weights", "j_regressor", "uv_coords", "uv_faces", "lmk_faces", "lmk_bary"):
        np.testing.assert_allclose(getattr(again, key), getattr(head.data, key), atol=1e-6, err_msg=key)
    assert again.expr_names == head.data.expr_names
    assert set(again.part_masks) == set(head.data.part_masks)


def test_chumpy_pickles_are_read_without_chumpy(head: HeadModel, tmp_path) -> None:
    """FLAME 2020 stores arrays as chumpy objects; the reader takes the array each one holds."""
    folder = write_flame(head.data, tmp_path / "flame")
    model = folder / "FLAME_NEUTRAL.pkl"
    with open(model, "rb") as fh:
        data = pickle.load(fh)

    class Ch:  # pickled under chumpy's module name below
        def __init__(self, x: np.ndarray) -> None:
            self.x = x

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    import sys
    import types

    fake = types.ModuleType("chumpy.ch")
    fake.Ch = Ch  # type: ignore[attr-defined]
    sys.modules["chumpy"] = types.ModuleType("chumpy")
    sys.modules["chumpy.ch"] = fake
    try:
        data["shapedirs"] = Ch(data["shapedirs"])
        data["v_template"] = Ch(data["v_template"])
        with open(model, "wb") as fh:
            pickle.dump(data, fh, protocol=2)
    finally:
        del sys.modules["chumpy.ch"], sys.modules["chumpy"]
    again = read_flame(folder, n_shape=head.n_shape, n_expr=head.n_expr)
    np.testing.assert_allclose(again.shapedirs, head.data.shapedirs, atol=1e-6)


def test_rigid_global_motion_moves_head_rigidly(head: HeadModel, rng: torch.Generator) -> None:
    p = random_params(head, 1, rng)
    base = head(p).vertices[0]
    q = p.detach_clone()
    q.rotation = torch.zeros(1, 3)
    q.translation = torch.zeros(1, 3)
    canon = head(q).vertices[0]
    # Same shape/expr/joints: the posed head is a rotation + translation of the unposed one.
    a = canon - canon.mean(0)
    b = base - base.mean(0)
    u, _, vt = torch.linalg.svd(a.T.double() @ b.double())
    r = (u @ vt).float()
    assert torch.allclose(a @ r, b, atol=1e-5)


def test_missing_flame_path_names_it_and_says_where_to_get_flame(tmp_path, monkeypatch) -> None:
    with pytest.raises(HeadModelError, match="does not exist.*flame.is.tue.mpg.de"):
        load_head_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HeadModelError, match="no FLAME model file"):
        load_head_model(tmp_path / "empty")
    monkeypatch.setenv(FLAME_ENV, str(tmp_path / "from_env"))
    with pytest.raises(HeadModelError, match="from_env"):
        load_head_model(None)


def test_malformed_flame_files(head: HeadModel, tmp_path) -> None:
    folder = write_flame(head.data, tmp_path / "flame")
    model = folder / "FLAME_NEUTRAL.pkl"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(HeadModelError, match="FLAME_NEUTRAL.pkl: not a readable FLAME pickle"):
        read_flame(folder)
    folder = write_flame(head.data, tmp_path / "flame2")
    (folder / "flame_static_embedding.pkl").unlink()
    with pytest.raises(HeadModelError, match="flame_static_embedding.pkl"):
        read_flame(folder)
    folder = write_flame(head.data, tmp_path / "flame3")
    with open(folder / "FLAME_NEUTRAL.pkl", "wb") as fh:
        pickle.dump({"v_template": np.zeros((10, 3))}, fh)
    with pytest.raises(HeadModelError, match="missing 'f'"):
        read_flame(folder)


def test_parameter_validation(head: HeadModel) -> None:
    p = head.neutral_params(2)
    p.jaw_pose = torch.zeros(2, 4)
    with pytest.raises(InputError, match="jaw_pose"):
        head(p)
    p = head.neutral_params(2)
    p.expr[0, 3] = float("nan")
    with pytest.raises(InputError, match="'expr' contains NaN"):
        head(p)
    p = head.neutral_params(2)
    p.expr = torch.ones(2, head.n_expr + 1)
    with pytest.raises(InputError, match="non-zero ones past the model's"):
        head(p)
    # Shorter or zero-padded coefficient vectors (other tools' files) are accepted losslessly.
    p = head.neutral_params(2)
    short = head.neutral_params(2)
    short.expr = p.expr[:, :10]
    short.shape = torch.zeros(head.n_shape + 5)
    assert torch.equal(head(short).vertices, head(p).vertices)


def test_flame_param_file_round_trip_and_errors(head: HeadModel, rng: torch.Generator, tmp_path) -> None:
    p = random_params(head, 5, rng)
    p.save(tmp_path / "p.npz")
    q = FlameParams.load(tmp_path / "p.npz")
    for name in ("shape", "expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "translation"):
        assert torch.equal(getattr(p, name), getattr(q, name)), name
    np.savez(tmp_path / "bad.npz", expr=np.zeros((5, 10)), jaw_pose=np.zeros((4, 3)))
    with pytest.raises(InputError, match="'jaw_pose' has shape \\[4, 3\\]"):
        FlameParams.load(tmp_path / "bad.npz")
    (tmp_path / "trunc.npz").write_bytes((tmp_path / "p.npz").read_bytes()[:100])
    with pytest.raises(InputError, match="not a readable .npz"):
        FlameParams.load(tmp_path / "trunc.npz")


@pytest.mark.parametrize("batched_template", [False, True])
def test_skinning_matches_smplx_lbs(head: HeadModel, batched_template: bool) -> None:
    from smplx.lbs import lbs

    g = torch.Generator().manual_seed(3)
    b = 3
    coeffs = torch.randn(b, head.n_shape + head.n_expr, generator=g)
    pose = 0.4 * torch.randn(b, 3 * len(head.joint_parents), generator=g)
    template = head.v_template + 0.002 * torch.randn(b, *head.v_template.shape, generator=g) if batched_template else head.v_template
    verts, joints = head.skin(coeffs, pose, template)
    ref_verts, ref_joints = lbs(coeffs, pose, template, head.dirs, head.posedirs, head.j_regressor, head.parents, head.weights)
    torch.testing.assert_close(verts, ref_verts, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(joints, ref_joints, atol=1e-6, rtol=1e-5)


def test_a_multi_tile_uv_map_is_packed_and_every_triangle_gets_gaussians(head: HeadModel, tmp_path) -> None:
    """The built-in head written as a FLAME-format model whose UV map spans three tiles
    (u in [0, 1], [1, 2] and [2, 3], as a multi-tile scan head has): loaded, its UVs lie in
    one square with every triangle's area in proportion, and a layout covers the triangles
    the single-tile map covers. Laid out on the raw tiles, two thirds get nothing, with a
    warning."""
    from backend.gaussians.layout import sample_layout

    uv, faces = head.data.uv_coords.astype(np.float64), head.data.uv_faces
    centre_u = uv[faces].mean(axis=1)[:, 0]
    thirds = np.digitize(centre_u, [1 / 3, 2 / 3])  # each triangle's third of the map
    # Copy the vertices once per third, then move each copy into tile 0, 1 or 2.
    tiled_uv = np.concatenate([uv + [k, 0.0] for k in range(3)])
    tiled_faces = faces + thirds[:, None] * len(uv)
    folder = write_flame(head.data, tmp_path / "flame")
    np.savez(folder / "FLAME_texture.npz", vt=tiled_uv.astype(np.float32), ft=tiled_faces)
    loaded = read_flame(folder, n_shape=head.n_shape, n_expr=head.n_expr)
    assert loaded.uv_coords.min() >= 0.0 and loaded.uv_coords.max() <= 1.0

    def areas(u: np.ndarray, f: np.ndarray) -> np.ndarray:
        t = u.astype(np.float64)[f]
        e1, e2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
        return 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])

    ratio = areas(loaded.uv_coords, loaded.uv_faces) / np.maximum(areas(uv, faces), 1e-12)
    big = areas(uv, faces) > 1e-7
    assert np.allclose(ratio[big], ratio[big][0], rtol=1e-3)  # one scale for every tile

    count = 20_000
    one_tile = sample_layout(head.data.uv_coords, head.data.uv_faces, count)
    packed = sample_layout(loaded.uv_coords, loaded.uv_faces, count)
    assert len(np.unique(packed.face_idx)) >= 0.9 * len(np.unique(one_tile.face_idx))
    assert set(thirds[np.unique(packed.face_idx.numpy())]) == {0, 1, 2}
    with pytest.warns(UserWarning, match="outside the \\[0, 1\\] UV square"):
        raw = sample_layout(tiled_uv.astype(np.float32), tiled_faces, count)
    assert set(thirds[np.unique(raw.face_idx.numpy())]) == {0}
