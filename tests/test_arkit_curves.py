"""ARKit curves from a Live Link Face CSV onto a head named after ARKit (the ICT head): each
weight lands on its own expression component, time is resampled, bad files are refused with
one sentence and nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.head.arkit_curves import to_flame_params
from backend.head.model import HeadModel
from backend.head.params import FlameParams
from backend.head.registry import load_head_data
from backend.wire.arkit_csv import (
    EYE_ANGLES,
    EYE_LOOK_RADIANS,
    ArkitCurves,
    euler_to_axis_angle,
    read_live_link_csv,
    resample,
    write_live_link_csv,
)
from backend.wire.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["Timecode", "BlendShapeCount", "EyeBlinkLeft", "JawOpen", "MouthSmileLeft", "TongueOut", "HeadYaw", "HeadPitch", "HeadRoll", "LeftEyeYaw"]


def write_csv(path: Path, rows: list[list[object]], columns: list[str] = COLUMNS) -> Path:
    path.write_text("\n".join([",".join(columns), *(",".join(str(v) for v in r) for r in rows)]) + "\n")
    return path


def recording(path: Path, frames: int = 61) -> Path:
    """One second at 60 fps: the jaw opens linearly 0 -> 1, a left blink at 0.5, the head yawed 0.3 rad."""
    rows = [[f"10:00:00:{k}.000", 52, 0.5, k / 60, 0.25, 0.9, 0.3, 0.0, 0.0, 0.1] for k in range(frames - 1)]
    rows.append(["10:00:01:0.000", 52, 0.5, 1.0, 0.25, 0.9, 0.3, 0.0, 0.0, 0.1])
    return write_csv(path, rows)


@pytest.fixture(scope="module")
def ict() -> HeadModel:
    return HeadModel(load_head_data("ict"))


def test_each_weight_drives_the_expression_of_its_name(ict: HeadModel, tmp_path: Path) -> None:
    curves = resample(read_live_link_csv(recording(tmp_path / "take.csv")), fps=30)
    assert len(curves.seconds) == 31 and curves.seconds[-1] == pytest.approx(1.0)
    params, missing = to_flame_params(curves, ict.data)
    names = list(ict.data.expr_names)
    expr = params.expr.numpy()
    assert np.allclose(expr[:, names.index("jawOpen")], np.arange(31) / 30, atol=1e-6)
    assert np.allclose(expr[:, names.index("eyeBlinkLeft")], 0.5) and np.allclose(expr[:, names.index("mouthSmileLeft")], 0.25)
    others = [i for i, n in enumerate(names) if n not in ("jawOpen", "eyeBlinkLeft", "mouthSmileLeft")]
    assert np.all(expr[:, others] == 0)
    assert missing == ["TongueOut"]  # the ICT head has no tongueOut
    # Live Link's yaw of 0.3 rad turns the face toward the subject's right: -0.3 rad about +y.
    assert np.allclose(params.neck_pose.numpy(), [0.0, -0.3, 0.0], atol=1e-6)
    # A lone eye angle column is no gaze, and no eyeLook* weight either: the eyes look ahead.
    assert np.all(params.eyes_pose.numpy() == 0) and np.all(params.jaw_pose.numpy() == 0)
    chin = ict(params.index([0, 30])).landmarks[:, 8, 1]  # iBUG 68's chin tip, height in metres
    assert float(chin[0] - chin[1]) > 0.01  # the jaw opened by the curve drops the chin


def test_a_weight_the_head_splits_drives_both_halves(ict: HeadModel, tmp_path: Path) -> None:
    """ARKit's browInnerUp and cheekPuff are one weight each; ICT has a left and a right."""
    columns = ["Timecode", "BlendShapeCount", "BrowInnerUp", "CheekPuff", "HeadYaw", "HeadPitch", "HeadRoll"]
    rows = [[f"10:00:00:{k}.000", 52, 0.4, 0.7, 0.0, 0.0, 0.0] for k in range(3)]
    params, missing = to_flame_params(read_live_link_csv(write_csv(tmp_path / "take.csv", rows, columns)), ict.data)
    names = list(ict.data.expr_names)
    expr = params.expr.numpy()
    assert np.allclose(expr[:, [names.index("browInnerUpLeft"), names.index("browInnerUpRight")]], 0.4)
    assert np.allclose(expr[:, [names.index("cheekPuffLeft"), names.index("cheekPuffRight")]], 0.7)
    assert missing == [] and np.count_nonzero(expr[0]) == 4


