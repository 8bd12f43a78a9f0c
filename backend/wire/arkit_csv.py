"""ARKit face curves (Live Link Face's CSV recordings from an iPhone) as FLAME channels,
and curves measured elsewhere (a driving video, ``backend/tracking/blendshapes.py``) written
in the same CSV layout.

A recording holds ARKit's 52 blendshape weights in [0, 1] per row, with the head's and the
eyes' yaw, pitch and roll in radians. Each weight drives the head model's expression
component of the same name (ARKit's spelling, compared without regard to the first letter's
case: the CSV's ``MouthSmileLeft`` is the head's ``mouthSmileLeft``); the head's rotation
drives the neck joint. A head whose expressions are not named after ARKit's (the built-in
head) cannot take them, and says so.

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
# Live Link Face writes these beside the 52 weights; the eyes' own angles are not used
# (the eyeLook* weights carry the gaze on heads that have them).
NOT_WEIGHTS = frozenset({TIMECODE, "BlendShapeCount", *HEAD_ANGLES, *(f"{e}Eye{a}" for e in ("Left", "Right") for a in ("Yaw", "Pitch", "Roll"))})
SOURCE_FPS = 60.0  # Live Link Face's usual recording rate


@dataclass(frozen=True)
class ArkitCurves:
    """One recording.

    Attributes:
        seconds: [T] time of each row from the first, seconds.
        names: the weight columns, as the file spells them.
        weights: [T, len(names)] in [0, 1].
        head: [T, 3] yaw, pitch, roll in radians (zeros when the file has none).
    """

    seconds: np.ndarray
    names: tuple[str, ...]
    weights: np.ndarray
    head: np.ndarray


@dataclass(frozen=True)
class ArkitChannels:
    """The curves on one head's FLAME channels.

    Attributes:
        expr: [T, E] float32, the head's expression coefficients (zero where no weight is named after one).
        neck_pose: [T, 3] float32 axis-angle, radians.
        missing: the file's weight columns the head has no expression for.
    """

    expr: np.ndarray
    neck_pose: np.ndarray
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
    seconds, weights, head = [], [], []
    for n, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise InputError(f"{path}: row {n} has {len(row)} fields, the header {len(header)}")
        try:
            seconds.append(_timecode_seconds(row[header.index(TIMECODE)], source_fps))
            weights.append([float(row[i]) for i in weights_at])
            head.append([float(row[header.index(a)]) if a in header else 0.0 for a in HEAD_ANGLES])
        except ValueError as exc:
            raise InputError(f"{path}: row {n}: {exc}") from None
    t = np.asarray(seconds, np.float64)
    w = np.asarray(weights, np.float64)
    if not np.isfinite(t).all() or not np.isfinite(w).all() or not np.isfinite(np.asarray(head)).all():
        raise InputError(f"{path}: holds NaN or Inf")
    if np.any(np.diff(t) < 0):
        raise InputError(f"{path}: its timecodes go backwards")
    return ArkitCurves(t - t[0], tuple(header[i] for i in weights_at), w, np.asarray(head, np.float64))


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
    ``HeadYaw``, ``HeadPitch``, ``HeadRoll`` in radians. Columns the curves lack (the eyes'
    own angles) are left out rather than written as zeros."""
    path = Path(path)
    header = [TIMECODE, "BlendShapeCount", *(n[:1].upper() + n[1:] for n in curves.names), *HEAD_ANGLES]
    count = len(curves.names) + len(HEAD_ANGLES)  # Live Link counts every value after it
    try:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            out = csv.writer(fh)
            out.writerow(header)
            for t, w, h in zip(curves.seconds, curves.weights, curves.head):
                out.writerow([_timecode(float(t), source_fps), count, *map(repr, w.tolist()), *map(repr, h.tolist())])
    except OSError as exc:
        raise InputError(f"{path}: cannot be written ({exc})") from exc
    return path


def resample(curves: ArkitCurves, fps: float) -> ArkitCurves:
    """The curves at ``fps`` frames a second from the first row to the last (linear)."""
    if not fps > 0:
        raise InputError(f"--fps must be positive, got {fps}")
    count = int(math.floor(curves.seconds[-1] * fps + 1e-9)) + 1
    t = np.arange(count) / fps
    weights = np.stack([np.interp(t, curves.seconds, curves.weights[:, k]) for k in range(curves.weights.shape[1])], axis=1)
    head = np.stack([np.interp(t, curves.seconds, curves.head[:, k]) for k in range(3)], axis=1)
    return ArkitCurves(t, curves.names, weights, head)


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
    # Yaw about FLAME's +y, pitch about +x, roll about +z, with the file's signs; not yet
    # checked against a recording of a known head motion (docs/head.md).
    neck = euler_to_axis_angle(curves.head[:, 0], curves.head[:, 1], curves.head[:, 2]).astype(np.float32)
    found = {column for column, _ in used}
    missing = tuple(n for k, n in enumerate(curves.names) if k not in found)
    return ArkitChannels(expr, neck, missing)


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
