"""The built-in procedural head: mesh, rig, bases, UVs, landmarks, masks; and the mesh preview renderer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.head.builtin import BLINK_CLOSED, EXPRESSION_NAMES, MIRROR_PAIRS, SPEC, build_builtin_head
from backend.head.builtin.features import FaceShape
from backend.head.builtin.mesh import build_mesh
from backend.head.model import FLAME_SHAPE_SPACE, HeadModel, HeadModelData
from backend.render.mesh_preview import intrinsics, look_at, project, rasterize, render_mesh

MIRROR = np.array([-1.0, 1.0, 1.0])
MIDLINE = (8, 27, 28, 29, 30, 33, 51, 57, 62, 66)


@pytest.fixture(scope="module")
def head() -> HeadModelData:
    return build_builtin_head()


@pytest.fixture(scope="module")
def model(head: HeadModelData) -> HeadModel:
    return HeadModel(head)


def _forward(model: HeadModel, **fields: float | dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pose one frame; ``expr`` is a {name: value} dict, other keys are (field, index) -> value."""
    p = model.neutral_params()
    for name, value in fields.pop("expr", {}).items():
        p.expr[0, model.expr_names.index(name)] = value
    for (field, index), value in fields.pop("pose", {}).items():
        getattr(p, field)[0, index] = value
    with torch.no_grad():
        out = model(p)
    return out.vertices[0].numpy(), out.joints[0].numpy(), out.landmarks[0].numpy()


def _face_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    t = v[f]
    return np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])


def _skin_faces(head: HeadModelData) -> np.ndarray:
    skin = head.part_masks["skin"]
    return head.faces[skin[head.faces].all(axis=1) & ~head.part_masks["mouth_interior"][head.faces].any(axis=1)]


# -- mesh -----------------------------------------------------------------------------------


def test_sizes_and_name(head: HeadModelData, model: HeadModel) -> None:
    head.validate()
    assert head.name == "builtin-v1"
    assert 4000 <= head.num_vertices <= 10000
    ext = head.v_template.max(0) - head.v_template.min(0)
    assert 0.14 < ext[0] < 0.20  # ears included
    chin = _forward(model)[2][8]
    assert 0.21 < head.v_template[:, 1].max() - chin[1] < 0.25
    cranium = head.v_template[head.part_masks["scalp"]]
    assert 0.14 < cranium[:, 0].max() - cranium[:, 0].min() < 0.16
    assert np.all(np.isfinite(head.v_template))


def test_no_degenerate_faces(head: HeadModelData) -> None:
    area = 0.5 * np.linalg.norm(_face_normals(head.v_template.astype(np.float64), head.faces), axis=1)
    assert area.min() > 1e-9  # m^2; the smallest real triangles are ~1e-7
    assert (
        np.all(head.faces[:, 0] != head.faces[:, 1])
        and np.all(head.faces[:, 1] != head.faces[:, 2])
        and np.all(head.faces[:, 2] != head.faces[:, 0])
    )


def test_faces_point_outward(head: HeadModelData) -> None:
    v = head.v_template.astype(np.float64)
    f = _skin_faces(head)
    n = _face_normals(v, f)
    centre = np.array(SPEC.centre)
    away = (n * (v[f].mean(1) - centre)).sum(1) > 0
    assert away.mean() > 0.995
    # Skin closed over the neck opening by a fan to its centre: positive signed volume (litres).
    bottom = v[f].reshape(-1, 3)[:, 1].min()
    origin = v[np.abs(v[:, 1] - bottom) < 0.02].mean(0)
    t = v[f] - origin
    volume = np.einsum("ij,ij->i", t[:, 0], np.cross(t[:, 1], t[:, 2])).sum() / 6
    assert 0.003 < volume < 0.008
    for side in ("left_eyeball", "right_eyeball"):
        idx = np.nonzero(head.part_masks[side])[0]
        ef = head.faces[np.isin(head.faces, idx).all(axis=1)]
        c = v[idx].mean(0)
        assert ((_face_normals(v, ef) * (v[ef].mean(1) - c)).sum(1) > 0).all()


def test_mouth_pocket_faces_the_cavity(head: HeadModelData) -> None:
    v = head.v_template.astype(np.float64)
    pocket = head.part_masks["mouth_interior"]
    f = head.faces[pocket[head.faces].any(axis=1)]
    axis_y = v[pocket, 1].mean()
    c = v[f].mean(1)
    towards_axis = np.stack([-c[:, 0], axis_y - c[:, 1], np.zeros(len(c))], axis=1)
    assert ((_face_normals(v, f) * towards_axis).sum(1) > 0).mean() > 0.9


