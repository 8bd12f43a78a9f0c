"""ARKit face curves (Live Link Face's CSV recordings from an iPhone) as FLAME channels,
and curves measured elsewhere (a driving video, ``backend/tracking/blendshapes.py``) written
in the same CSV layout.

A recording holds ARKit's 52 blendshape weights in [0, 1] per row, with the head's and the
eyes' yaw, pitch and roll in radians. Each weight drives the head model's expression
component of the same name (ARKit's spelling, compared without regard to the first letter's
case: the CSV's ``MouthSmileLeft`` is the head's ``mouthSmileLeft``). A head whose
expressions are not named after ARKit's (the built-in head) cannot take them, and says so.

One owner per motion, on a FLAME-format head:

* the weights own everything they name: ``jawOpen`` and the other jaw weights move the jaw
  (on the ICT head they carry the teeth and the chin), so the jaw joint stays at rest and the
  jaw does not move twice;
* the eyeballs are rigid parts that only the eye joints turn (ICT's ``eyeLook*`` move the
  lids and the skin around the eyes, not the eyeballs), so the eye joints take the file's eye
  angles, or, in a file without them (curves measured by mediapipe), the angles the
  ``eyeLook*`` weights stand for (``EYE_LOOK_RADIANS``);
* the head's angles turn the neck joint.

Angles. Live Link Face writes them in radians, in the file's own left and right (the sides
its weights name): a positive yaw turns the face toward the file's Right, a positive pitch
turns it down, a positive roll tilts the top of the head toward the file's Left; the
rotation is Ry(yaw) Rx(pitch) Rz(roll) about up, the Left-to-Right axis and the forward axis
(docs/head.md gives the sources). ``ArkitCurves`` keeps angles in FLAME's frame instead (+x
the subject's left, the side the weights call Left; +y up; +z forward): the reader and the
writer convert (``LIVE_LINK_SIGNS``).

Numpy only, in ``backend/wire``: the Blender add-on carries this module and keys the same
channels that ``spatialavatar arkit`` writes (``backend/head/arkit_curves.py``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

TIMECODE = "Timecode"
HEAD_ANGLES = ("HeadYaw", "HeadPitch", "HeadRoll")
EYE_ANGLES = tuple(f"{e}Eye{a}" for e in ("Left", "Right") for a in ("Yaw", "Pitch", "Roll"))
NOT_WEIGHTS = frozenset({TIMECODE, "BlendShapeCount", *HEAD_ANGLES, *EYE_ANGLES})
SOURCE_FPS = 60.0  # Live Link Face's usual recording rate
# Live Link Face's (yaw, pitch, roll) times these are FLAME's (about +y, +x, +z), and back:
# its yaw turns toward -x and its roll tilts the top toward +x, its pitch turns down as +x does.
LIVE_LINK_SIGNS = np.array([-1.0, 1.0, -1.0])
# The eye angle, radians in Live Link's convention, that a weight of 1 stands for: on Live
# Link Face recordings both are written and the angles follow the weights linearly (residual
# 0.002-0.006 rad), e.g. LeftEyeYaw = 0.62 EyeLookInLeft - 0.57 EyeLookOutLeft (docs/head.md).
EYE_LOOK_RADIANS = {"In": 0.62, "Out": 0.57, "Up": 0.46, "Down": 0.62}


@dataclass(frozen=True)
class ArkitCurves:
    """One recording.

    Attributes:
        seconds: [T] time of each row from the first, seconds.
        names: the weight columns, as the file spells them.
        weights: [T, len(names)] in [0, 1].
        head: [T, 3] yaw, pitch, roll in radians in FLAME's frame: the head's rotation is
            Ry(yaw) Rx(pitch) Rz(roll) (zeros when the file has none).
        eyes: [T, 6] the left eye's yaw, pitch, roll, then the right eye's, likewise (each
            eye's rotation in the head); None when the curves carry no eye angles.
    """

    seconds: np.ndarray
    names: tuple[str, ...]
    weights: np.ndarray
    head: np.ndarray
    eyes: np.ndarray | None = None


@dataclass(frozen=True)
class ArkitChannels:
    """The curves on one head's FLAME channels.

    Attributes:
        expr: [T, E] float32, the head's expression coefficients (zero where no weight is named after one).
        neck_pose: [T, 3] float32 axis-angle, radians.
        eyes_pose: [T, 6] float32 axis-angle of the left eye, then the right (FLAME's order).
        missing: the file's weight columns the head has no expression for.

    The jaw joint has no channel: the jaw weights own the jaw (module docstring).
    """

    expr: np.ndarray
    neck_pose: np.ndarray
    eyes_pose: np.ndarray
    missing: tuple[str, ...]


def _timecode_seconds(text: str, source_fps: float) -> float:
    """``HH:MM:SS:FF.fff`` (the frame field counted at ``source_fps``) -> seconds."""
    parts = text.strip().split(":")
    if len(parts) != 4:
        raise ValueError(f"timecode {text!r} is not HH:MM:SS:FF")
    hours, minutes, secs, frames = (float(p) for p in parts)
    return hours * 3600 + minutes * 60 + secs + frames / source_fps


def read_live_link_csv(path: str | Path, source_fps: float = SOURCE_FPS) -> ArkitCurves:
    """Read a Live Link Face CSV; every problem is one InputError naming the file, row or
    column. ``source_fps``: the recording's frame rate (its timecode counts frames at it)."""
    path = Path(path)
    if not source_fps > 0:
        raise InputError(f"the recording's frame rate must be positive, got {source_fps}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot be read as a text CSV ({exc})") from exc
    if not rows or TIMECODE not in rows[0]:
        raise InputError(f"{path}: not a Live Link Face recording (no '{TIMECODE}' column in the first row)")
    header = [h.strip() for h in rows[0]]
    weights_at = [i for i, h in enumerate(header) if h not in NOT_WEIGHTS]
    if not weights_at:
        raise InputError(f"{path}: no blendshape columns")
    body = [r for r in rows[1:] if any(c.strip() for c in r)]
    if not body:
        raise InputError(f"{path}: no rows after the header")
    # A file without some of the eyes' angles has no eye angles at all: a lone yaw column is no gaze.
    has_eyes = all(a in header for a in EYE_ANGLES)
    seconds, weights, angles = [], [], []
    for n, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise InputError(f"{path}: row {n} has {len(row)} fields, the header {len(header)}")
        try:
            seconds.append(_timecode_seconds(row[header.index(TIMECODE)], source_fps))
            weights.append([float(row[i]) for i in weights_at])
            angles.append([float(row[header.index(a)]) if a in header else 0.0 for a in (*HEAD_ANGLES, *EYE_ANGLES)])
        except ValueError as exc:
            raise InputError(f"{path}: row {n}: {exc}") from None
    t = np.asarray(seconds, np.float64)
    w = np.asarray(weights, np.float64)
    a = np.asarray(angles, np.float64).reshape(-1, 3, 3) * LIVE_LINK_SIGNS  # head, left eye, right eye
    if not np.isfinite(t).all() or not np.isfinite(w).all() or not np.isfinite(a).all():
        raise InputError(f"{path}: holds NaN or Inf")
    if np.any(np.diff(t) < 0):
        raise InputError(f"{path}: its timecodes go backwards")
    eyes = a[:, 1:].reshape(-1, 6) if has_eyes else None
    return ArkitCurves(t - t[0], tuple(header[i] for i in weights_at), w, a[:, 0], eyes)


def _canonical(name: str) -> str:
    return name[:1].lower() + name[1:]


def _timecode(seconds: float, source_fps: float) -> str:
    """Seconds -> ``HH:MM:SS:FF.fff``, the frame field counted at ``source_fps``
    (``_timecode_seconds`` reads it back to within 0.0005 of a frame)."""
    whole = math.floor(seconds)
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}:{(seconds - whole) * source_fps:.3f}"


def write_live_link_csv(curves: ArkitCurves, path: str | Path, source_fps: float = SOURCE_FPS) -> Path:
    """Write ``curves`` as a Live Link Face CSV: ``Timecode`` from 00:00:00 (frames counted at
    ``source_fps``, the rate ``read_live_link_csv`` and the add-on's Import ARKit Curves assume
    by default), ``BlendShapeCount``, the weights under Live Link's spelling (``EyeBlinkLeft``),
    ``HeadYaw``, ``HeadPitch``, ``HeadRoll`` (and the eyes' angles when the curves have them)
    in radians in Live Link's convention. Columns the curves lack are left out rather than
    written as zeros."""
    path = Path(path)
    angles = [curves.head * LIVE_LINK_SIGNS]
    if curves.eyes is not None:
        angles += [curves.eyes[:, :3] * LIVE_LINK_SIGNS, curves.eyes[:, 3:] * LIVE_LINK_SIGNS]
    values = np.concatenate(angles, axis=1)
    names = [*HEAD_ANGLES, *(EYE_ANGLES if curves.eyes is not None else ())]
    header = [TIMECODE, "BlendShapeCount", *(n[:1].upper() + n[1:] for n in curves.names), *names]
    count = len(curves.names) + len(names)  # Live Link counts every value after it
    try:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            out = csv.writer(fh)
            out.writerow(header)
            for t, w, v in zip(curves.seconds, curves.weights, values):
                out.writerow([_timecode(float(t), source_fps), count, *map(repr, w.tolist()), *map(repr, v.tolist())])
    except OSError as exc:
        raise InputError(f"{path}: cannot be written ({exc})") from exc
    return path


def resample(curves: ArkitCurves, fps: float) -> ArkitCurves:
    """The curves at ``fps`` frames a second from the first row to the last (linear)."""
    if not fps > 0:
        raise InputError(f"--fps must be positive, got {fps}")
    count = math.floor(curves.seconds[-1] * fps + 1e-9) + 1
    t = np.arange(count) / fps

    def at(values: np.ndarray) -> np.ndarray:
        return np.stack([np.interp(t, curves.seconds, values[:, k]) for k in range(values.shape[1])], axis=1)

    return ArkitCurves(t, curves.names, at(curves.weights), at(curves.head), None if curves.eyes is None else at(curves.eyes))


def _quaternion(axis: int, angle: np.ndarray) -> np.ndarray:
    """[T, 4] (w, x, y, z) turning ``angle`` radians about coordinate axis 0, 1 or 2."""
    q = np.zeros((len(angle), 4))
    q[:, 0] = np.cos(angle / 2)
    q[:, 1 + axis] = np.sin(angle / 2)
    return q


def _multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of [T, 4] (w, x, y, z) quaternions: the rotation b, then a."""
    w1, v1, w2, v2 = a[:, :1], a[:, 1:], b[:, :1], b[:, 1:]
    return np.concatenate([w1 * w2 - np.sum(v1 * v2, axis=1, keepdims=True), w1 * v2 + w2 * v1 + np.cross(v1, v2)], axis=1)


def euler_to_axis_angle(yaw: np.ndarray, pitch: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """[T, 3] axis-angle of R = Ry(yaw) Rx(pitch) Rz(roll) in FLAME's frame (+y up, +z forward).

    Through quaternions rather than a library: Blender's Python has numpy but not scipy.
    """
    q = _multiply(_multiply(_quaternion(1, yaw), _quaternion(0, pitch)), _quaternion(2, roll))
    q *= np.where(q[:, :1] < 0, -1.0, 1.0)  # the short way round: angle in [0, pi]
    sin_half = np.linalg.norm(q[:, 1:], axis=1, keepdims=True)
    angle = 2 * np.arctan2(sin_half, q[:, :1])
    # angle / sin(angle / 2) -> 2 as the angle -> 0
    scale = np.divide(angle, sin_half, out=np.full_like(angle, 2.0), where=sin_half > 1e-12)
    return q[:, 1:] * scale


def flame_channels(curves: ArkitCurves, expr_names: Sequence[str], n_expr: int, head: str) -> ArkitChannels:
    """The curves on a head with ``n_expr`` expression components named ``expr_names``
    (its leading ones). ``head``: how an error calls the head (e.g. "head model 'builtin-v1'").
    InputError when no weight is named after one of its expressions."""
    used = expression_columns(curves.names, expr_names, n_expr, head)
    expr = np.zeros((len(curves.seconds), n_expr), np.float32)
    for column, component in used:
        expr[:, component] = curves.weights[:, column]
    neck = euler_to_axis_angle(*curves.head.T).astype(np.float32)
    eyes = curves.eyes if curves.eyes is not None else eye_angles_from_weights(curves)
    eyes_pose = np.concatenate([euler_to_axis_angle(*eyes[:, :3].T), euler_to_axis_angle(*eyes[:, 3:].T)], axis=1).astype(np.float32)
    found = {column for column, _ in used}
    missing = tuple(n for k, n in enumerate(curves.names) if k not in found)
    return ArkitChannels(expr, neck, eyes_pose, missing)


def eye_angles_from_weights(curves: ArkitCurves) -> np.ndarray:
    """[T, 6] the eyes' yaw, pitch, roll (FLAME's frame, radians; left eye, then right) that the
    ``eyeLook*`` weights stand for (``EYE_LOOK_RADIANS``); a weight the curves lack counts 0."""
    index = {_canonical(n): k for k, n in enumerate(curves.names)}

    def weight(look: str, side: str) -> np.ndarray:
        k = index.get(f"eyeLook{look}{side}")
        return curves.weights[:, k] if k is not None else np.zeros(len(curves.seconds))

    def eye(side: str, toward_right: str, toward_left: str) -> np.ndarray:
        """[T, 3] one eye's angles: Live Link's (positive yaw toward the Right, positive pitch down), then FLAME's."""
        r = EYE_LOOK_RADIANS
        yaw = r[toward_right] * weight(toward_right, side) - r[toward_left] * weight(toward_left, side)
        pitch = r["Down"] * weight("Down", side) - r["Up"] * weight("Up", side)
        return np.stack([yaw, pitch, np.zeros_like(yaw)], axis=1) * LIVE_LINK_SIGNS

    # Toward the Right is the left eye looking in, the right eye looking out.
    return np.concatenate([eye("Left", "In", "Out"), eye("Right", "Out", "In")], axis=1)


def _components(name: str, index: dict[str, int]) -> list[int]:
    """The head's components one ARKit weight drives: its namesake, else both halves of a
    head that splits it in two (ICT's browInnerUpLeft and browInnerUpRight for ARKit's
    browInnerUp, likewise cheekPuff)."""
    key = _canonical(name)
    if key in index:
        return [index[key]]
    return [index[k] for k in (key + "Left", key + "Right") if k in index]


def expression_columns(names: Sequence[str], expr_names: Sequence[str], n_expr: int, head: str) -> list[tuple[int, int]]:
    """(column, component) for each of ``names`` (ARKit weights) that the head's leading
    ``n_expr`` expressions, named ``expr_names``, include (a weight whose halves the head
    splits gives a pair for each half). InputError when none is: a caller
    can check a head before it spends minutes on a video."""
    index = {_canonical(n): i for i, n in enumerate(expr_names) if i < n_expr}
    used = [(k, c) for k, n in enumerate(names) for c in _components(n, index)]
    if not used:
        raise InputError(
            f"{head} names no expression after ARKit's blendshapes ({', '.join(names[:3])}, ...); "
            "use a head that does (the ICT head, --head ict)"
        )
    return used
