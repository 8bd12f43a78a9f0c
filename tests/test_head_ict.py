"""The ICT head (ICT-FaceKit in FLAME's layout): shipped arrays, posing, rig, landmarks, layouts.

Rebuilding from an ICT-FaceKit snapshot runs only when $SPATIALAVATAR_ICT_SNAPSHOT names one
(a checkout or a bare git directory); CI has none.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from backend.head.ict import ARRAYS_FILE, CHECKSUMS_FILE, DATA_DIR, LICENSE_FILE, NAME, load_ict_head
from backend.head.ict.build import array_checksums
from backend.head.model import FLAME_SHAPE_SPACE, HeadModel, HeadModelData
from backend.head.registry import load_head_data

SNAPSHOT_ENV = "SPATIALAVATAR_ICT_SNAPSHOT"


@pytest.fixture(scope="module")
def head() -> HeadModelData:
    return load_ict_head()


@pytest.fixture(scope="module")
def model(head: HeadModelData) -> HeadModel:
    return HeadModel(head)


def _pose(model: HeadModel, expr: dict[str, float] | None = None, **pose: tuple[int, float]) -> tuple[np.ndarray, np.ndarray]:
    """Vertices [V, 3] and landmarks [68, 3] of one frame; ``pose``: field -> (index, angle)."""
    p = model.neutral_params()
    for name, value in (expr or {}).items():
        p.expr[0, model.expr_names.index(name)] = value
    for field, (index, value) in pose.items():
        getattr(p, field)[0, index] = value
    with torch.no_grad():
        out = model(p)
    return out.vertices[0].numpy(), out.landmarks[0].numpy()


def test_shipped_arrays_match_their_checksums() -> None:
    meta = json.loads((DATA_DIR / CHECKSUMS_FILE).read_text())
    with np.load(DATA_DIR / ARRAYS_FILE, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    assert array_checksums(arrays) == meta["arrays"]
    assert "MIT License" in (DATA_DIR / LICENSE_FILE).read_text()
    assert sum(p.stat().st_size for p in DATA_DIR.iterdir()) < 8_000_000


def test_loads_by_name_and_validates(head: HeadModelData) -> None:
    assert load_head_data("ict") is head
    head.validate()
    assert head.name == NAME
    assert (head.n_shape, head.n_expr) == (100, 53)
    assert head.shapedirs.shape == (head.num_vertices, 3, FLAME_SHAPE_SPACE + 53)
    assert not head.shapedirs[..., 100:FLAME_SHAPE_SPACE].any()
    assert head.expr_names[:3] == ("browDownLeft", "browDownRight", "browInnerUpLeft") and {"jawOpen", "mouthSmileLeft", "eyeBlinkRight"} <= set(head.expr_names)
    assert head.uv_coords.min() >= 0.0 and head.uv_coords.max() <= 1.0
    np.testing.assert_allclose(head.weights.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(head.j_regressor.sum(1), 1.0, atol=1e-5)
    assert (head.j_regressor >= 0).all()
    for name in ("left_eyeball", "right_eyeball", "teeth", "mouth", "mouth_interior", "neck", "face", "skin", "scalp", "ears"):
        assert head.part_masks[name].shape == (head.num_vertices,) and head.part_masks[name].any(), name


def test_frame_matches_the_builtin_head(head: HeadModelData) -> None:
    """Metres, +y up, +z forward, centred like the built-in head."""
    v = head.v_template
    builtin = load_head_data("builtin").v_template
    assert abs(v[:, 1].min() - builtin[:, 1].min()) < 0.02 and abs(v[:, 1].max() - builtin[:, 1].max()) < 0.02
    assert abs(v[:, 2].min() - builtin[:, 2].min()) < 0.02 and abs(v[:, 2].max() - builtin[:, 2].max()) < 0.02
    assert abs(float(v[:, 0].mean())) < 1e-3
    left = v[head.part_masks["left_eyeball"]].mean(0)
    right = v[head.part_masks["right_eyeball"]].mean(0)
    assert left[0] > 0.02 and right[0] < -0.02  # the subject's left is +x


def test_scalp_and_ears_are_where_hair_grows_and_ears_stand(model: HeadModel, head: HeadModelData) -> None:
    """ICT marks neither: the scalp covers the crown and the back of the head above the
    brows, the ears sit at the sides, mirrored, and the outline step gets a hair region."""
    from backend.gaussians.layout import sample_layout
    from backend.generate.outline import hair_weight

    v, m = head.v_template, head.part_masks
    skin = m["skin"]
    _, lmk = _pose(model)
    top = np.argmax(np.where(skin, v[:, 1], -np.inf))
    back = np.argmin(np.where(skin & (np.abs(v[:, 1]) < 0.01), v[:, 2], np.inf))
    assert m["scalp"][top] and m["scalp"][back]
    front = m["scalp"] & (v[:, 2] > 0.06)
    assert front.any() and v[front, 1].min() > lmk[17:27, 1].max() + 0.02  # the hairline is above the brows
    assert not (m["scalp"] & (m["ears"] | m["neck"] | ~skin)).any()
    ears = v[m["ears"]]
    left, right = ears[ears[:, 0] > 0], ears[ears[:, 0] < 0]
    assert len(left) == len(right) and np.abs(ears[:, 0]).min() > 0.06
    np.testing.assert_allclose(left[:, 1:].mean(0), right[:, 1:].mean(0), atol=1e-3)
    assert np.abs(ears[:, 1] - lmk[27:31, 1].mean()).max() < 0.07  # at the nose's height
    layout = sample_layout(head.uv_coords, head.uv_faces, 20_000)
    weight = hair_weight(head, layout, 0.02)
    corners = torch.as_tensor(head.faces)[layout.face_idx]  # [N, 3]
    cheeks_and_brow = torch.as_tensor(m["face"] & ~m["ears"] & ~m["scalp"])[corners].all(1) & (torch.as_tensor(v)[corners][:, :, 2].mean(1) > 0.05)
    assert weight.max() > 0.99 and weight[cheeks_and_brow].max() == 0.0


def test_landmarks_lie_on_the_face(model: HeadModel) -> None:
    _, lmk = _pose(model)
    assert lmk[30, 2] == pytest.approx(lmk[:, 2].max(), abs=0.005)  # nose tip in front
    eyes = lmk[[36, 39, 42, 45]]
    assert np.abs(eyes[:, 1]).max() < 0.01  # eye corners at eye height (the eye centres are at y = 0.002)
    assert lmk[36, 0] < lmk[39, 0] < 0 < lmk[42, 0] < lmk[45, 0]
    assert lmk[0, 0] < -0.05 and lmk[16, 0] > 0.05 and lmk[8, 1] < lmk[57, 1] < lmk[51, 1] < lmk[33, 1]
    contour = lmk[:17]
    assert (np.diff(contour[:9, 0]) > 0).all() and (np.diff(contour[8:, 0]) > 0).all()


def test_jaw_open_expression_moves_the_chin_down(model: HeadModel) -> None:
    _, neutral = _pose(model)
    _, opened = _pose(model, {"jawOpen": 1.0})
    assert opened[8, 1] < neutral[8, 1] - 0.01
    assert abs(opened[27, 1] - neutral[27, 1]) < 5e-4  # the nose bridge stays (ICT's sculpt moves it 0.1 mm)


def test_jaw_joint_opens_the_mouth(model: HeadModel, head: HeadModelData) -> None:
    v0, lmk0 = _pose(model)
    v1, lmk1 = _pose(model, jaw_pose=(0, 0.3))
    moved = np.linalg.norm(v1 - v0, axis=1)
    teeth = head.part_masks["teeth"]
    lower_teeth = teeth & (head.weights[:, 2] > 0.99)
    upper_teeth = teeth & (head.weights[:, 2] < 0.01)
    assert lower_teeth.sum() > 1000 and upper_teeth.sum() > 1000
    assert moved[lower_teeth].min() > 0.003 and moved[upper_teeth].max() < 1e-6
    assert lmk1[8, 1] < lmk0[8, 1] - 0.01  # chin down
    assert lmk1[57, 1] < lmk0[57, 1] - 0.01  # lower lip follows
    assert abs(lmk1[51, 1] - lmk0[51, 1]) < 0.004  # upper lip stays
    assert np.linalg.norm(lmk1[66] - lmk1[62]) > np.linalg.norm(lmk0[66] - lmk0[62]) + 0.01  # the mouth opens
    # Smooth falloff on the cheeks: some skin takes part of the jaw's motion.
    skin = head.part_masks["skin"]
    assert ((head.weights[skin, 2] > 0.1) & (head.weights[skin, 2] < 0.9)).sum() > 100


def test_eye_joint_turns_only_its_eyeball(model: HeadModel, head: HeadModelData) -> None:
    v0, _ = _pose(model)
    v1, _ = _pose(model, eyes_pose=(1, 0.3))  # eyes_pose[0:3] is the left eye: turn it about +y
    moved = np.linalg.norm(v1 - v0, axis=1) > 1e-6
    left = head.part_masks["left_eyeball"]
    assert moved[left].mean() > 0.9 and not moved[~left].any()
    centre = (head.j_regressor[3] @ head.v_template)
    radius0 = np.linalg.norm(v0[left] - centre, axis=1)
    np.testing.assert_allclose(np.linalg.norm(v1[left] - centre, axis=1), radius0, atol=1e-6)  # about its own centre


def test_neck_joint_turns_the_head_over_the_neck(model: HeadModel, head: HeadModelData) -> None:
    v0, lmk0 = _pose(model)
    v1, lmk1 = _pose(model, neck_pose=(1, 0.4))  # turn toward the subject's left
    assert lmk1[30, 0] > lmk0[30, 0] + 0.02
    low = head.v_template[:, 1] < -0.18
    assert np.linalg.norm(v1[low] - v0[low], axis=1).max() < 1e-6  # the bottom of the neck stays


def test_every_triangle_with_a_texel_gets_gaussians(head: HeadModelData) -> None:
    from backend.gaussians.layout import sample_layout

    count = 100_000
    binding = sample_layout(head.uv_coords, head.uv_faces, count)
    uv = head.uv_coords[head.uv_faces].astype(np.float64)
    area = 0.5 * np.abs(np.cross(uv[:, 1] - uv[:, 0], uv[:, 2] - uv[:, 0])) * binding.resolution**2
    big = area >= 1.0
    covered = np.zeros(head.num_faces, bool)
    covered[binding.face_idx.numpy()] = True
    assert covered[big].mean() > 0.95  # the rest are slivers no texel centre falls in
    for name in ("face", "teeth", "mouth", "left_eyeball", "right_eyeball"):
        on_part = head.part_masks[name][head.faces[binding.face_idx.numpy()]].all(axis=1)
        assert on_part.sum() > 200, name
    assert binding.count == count


@pytest.mark.skipif(not os.environ.get(SNAPSHOT_ENV), reason=f"set ${SNAPSHOT_ENV} to an ICT-FaceKit snapshot to test the rebuild")
@pytest.mark.slow
def test_rebuild_from_snapshot_matches_the_shipped_arrays(tmp_path) -> None:
    from backend.head.ict.build import main

    assert main([os.environ[SNAPSHOT_ENV], "--out", str(tmp_path)]) == 0
    built = json.loads((tmp_path / CHECKSUMS_FILE).read_text())["arrays"]
    shipped = json.loads((DATA_DIR / CHECKSUMS_FILE).read_text())["arrays"]
    assert built == shipped


def test_the_build_refuses_a_folder_that_is_no_snapshot(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """One line naming the folder, exit status 2, nothing written."""
    from backend.head.ict.build import main

    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        assert main([str(folder), "--out", str(tmp_path / "out")]) == 2
        assert str(folder) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_synthetic_motion_opens_the_jaw_with_jaw_open_and_leaves_the_joint_at_rest(model: HeadModel) -> None:
    from backend.data.motion import random_trajectory
    from backend.head.registry import load_head_model

    assert model.data.jaw_expression == model.expr_names.index("jawOpen")
    params = random_trajectory(model, 60, np.random.default_rng(0), 1.0, moving_head=False)
    assert torch.count_nonzero(params.jaw_pose) == 0
    jaw_open = params.expr[:, model.data.jaw_expression]
    assert float(jaw_open.max()) > 0.1 and float(jaw_open.min()) >= 0.0  # the mouth opens and closes
    builtin = load_head_model()
    assert builtin.data.jaw_expression is None
    assert float(random_trajectory(builtin, 60, np.random.default_rng(0), 1.0, moving_head=False).jaw_pose[:, 0].max()) > 0.05