def _rows(values: list[list[float]]) -> list[list[object]]:
    """Rows at 60 fps from the given values (after Timecode and BlendShapeCount)."""
    return [[f"10:00:00:{k}.000", 52, *v] for k, v in enumerate(values)]


def test_live_link_head_angles_turn_the_head_as_the_app_records_them(ict: HeadModel, tmp_path: Path) -> None:
    """Live Link Face's convention (docs/head.md): a positive HeadYaw turns the face toward the
    subject's right (-x), a positive HeadPitch turns it down, a positive HeadRoll tilts the
    top of the head toward the subject's left (+x)."""
    columns = ["Timecode", "BlendShapeCount", "JawOpen", "HeadYaw", "HeadPitch", "HeadRoll"]
    rows = _rows([[0, 0, 0, 0], [0, 0.3, 0, 0], [0, 0, 0.3, 0], [0, 0, 0, 0.3]])
    params, _ = to_flame_params(read_live_link_csv(write_csv(tmp_path / "take.csv", rows, columns)), ict.data)
    with torch.no_grad():
        out = ict(params)
    nose = out.landmarks[:, 30].numpy()  # iBUG 30, the nose tip
    crown = out.vertices[:, int(ict.data.v_template[:, 1].argmax())].numpy()
    assert nose[1, 0] < nose[0, 0] - 0.02 and abs(nose[1, 1] - nose[0, 1]) < 0.005  # yaw: toward the subject's right
    assert nose[2, 1] < nose[0, 1] - 0.02  # pitch: down
    assert crown[3, 0] > crown[0, 0] + 0.02 and abs(nose[3, 0] - nose[0, 0]) < abs(crown[3, 0] - crown[0, 0])  # roll


def _pupils(head: HeadModel, params: FlameParams) -> np.ndarray:
    """[B, 2, 3] the front pole of the left, then the right eyeball (its vertex farthest forward at rest)."""
    with torch.no_grad():
        v = head(params).vertices.numpy()
    masks = head.data.part_masks
    poles = [np.nonzero(masks[m])[0][head.data.v_template[masks[m], 2].argmax()] for m in ("left_eyeball", "right_eyeball")]
    return v[:, poles]


def test_the_eye_joints_take_the_files_eye_angles(ict: HeadModel, tmp_path: Path) -> None:
    """Positive LeftEyeYaw turns the eye toward the subject's right, positive pitch turns it down
    (the convention of Live Link Face's recordings, docs/head.md); the right eye is its own."""
    columns = ["Timecode", "BlendShapeCount", "EyeLookInLeft", *EYE_ANGLES]
    rows = _rows([[0] * 7, [0.5, 0.3, 0, 0, 0, 0, 0], [0, 0, 0.2, 0, 0, 0, 0], [0, 0, 0, 0, -0.3, 0, 0]])
    params, _ = to_flame_params(read_live_link_csv(write_csv(tmp_path / "take.csv", rows, columns)), ict.data)
    p = _pupils(ict, params)
    (left, right) = (p[:, 0], p[:, 1])
    assert left[1, 0] < left[0, 0] - 0.003 and np.allclose(right[1], right[0], atol=1e-6)  # yaw: toward the subject's right
    assert left[2, 1] < left[0, 1] - 0.002  # pitch: down
    assert right[3, 0] > right[0, 0] + 0.003 and np.allclose(left[3], left[0], atol=1e-6)  # the right eye, yawed the other way
    assert np.allclose(params.eyes_pose[1, :3].numpy(), [0.0, -0.3, 0.0], atol=1e-6)


