"""ARKit curves measured on a driving video by mediapipe's face landmarker: the model's
checksum, 51 named curves in [0, 1] and head angles on clips of the public-domain astronaut,
the sides and signs they mean, the CSV they write read back by the Live Link reader, and bad
inputs refused in one error with nothing written.

Tests that run the model skip where ``face_landmarker.task`` is not installed
(backend/tracking/models/README.md); the checks of the file itself, the CSV writer and the
angle conversion run everywhere.
"""

from __future__ import annotations

import hashlib
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
import skimage
from PIL import Image

from backend.cli import main as cli_main
from backend.head.params import FlameParams
from backend.head.registry import load_head_data
from backend.wire.arkit_csv import ArkitCurves, euler_to_axis_angle, read_live_link_csv, resample, write_live_link_csv
from backend.wire.errors import InputError
from backend.tracking.blendshapes import (
    ARKIT_NAMES,
    MODEL_ENV,
    MODEL_SHA256,
    BlendshapeConfig,
    head_angles,
    read_model,
    resolve_model,
    video_curves,
)
from tests.test_tracking_inputs import write_video

needs_model = pytest.mark.skipif(
    not resolve_model().is_file(), reason=f"mediapipe's face_landmarker.task is not installed at {resolve_model()} (backend/tracking/models/README.md)"
)
FPS = 10
BLANK = 4  # the frame of the clip that shows no face


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    """[320, 320, 3] the astronaut's head and shoulders (scikit-image, public domain)."""
    return np.ascontiguousarray(skimage.data.astronaut()[:320, 60:380])