def test_generation_is_deterministic(head: HeadModelData) -> None:
    again = build_mesh(SPEC, FaceShape(SPEC))
    assert np.array_equal(again.vertices.astype(np.float32), head.v_template)
    assert np.array_equal(again.faces, head.faces)


# -- rig ------------------------------------------------------------------------------------


def test_joint_layout(head: HeadModelData) -> None:
    assert head.parents.tolist() == [-1, 0, 1, 1, 1]
    assert np.all(head.j_regressor >= 0)
    assert np.allclose(head.j_regressor.sum(1), 1.0, atol=1e-5)
    joints = head.j_regressor @ head.v_template
    root, neck, jaw, left, right = joints
    for side, j in (("left_eyeball", left), ("right_eyeball", right)):
        assert np.allclose(j, head.v_template[head.part_masks[side]].mean(0), atol=1e-6)
    assert left[0] > 0.02 and right[0] < -0.02
    assert abs(jaw[0]) < 1e-6 and jaw[1] < left[1] and jaw[2] < left[2] - 0.04  # behind and below the eyes
    assert root[1] < neck[1] < jaw[1]


def test_skinning_weights(head: HeadModelData) -> None:
    w = head.weights
    assert np.all(w >= -1e-6)
    assert np.allclose(w.sum(1), 1.0, atol=1e-5)
    assert np.allclose(w[head.part_masks["left_eyeball"], 3], 1.0)
    assert np.allclose(w[head.part_masks["right_eyeball"], 4], 1.0)
    scalp = head.part_masks["scalp"]
    assert np.all(w[scalp, 2] < 1e-6)  # the jaw never moves the hair
    # A sharp split between the lips: upper lip rows stay, lower lip rows follow the jaw.
    assert np.median(w[head.part_masks["upper_lip"], 2]) < 0.05
    assert np.median(w[head.part_masks["lower_lip"], 2]) > 0.95
    bottom = head.v_template[:, 1] < head.v_template[:, 1].min() + 0.01
    assert np.all(w[bottom, 0] > 0.99)


def test_jaw_opens_mouth(model: HeadModel) -> None:
    _, _, closed = _forward(model)
    _, _, opened = _forward(model, pose={("jaw_pose", 0): 0.3})
    inner = np.linalg.norm(opened[62] - opened[66]) - np.linalg.norm(closed[62] - closed[66])
    outer = np.linalg.norm(opened[51] - opened[57]) - np.linalg.norm(closed[51] - closed[57])
    assert np.linalg.norm(closed[62] - closed[66]) < 1e-4
    assert inner > 0.015 and outer > 0.012
    assert np.allclose(opened[:17][[0, 16]], closed[:17][[0, 16]], atol=0.004)  # top of the contour near the hinge


def test_eye_rotation_is_rigid(model: HeadModel, head: HeadModelData) -> None:
    verts0, joints0, _ = _forward(model)
    verts1, joints1, _ = _forward(model, pose={("eyes_pose", 1): 0.3})
    idx = np.nonzero(head.part_masks["left_eyeball"])[0]
    centre0, centre1 = joints0[3], joints1[3]
    assert np.allclose(centre0, centre1, atol=1e-6)
    assert np.allclose(verts1[idx].mean(0), centre1, atol=1e-6)
    d0 = np.linalg.norm(verts0[idx] - centre0, axis=1)
    d1 = np.linalg.norm(verts1[idx] - centre1, axis=1)
    assert np.allclose(d0, d1, atol=1e-6)
    pupil = idx[np.argmax(verts0[idx, 2])]
    a = (verts0[pupil] - centre0) / np.linalg.norm(verts0[pupil] - centre0)
    b = (verts1[pupil] - centre1) / np.linalg.norm(verts1[pupil] - centre1)
    assert np.degrees(np.arccos(np.clip(a @ b, -1, 1))) == pytest.approx(np.degrees(0.3), abs=0.5)
    assert b[0] > a[0]  # positive yaw turns the gaze toward +x
    right = head.part_masks["right_eyeball"]
    assert np.allclose(verts0[right], verts1[right], atol=1e-7)


# -- bases ----------------------------------------------------------------------------------


def _cosines(cols: np.ndarray) -> np.ndarray:
    flat = cols.reshape(-1, cols.shape[-1]).astype(np.float64)
    g = flat.T @ flat
    d = np.sqrt(np.diag(g))
    return g / d[:, None] / d[None]


