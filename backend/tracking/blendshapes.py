"""ARKit face curves from a driving video: mediapipe's FaceLandmarker blendshape scores.

mediapipe's Face Landmarker bundle (``face_landmarker.task``: face detector, face mesh V2
and the Blendshape V2 model; Google, Apache-2.0) scores 52 categories per frame: ``_neutral``
and 51 of ARKit's 52 blendshapes under ARKit's names (``tongueOut`` is not estimated). Its
facial transformation matrix gives the head's rotation. The mediapipe wheel does not carry
this bundle; it is read from a file whose SHA-256 is recorded here, and never downloaded
(``models/README.md`` says where it comes from and where it is looked for).

The result is the structure a Live Link Face CSV gives (``backend.wire.arkit_csv``), so the
same code resamples it, maps it onto a head's expressions and writes it as a CSV.
Frames without a face take values interpolated linearly between the nearest frames with
one (held before the first and after the last); the result counts them.

No torch here: mediapipe and numpy, with the tracker's video and frame-folder readers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backend.tracking.images import is_image_path
from backend.tracking.video import FolderSource, FrameRange, VideoSource
from backend.wire.arkit_csv import ArkitCurves
from backend.wire.errors import InputError

# mediapipe's C++ logging goes to stderr; keep it to errors (set before mediapipe is imported).
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODEL_SHA256 = "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"  # float16, version 1
MODEL_FILE = Path(__file__).resolve().parent / "models" / "face_landmarker.task"
MODEL_ENV = "SPATIALAVATAR_FACE_LANDMARKER"
NEUTRAL = "_neutral"
# The model's categories after ``_neutral``, in its order: ARKit's names, less tongueOut.
ARKIT_NAMES = (
    "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight", "cheekPuff",
    "cheekSquintLeft", "cheekSquintRight", "eyeBlinkLeft", "eyeBlinkRight", "eyeLookDownLeft", "eyeLookDownRight",
    "eyeLookInLeft", "eyeLookInRight", "eyeLookOutLeft", "eyeLookOutRight", "eyeLookUpLeft", "eyeLookUpRight",
    "eyeSquintLeft", "eyeSquintRight", "eyeWideLeft", "eyeWideRight", "jawForward", "jawLeft", "jawOpen", "jawRight",
    "mouthClose", "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft", "mouthFrownRight", "mouthFunnel",
    "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthPressLeft", "mouthPressRight", "mouthPucker",
    "mouthRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper", "mouthSmileLeft",
    "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight", "mouthUpperUpLeft", "mouthUpperUpRight",
    "noseSneerLeft", "noseSneerRight",
)  # fmt: skip


@dataclass(frozen=True)
class BlendshapeConfig:
    """How a driving video is read.

    Attributes:
        model: the ``face_landmarker.task`` to use; None: ``$SPATIALAVATAR_FACE_LANDMARKER``,
            else the one installed beside this module (``MODEL_FILE``).
        frames: which frames to read; its ``fps`` is the rate of a folder of frames.
        min_detection / min_presence / min_tracking: mediapipe's confidences in [0, 1] for
            finding a face, keeping one, and following it from the previous frame.
    """

    model: Path | None = None
    frames: FrameRange = field(default_factory=FrameRange)
    min_detection: float = 0.5
    min_presence: float = 0.5
    min_tracking: float = 0.5


@dataclass(frozen=True)
class VideoCurves:
    """ARKit curves measured on a video or a folder of frames.

    Attributes:
        curves: one row per frame read: ``seconds`` [T] from the first frame, ``names`` the
            51 of ``ARKIT_NAMES``, ``weights`` [T, 51] in [0, 1], ``head`` [T, 3] yaw, pitch,
            roll in radians (the rotation R = Ry(yaw) Rx(pitch) Rz(roll) of the face relative
            to the camera, in FLAME's axes: +x the subject's left, +y up, +z toward the camera).
        source: the video or folder read.
        fps: its frame rate (a video's own, a folder's from ``FrameRange.fps``).
        faceless: frames in which no face was found (their values are interpolated).
    """

    curves: ArkitCurves
    source: str
    fps: float
    faceless: int

    def summary(self) -> dict:
        return {"source": self.source, "source_frames": len(self.curves.seconds), "source_fps": self.fps, "frames_without_face": self.faceless}


def resolve_model(path: Path | None = None) -> Path:
    """The face_landmarker.task to read: ``path``, else ``$SPATIALAVATAR_FACE_LANDMARKER``, else ``MODEL_FILE``."""
    if path is not None:
        return Path(path)
    return Path(os.environ[MODEL_ENV]) if os.environ.get(MODEL_ENV) else MODEL_FILE


def read_model(path: Path | None = None) -> bytes:
    """The model bundle's bytes, checked against ``MODEL_SHA256`` (mediapipe is handed these
    bytes, not the path, so what runs is what was checked). InputError when it is missing or differs."""
    where = resolve_model(path)
    try:
        data = where.read_bytes()
    except OSError as exc:
        raise InputError(
            f"{where}: mediapipe's face_landmarker.task (float16, version 1) is not there ({exc.strerror}); "
            f"it is never downloaded: put the file there or name it in ${MODEL_ENV} (backend/tracking/models/README.md)"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != MODEL_SHA256:
        raise InputError(f"{where}: is not mediapipe's face_landmarker.task float16 version 1 (SHA-256 {digest[:12]}..., expected {MODEL_SHA256[:12]}...)")
    return data


def open_driving_source(path: str | Path, frames: FrameRange) -> FolderSource | VideoSource:
    """A video file or a folder of frames; InputError for anything else (one photo is no performance)."""
    path = Path(path)
    frames.check()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return FolderSource(path, frames)
    if is_image_path(path):
        raise InputError(f"{path}: is one image; give a video, a folder of frames, or a Live Link Face CSV")
    return VideoSource(path, frames)


def head_angles(matrices: np.ndarray) -> np.ndarray:
    """[T, 4, 4] mediapipe facial transformation matrices -> [T, 3] yaw, pitch, roll (radians)
    with R = Ry(yaw) Rx(pitch) Rz(roll), the order ``arkit_csv.euler_to_axis_angle`` composes.

    mediapipe's face space and camera are x right (in the image), y up, z toward the viewer:
    FLAME's axes for a face seen from the front, so no axes change.
    """
    r = matrices[:, :3, :3]
    yaw = np.arctan2(r[:, 0, 2], r[:, 2, 2])
    pitch = np.arcsin(np.clip(-r[:, 1, 2], -1.0, 1.0))
    roll = np.arctan2(r[:, 1, 0], r[:, 1, 1])
    return np.stack([yaw, pitch, roll], axis=1)


def _fill(t: np.ndarray, found: np.ndarray, values: np.ndarray) -> np.ndarray:
    """[T, C] values with the rows where ``found`` is False interpolated in time from the others
    (np.interp holds the first and last found rows beyond them)."""
    return np.stack([np.interp(t, t[found], values[found, c]) for c in range(values.shape[1])], axis=1)


def video_curves(
    path: str | Path, config: BlendshapeConfig = BlendshapeConfig(), progress: Callable[[int, int], None] | None = None
) -> VideoCurves:
    """Run mediapipe's FaceLandmarker (VIDEO mode, one face) over a video or a folder of frames.

    ``progress(done, total)`` is called after each frame (``total`` is an estimate).
    InputError for an unreadable file, no frames, or no face in any frame; the input is
    opened and the model checked before the first frame is decoded.
    """
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    source = open_driving_source(path, config.frames)
    options = vision.FaceLandmarkerOptions(
        base_options=BaseOptions(model_asset_buffer=read_model(config.model)),
        running_mode=vision.RunningMode.VIDEO,
        num_faces=1,
        min_face_detection_confidence=config.min_detection,
        min_face_presence_confidence=config.min_presence,
        min_tracking_confidence=config.min_tracking,
        output_face_blendshapes=True,
        output_facial_transformation_matrixes=True,
    )
    fps = source.fps
    estimate = source.estimate() or 0
    seconds: list[float] = []
    weights: list[np.ndarray] = []
    matrices: list[np.ndarray] = []
    found: list[bool] = []
    last_ms = -1
    with vision.FaceLandmarker.create_from_options(options) as landmarker:
        for n, frame in enumerate(source.frames(), start=1):
            t = frame.time if frame.time is not None else frame.index / fps
            # VIDEO mode wants strictly increasing whole milliseconds.
            last_ms = max(round(t * 1000), last_ms + 1)
            result = landmarker.detect_for_video(mp.Image(image_format=mp.ImageFormat.SRGB, data=frame.rgb), last_ms)
            seconds.append(t)
            if result.face_blendshapes:
                scores = result.face_blendshapes[0]
                names = tuple(c.category_name for c in scores)
                if names != (NEUTRAL, *ARKIT_NAMES):  # the checksum pins the model; this says what changed if it is ever bumped
                    raise InputError(f"the face landmarker scored {len(names)} categories, not mediapipe's {NEUTRAL} and the 51 ARKit names")
                weights.append(np.array([c.score for c in scores[1:]], np.float64))
                matrices.append(np.asarray(result.facial_transformation_matrixes[0], np.float64))
                found.append(True)
            else:
                weights.append(np.zeros(len(ARKIT_NAMES)))
                matrices.append(np.eye(4))
                found.append(False)
            if progress is not None:
                progress(n, max(estimate, n + 1))
    if progress is not None:
        progress(len(seconds), len(seconds))
    has_face = np.asarray(found)
    if not has_face.any():
        raise InputError(f"{path}: no face found in any of its {len(seconds)} frames")
    t = np.asarray(seconds, np.float64)
    w = _fill(t, has_face, np.stack(weights))
    head = _fill(t, has_face, head_angles(np.stack(matrices)))
    curves = ArkitCurves(t - t[0], ARKIT_NAMES, w, head)
    return VideoCurves(curves, str(path), fps, int((~has_face).sum()))