@pytest.fixture(scope="module")
def clip(face: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight frames at 10 fps of the face drifting down and right, frame 4 a grey card."""
    frames = [np.ascontiguousarray(np.roll(face, (i, 3 * i), axis=(0, 1))) for i in range(8)]
    frames[BLANK] = np.full_like(face, 128)
    return write_video(tmp_path_factory.mktemp("clip") / "drive.mp4", frames, fps=FPS)


def one_frame(folder: Path, rgb: np.ndarray) -> Path:
    folder.mkdir()
    Image.fromarray(rgb).save(folder / "0001.png")
    return folder


@needs_model
def test_the_installed_model_is_googles_bundle() -> None:
    data = resolve_model().read_bytes()
    assert hashlib.sha256(data).hexdigest() == MODEL_SHA256 == hashlib.sha256(read_model()).hexdigest()
    with zipfile.ZipFile(resolve_model()) as bundle:
        assert {"face_detector.tflite", "face_landmarks_detector.tflite", "face_blendshapes.tflite"} <= set(bundle.namelist())


def test_a_missing_or_different_model_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="never downloaded"):
        read_model(tmp_path / "absent.task")
    other = tmp_path / "other.task"
    other.write_bytes(b"PK\x03\x04 not the bundle")
    monkeypatch.setenv(MODEL_ENV, str(other))
    assert resolve_model() == other
    with pytest.raises(InputError, match="is not mediapipe's face_landmarker.task"):
        read_model()


@needs_model
def test_a_clip_gives_51_named_curves_in_range_and_head_angles(clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the face landmarker tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    seen: list[tuple[int, int]] = []
    measured = video_curves(clip, progress=lambda done, total: seen.append((done, total)))
    curves = measured.curves
    assert curves.names == ARKIT_NAMES and len(curves.names) == 51 and "_neutral" not in curves.names and "tongueOut" not in curves.names
    assert curves.weights.shape == (8, 51) and np.isfinite(curves.weights).all()
    assert curves.weights.min() >= 0.0 and curves.weights.max() <= 1.0
    assert curves.head.shape == (8, 3) and np.isfinite(curves.head).all() and np.abs(curves.head).max() < np.pi / 2
    np.testing.assert_allclose(curves.seconds, np.arange(8) / FPS, atol=1e-6)
    assert measured.fps == FPS and measured.faceless == 1
    # The grey card holds no face: its row is interpolated halfway between its neighbours.
    np.testing.assert_allclose(curves.weights[BLANK], (curves.weights[BLANK - 1] + curves.weights[BLANK + 1]) / 2, atol=1e-9)
    # The astronaut smiles, on both sides.
    smile = curves.weights[:, [ARKIT_NAMES.index("mouthSmileLeft"), ARKIT_NAMES.index("mouthSmileRight")]]
    assert smile.min() > 0.5
    assert seen[-1] == (8, 8) and [d for d, _ in seen[:-1]] == list(range(1, 9))


@needs_model
def test_sides_are_the_subjects_and_roll_turns_with_the_image(face: np.ndarray, tmp_path: Path) -> None:
    """Left and Right are the subject's, as ARKit's; the head angles are in FLAME's axes (a
    counter-clockwise turn of the image is a positive roll about +z, toward the camera)."""
    from backend.tracking.landmarks import Landmarker

    with Landmarker() as lm:
        points = lm.detect(face).points
    # mediapipe's mesh points 33 and 133 are the corners of the subject's right eye (the image's left).
    x, y = ((points[33] + points[133]) / 2)[:2].astype(int)
    shut = face.copy()
    shut[y - 8 : y + 8, x - 22 : x + 22] = face[y + 12 : y + 28, x - 22 : x + 22]  # skin from below the eye over it
    plain = video_curves(one_frame(tmp_path / "plain", face)).curves
    closed = video_curves(one_frame(tmp_path / "shut", shut)).curves
    turned = video_curves(one_frame(tmp_path / "turned", np.asarray(Image.fromarray(face).rotate(15)))).curves
    left, right = ARKIT_NAMES.index("eyeBlinkLeft"), ARKIT_NAMES.index("eyeBlinkRight")
    assert closed.weights[0, right] > plain.weights[0, right] + 0.1
    assert closed.weights[0, right] > closed.weights[0, left] + 0.1
    assert np.degrees(turned.head[0, 2] - plain.head[0, 2]) == pytest.approx(15.0, abs=3.0)


def test_head_angles_compose_back_to_the_rotation() -> None:
    """head_angles inverts the Ry(yaw) Rx(pitch) Rz(roll) that arkit_csv composes."""
    from scipy.spatial.transform import Rotation

    angles = np.random.default_rng(1).uniform([-1.5, -1.2, -1.5], [1.5, 1.2, 1.5], (200, 3))
    matrices = np.tile(np.eye(4), (200, 1, 1))
    matrices[:, :3, :3] = Rotation.from_euler("YXZ", angles).as_matrix()
    np.testing.assert_allclose(head_angles(matrices), angles, atol=1e-9)
    again = euler_to_axis_angle(*head_angles(matrices).T)
    np.testing.assert_allclose(Rotation.from_rotvec(again).as_matrix(), matrices[:, :3, :3], atol=1e-9)


def test_written_curves_read_back_as_a_live_link_recording(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    seconds = np.cumsum(rng.uniform(0.01, 0.05, 40)) + np.array([0.0] * 39 + [3700.0])  # the last row past an hour
    seconds -= seconds[0]
    curves = ArkitCurves(seconds, ARKIT_NAMES, rng.uniform(0, 1, (40, 51)), rng.uniform(-0.5, 0.5, (40, 3)))
    again = read_live_link_csv(write_live_link_csv(curves, tmp_path / "take.csv"))
    assert again.names == tuple(n[0].upper() + n[1:] for n in ARKIT_NAMES)  # Live Link's spelling
    np.testing.assert_allclose(again.seconds, curves.seconds, atol=1e-5)  # the frame field keeps 1/1000 of a 60th
    np.testing.assert_array_equal(again.weights, curves.weights)
    np.testing.assert_array_equal(again.head, curves.head)


@needs_model
def test_the_command_writes_flame_parameters_and_a_csv_the_reader_takes(clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, csv = tmp_path / "anim" / "flame_param.npz", tmp_path / "curves" / "drive.csv"
    code = cli_main(["arkit", str(clip), "--out", str(out), "--csv", str(csv), "--head", "ict", "--fps", "20"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "no face in 1 of 8 frames" in err
    measured = video_curves(clip).curves
    recorded = read_live_link_csv(csv)
    np.testing.assert_allclose(recorded.seconds, measured.seconds, atol=1e-5)
    np.testing.assert_array_equal(recorded.weights, measured.weights)
    np.testing.assert_array_equal(recorded.head, measured.head)
    # The parameters are the curves at 20 fps on the ICT head's expressions of the same names.
    params = FlameParams.load(out)
    names = list(load_head_data("ict").expr_names)
    at_20 = resample(measured, 20.0)
    assert params.batch_size == 15 and params.expr_names == tuple(names)
    np.testing.assert_allclose(params.expr[:, names.index("jawOpen")].numpy(), at_20.weights[:, ARKIT_NAMES.index("jawOpen")], atol=1e-6)
    np.testing.assert_allclose(params.neck_pose.numpy(), euler_to_axis_angle(*at_20.head.T), atol=1e-6)
    # And the CSV drives the same parameters through the CSV path.
    again = tmp_path / "again.npz"
    assert cli_main(["arkit", str(csv), "--out", str(again), "--flame", "ict", "--fps", "20"]) == 0
    np.testing.assert_allclose(FlameParams.load(again).expr.numpy(), params.expr.numpy(), atol=1e-6)


def _not_a_video(tmp: Path, face: np.ndarray) -> Path:
    (tmp / "notes.mp4").write_text("not a video")
    return tmp / "notes.mp4"


def _no_frames(tmp: Path, face: np.ndarray) -> Path:
    import av

    with av.open(str(tmp / "empty.avi"), "w") as out:
        stream = out.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        out.start_encoding()  # the header, and then not one frame
    return tmp / "empty.avi"


def _empty_folder(tmp: Path, face: np.ndarray) -> Path:
    (tmp / "frames").mkdir()
    return tmp / "frames"


def _one_photo(tmp: Path, face: np.ndarray) -> Path:
    Image.fromarray(face).save(tmp / "face.png")
    return tmp / "face.png"


def _no_face(tmp: Path, face: np.ndarray) -> Path:
    return write_video(tmp / "wall.mp4", [np.full_like(face, v) for v in (90, 120, 150)], fps=FPS)


@pytest.mark.parametrize(
    "make, words, model",
    [
        (_not_a_video, "cannot be opened as a video", False),
        (_empty_folder, "has no image files", False),
        (_one_photo, "is one image", False),
        (_no_frames, "no video frame could be decoded", True),
        (_no_face, "no face found in any of its 3 frames", True),
    ],
)
def test_a_bad_input_is_one_error_and_nothing_is_written(
    make, words: str, model: bool, face: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    if model and not resolve_model().is_file():
        pytest.skip("needs mediapipe's face_landmarker.task (backend/tracking/models/README.md)")
    bad = make(tmp_path, face)
    out, csv = tmp_path / "out" / "flame_param.npz", tmp_path / "out" / "take.csv"
    code = cli_main(["arkit", str(bad), "--out", str(out), "--csv", str(csv), "--flame", "ict", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not out.parent.exists()


def test_a_head_without_arkit_names_is_refused_before_the_video_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "flame_param.npz"
    code = cli_main(["arkit", str(tmp_path / "never-read.mp4"), "--out", str(out), "--flame", "builtin"])
    err = capsys.readouterr().err
    assert code == 2 and "--head ict" in err and not out.parent.exists()


def test_the_config_names_its_model(tmp_path: Path, face: np.ndarray) -> None:
    """BlendshapeConfig.model is the file read, before any frame."""
    with pytest.raises(InputError, match="absent.task"):
        video_curves(one_frame(tmp_path / "frames", face), BlendshapeConfig(model=tmp_path / "absent.task"))