def test_shapedirs_layout_and_orthogonality(head: HeadModelData) -> None:
    assert head.shapedirs.shape == (head.num_vertices, 3, FLAME_SHAPE_SPACE + 100)
    assert head.n_shape == 100 and head.n_expr == 50
    identity = head.shapedirs[..., :FLAME_SHAPE_SPACE]
    expression = head.shapedirs[..., FLAME_SHAPE_SPACE:]
    for cols in (identity, expression):
        assert np.linalg.norm(cols, axis=1).max(0).min() > 5e-6  # every column is a real direction
        c = _cosines(cols)
        assert np.abs(c - np.eye(len(c))).max() < 1e-4
    peak = np.linalg.norm(identity, axis=1).max(0)
    assert 0.005 < peak[0] < 0.012 and peak[-1] < peak[0]


def test_eyeballs_rigid_under_bases(head: HeadModelData) -> None:
    for side in ("left_eyeball", "right_eyeball"):
        eye = head.shapedirs[head.part_masks[side]]
        identity = eye[..., :FLAME_SHAPE_SPACE]
        assert np.abs(identity - identity[:1]).max() < 1e-7  # translation only
        assert np.abs(eye[..., FLAME_SHAPE_SPACE:]).max() == 0.0


def test_expression_names(head: HeadModelData) -> None:
    assert head.expr_names == EXPRESSION_NAMES
    assert len(head.expr_names) >= 20 and len(head.expr_names) <= head.n_expr
    assert head.expr_names[:6] == ("brow_raise_L", "brow_raise_R", "brow_lower_L", "brow_lower_R", "blink_L", "blink_R")
    for name in ("smile_L", "frown_R", "pucker", "funnel", "cheek_puff_L", "jaw_clench"):
        assert name in head.expr_names


def test_blink_closes_one_eye(model: HeadModel) -> None:
    _, _, open_ = _forward(model)
    _, _, shut = _forward(model, expr={"blink_L": BLINK_CLOSED})
    for up, down in ((43, 47), (44, 46)):  # left eye
        assert np.linalg.norm(open_[up] - open_[down]) > 0.005
        assert np.linalg.norm(shut[up] - shut[down]) < 3e-4
    assert np.allclose(shut[36:42], open_[36:42], atol=1e-7)  # right eye untouched


def test_left_units_stay_left(model: HeadModel, head: HeadModelData) -> None:
    rest, _, _ = _forward(model)
    for name in ("brow_raise_L", "smile_L", "cheek_puff_L", "blink_L"):
        moved, _, _ = _forward(model, expr={name: 2.0})
        d = np.linalg.norm(moved - rest, axis=1)
        assert d.max() > 0.002, name
        left = rest[:, 0] > 0.005
        assert d[left].sum() > 5 * d[rest[:, 0] < -0.005].sum(), name


def test_mouth_units_move_the_mouth_as_named(model: HeadModel) -> None:
    rest = _forward(model)[2]
    smile = _forward(model, expr={"smile_L": 2.0, "smile_R": 2.0})[2]
    assert smile[48, 1] - rest[48, 1] > 0.003 and smile[54, 1] - rest[54, 1] > 0.003
    frown = _forward(model, expr={"frown_L": 2.0, "frown_R": 2.0})[2]
    assert frown[48, 1] - rest[48, 1] < -0.003 and frown[54, 1] - rest[54, 1] < -0.003
    pucker = _forward(model, expr={"pucker": 2.0})[2]
    assert pucker[62, 2] - rest[62, 2] > 0.005
    left = _forward(model, expr={"mouth_left": 2.0})[2]
    right = _forward(model, expr={"mouth_right": 2.0})[2]
    assert left[62, 0] - rest[62, 0] > 0.002 and right[62, 0] - rest[62, 0] < -0.0005


# -- UVs ------------------------------------------------------------------------------------


def test_uv_layout_has_no_overlaps(head: HeadModelData) -> None:
    uv = head.uv_coords.astype(np.float64)
    assert uv.min() >= 0.0 and uv.max() <= 1.0
    tri = uv[head.uv_faces]
    area = 0.5 * (
        (tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1]) - (tri[:, 2, 0] - tri[:, 0, 0]) * (tri[:, 1, 1] - tri[:, 0, 1])
    )
    assert np.abs(area).min() > 0
    # Rasterise every UV triangle on a fine grid: no texel centre may be strictly inside two.
    res = 1024
    cover = np.zeros(res * res, np.int64)
    px = tri * res
    lo = np.floor(px.min(1) - 0.5).astype(int) + 1
    hi = np.floor(px.max(1) - 0.5).astype(int)
    span = np.clip((hi - lo + 1).max(1), 1, None)
    for s in np.unique(span):
        ids = np.nonzero(span == s)[0]
        oy, ox = np.mgrid[0:s, 0:s]
        cx = lo[ids, 0, None] + ox.ravel()[None] + 0.5
        cy = lo[ids, 1, None] + oy.ravel()[None] + 0.5
        t = px[ids]
        sign = np.sign(area[ids])[:, None]
        inside = (cx < res) & (cy < res)
        for k in range(3):
            a, b = t[:, k], t[:, (k + 1) % 3]
            inside &= ((b[:, 0:1] - a[:, 0:1]) * (cy - a[:, 1:2]) - (b[:, 1:2] - a[:, 1:2]) * (cx - a[:, 0:1])) * sign > 1e-9
        cover += np.bincount(cy[inside].astype(int) * res + cx[inside].astype(int), minlength=res * res)
    assert cover.max() == 1
    assert (cover > 0).mean() > 0.5  # the atlas is well used