def test_without_eye_angles_the_eye_look_weights_turn_the_eyes(ict: HeadModel, tmp_path: Path) -> None:
    """Curves measured by mediapipe carry no eye angles: eyeLookOutLeft = 1 turns the left eye out
    (toward the subject's left) by the angle Live Link records for it, eyeLookDownRight the right eye down."""
    columns = ["Timecode", "BlendShapeCount", "EyeLookOutLeft", "EyeLookDownRight"]
    params, _ = to_flame_params(read_live_link_csv(write_csv(tmp_path / "take.csv", _rows([[0, 0], [1, 0], [0, 1]]), columns)), ict.data)
    np.testing.assert_allclose(params.eyes_pose.numpy()[1], [0, EYE_LOOK_RADIANS["Out"], 0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(params.eyes_pose.numpy()[2], [0, 0, 0, EYE_LOOK_RADIANS["Down"], 0, 0], atol=1e-6)
    p = _pupils(ict, params)
    assert p[1, 0, 0] > p[0, 0, 0] + 0.003 and p[2, 1, 1] < p[0, 1, 1] - 0.003


def test_the_jaw_weights_own_the_jaw_and_the_eye_joints_own_the_eyeballs(ict: HeadModel, tmp_path: Path) -> None:
    """One owner per motion: ICT's jawOpen carries the teeth and the chin, so the jaw joint stays
    at rest and jawOpen = 1 drops the chin exactly as the blendshape alone does; its eyeLook*
    move the lids but never the eyeballs, which only the eye joints turn."""
    columns = ["Timecode", "BlendShapeCount", "JawOpen"]
    params, _ = to_flame_params(read_live_link_csv(write_csv(tmp_path / "take.csv", _rows([[0.0], [1.0]]), columns)), ict.data)
    assert np.all(params.jaw_pose.numpy() == 0)
    alone = FlameParams.neutral(2, ict.n_shape, ict.n_expr)
    alone.expr[1, ict.data.expr_names.index("jawOpen")] = 1.0
    with torch.no_grad():
        imported, blendshape = ict(params).landmarks[:, 8, 1], ict(alone).landmarks[:, 8, 1]  # the chin's height
    drop = float(imported[0] - imported[1])
    assert drop > 0.01 and drop == pytest.approx(float(blendshape[0] - blendshape[1]), abs=1e-7)
    dirs = ict.data.shapedirs[..., -ict.n_expr :]
    names = list(ict.data.expr_names)
    teeth, eyeballs = ict.data.part_masks["teeth"], ict.data.part_masks["left_eyeball"] | ict.data.part_masks["right_eyeball"]
    assert np.linalg.norm(dirs[teeth, :, names.index("jawOpen")], axis=1).max() > 0.01
    for n in names:
        if n.startswith("eyeLook"):
            assert np.abs(dirs[eyeballs, :, names.index(n)]).max() == 0 and np.abs(dirs[..., names.index(n)]).max() > 1e-3


def test_written_angles_are_in_live_link_convention(tmp_path: Path) -> None:
    """The writer turns FLAME's angles back into Live Link's: a head turned toward the subject's
    left (positive about +y) is a negative HeadYaw in the file, and the reader undoes it."""
    head = np.array([[0.2, 0.1, 0.05]])
    eyes = np.array([[0.3, -0.1, 0.0, -0.2, 0.15, 0.0]])
    path = write_live_link_csv(ArkitCurves(np.zeros(1), ("jawOpen",), np.zeros((1, 1)), head, eyes), tmp_path / "take.csv")
    header, row = (line.split(",") for line in path.read_text().splitlines())
    values = dict(zip(header, row))
    assert [float(values[k]) for k in ("HeadYaw", "HeadPitch", "HeadRoll")] == pytest.approx([-0.2, 0.1, -0.05])
    assert [float(values[k]) for k in EYE_ANGLES] == pytest.approx([-0.3, -0.1, 0.0, 0.2, 0.15, 0.0])
    again = read_live_link_csv(path)
    np.testing.assert_array_equal(again.head, head)
    np.testing.assert_array_equal(again.eyes, eyes)


def test_the_command_writes_a_flame_param_file(tmp_path: Path) -> None:
    out = tmp_path / "anim" / "flame_param.npz"
    done = subprocess.run(
        [sys.executable, "-m", "backend", "arkit", str(recording(tmp_path / "take.csv")), "--out", str(out), "--head", "ict", "--fps", "24", "--json"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    params = FlameParams.load(out)
    assert params.batch_size == 25 and params.expr.shape[1] == 53
    # The file names its channels after the head it was made for, so no other head takes it.
    assert params.expr_names == load_head_data("ict").expr_names and "mouthSmileLeft" in params.expr_names
    with pytest.raises(InputError, match="made for another head"):
        params.check_head("builtin-v1", load_head_data("builtin").expr_names)


@pytest.mark.parametrize(
    "content, words",
    [
        ("", "no 'Timecode' column"),
        ("a,b\n1,2\n", "no 'Timecode' column"),
        (",".join(COLUMNS) + "\n", "no rows"),
        (",".join(COLUMNS) + "\n10:00:00:0.0,52,0.1,0.2\n", "row 2 has 4 fields"),
        (",".join(COLUMNS) + "\n10:00:00:0.0,52,x,0,0,0,0,0,0,0\n", "row 2"),
        (",".join(COLUMNS) + "\n10:00:00,52,0,0,0,0,0,0,0,0\n", "not HH:MM:SS:FF"),
        (",".join(COLUMNS) + "\n10:00:00:5.0,52,0,0,0,0,0,0,0,0\n10:00:00:1.0,52,0,0,0,0,0,0,0,0\n", "backwards"),
        (",".join(COLUMNS) + "\n10:00:00:0.0,52,nan,0,0,0,0,0,0,0\n", "NaN"),
    ],
)
def test_a_bad_file_is_one_clear_error_and_nothing_is_written(tmp_path: Path, content: str, words: str) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    with pytest.raises(InputError, match=words):
        read_live_link_csv(bad)
    out = tmp_path / "out.npz"
    done = subprocess.run([sys.executable, "-m", "backend", "arkit", str(bad), "--out", str(out), "--flame", "ict"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and words.split("'")[0].strip() in done.stderr and not out.exists()


def test_a_frame_rate_that_is_not_positive_is_refused(tmp_path: Path) -> None:
    curves = read_live_link_csv(recording(tmp_path / "take.csv"))
    for fps in (0.0, -24.0):
        with pytest.raises(InputError, match="--fps must be positive"):
            resample(curves, fps)
    out = tmp_path / "out.npz"
    done = subprocess.run([sys.executable, "-m", "backend", "arkit", str(tmp_path / "take.csv"), "--out", str(out), "--flame", "ict", "--fps", "0"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "--fps must be positive" in done.stderr and not out.exists()


def test_a_head_without_arkit_names_says_so(tmp_path: Path) -> None:
    curves = read_live_link_csv(recording(tmp_path / "take.csv"))
    with pytest.raises(InputError, match="--head ict"):
        to_flame_params(curves, load_head_data("builtin"))
    assert torch.is_tensor(to_flame_params(curves, load_head_data("ict"))[0].expr)


def test_head_angles_turn_as_scipys_intrinsic_yxz() -> None:
    """The numpy conversion (the add-on has no scipy) agrees with scipy, half turns included."""
    from scipy.spatial.transform import Rotation

    angles = np.random.default_rng(0).uniform(-np.pi, np.pi, (500, 3))
    angles[:3] = [[np.pi, 0, 0], [0, 0, 0], [1e-9, 0, 0]]
    ours = euler_to_axis_angle(angles[:, 0], angles[:, 1], angles[:, 2])
    theirs = Rotation.from_euler("YXZ", angles)
    np.testing.assert_allclose(Rotation.from_rotvec(ours).as_matrix(), theirs.as_matrix(), atol=1e-9)
    assert np.all(np.linalg.norm(ours, axis=1) <= np.pi + 1e-9)
