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
from backend.wire.arkit_csv import euler_to_axis_angle, read_live_link_csv, resample
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
    # The yaw turns the head about +y, by 0.3 rad.
    assert np.allclose(params.neck_pose.numpy(), [0.0, 0.3, 0.0], atol=1e-6)
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