def test_uv_islands_do_not_fold(head: HeadModelData) -> None:
    tri = head.uv_coords[head.uv_faces].astype(np.float64)
    area = (tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1]) - (tri[:, 2, 0] - tri[:, 0, 0]) * (tri[:, 1, 1] - tri[:, 0, 1])
    skin = head.part_masks["skin"][head.faces].all(1) & ~head.part_masks["mouth_interior"][head.faces].any(1)
    assert (np.sign(area[skin]) == np.sign(area[skin][0])).all()


# -- landmarks and masks -----------------------------------------------------------------------


def test_landmarks_on_the_skin_and_symmetric(head: HeadModelData, model: HeadModel) -> None:
    assert np.all(head.lmk_bary >= -1e-6) and np.allclose(head.lmk_bary.sum(1), 1.0, atol=1e-5)
    assert head.part_masks["skin"][head.faces[head.lmk_faces]].all()
    lm = _forward(model)[2]
    for left, right in MIRROR_PAIRS:
        assert np.allclose(lm[left], lm[right] * MIRROR, atol=2e-4), (left, right)
        assert lm[left, 0] > 0
    assert np.abs(lm[list(MIDLINE), 0]).max() < 1e-6
    # Rough anatomy: brows above eyes above nose tip above mouth above chin.
    assert lm[19, 1] > lm[37, 1] > lm[30, 1] > lm[51, 1] > lm[57, 1] > lm[8, 1]
    assert lm[30, 2] == lm[:, 2].max()  # the nose tip is the most forward landmark


def test_part_masks(head: HeadModelData) -> None:
    m = head.part_masks
    for name in ("left_eyeball", "right_eyeball", "scalp", "brows", "upper_lip", "lower_lip", "mouth_interior", "nose", "ears", "neck"):
        assert m[name].shape == (head.num_vertices,) and m[name].dtype == bool and m[name].sum() > 20, name
    v = head.v_template
    assert not (m["scalp"] & (m["brows"] | m["upper_lip"] | m["nose"] | m["left_eyeball"])).any()
    assert v[m["scalp"], 1].mean() > v[m["brows"], 1].mean() > v[m["nose"], 1].mean() > v[m["upper_lip"], 1].mean()
    assert np.abs(v[m["ears"], 0]).min() > 0.05
    assert v[m["neck"], 1].mean() < v[m["lower_lip"], 1].mean()


# -- mesh preview ------------------------------------------------------------------------------


def test_preview_zbuffer_keeps_the_nearest_triangle() -> None:
    verts = np.array([[-1, -1, 0], [1, -1, 0], [0, 1, 0], [-1, -1, 0.5], [1, -1, 0.5], [0, 1, 0.5]], float)
    faces = np.array([[0, 1, 2], [3, 4, 5]])
    cam = look_at(np.array([0.0, 0.0, 5.0]), np.zeros(3))
    colors = np.array([[1, 0, 0]] * 3 + [[0, 0, 1]] * 3, float)
    img = render_mesh(verts, faces, intrinsics(40, 64, 64), cam, 64, 64, vertex_colors=colors, ambient=1.0)
    centre = img[32, 32]
    assert centre[2] > 200 and centre[0] < 50  # the triangle at z = 0.5 is nearer the camera
    assert (img[0, 0] == 255).all()


def test_preview_renders_the_head(head: HeadModelData) -> None:
    k = intrinsics(25, 96, 120)
    cam = look_at(np.array([0.0, -0.02, 0.6]), np.array([0.0, -0.02, 0.0]))
    face_idx, _ = rasterize(head.v_template, head.faces, k, cam, 96, 120)
    assert 0.2 < (face_idx >= 0).mean() < 0.9
    nose = project(head.v_template[[np.argmax(head.v_template[:, 2])]], k, cam)[0]
    assert abs(nose[0] - 48) < 3
    pts = project(head.v_template[:3], k, cam)[:, :2]
    img = render_mesh(head.v_template, head.faces, k, cam, 96, 120, wireframe=(0, 0, 0), points=pts)
    assert img.shape == (120, 96, 3) and img.dtype == np.uint8
