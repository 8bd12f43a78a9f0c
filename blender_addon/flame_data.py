"""FLAME animation channels, the ``flame_param.npz`` layout and ARKit face curves (pure
Python + numpy, no bpy).

The avatar object stores its FLAME parameters in the ``spatialavatar_flame`` property group
(see ``flame_props``); Blender vector properties hold at most 32 values, so the expression
coefficients are split into chunks of ``EXPR_CHUNK``. This module maps between the file's
arrays and those chunked channels, so the Blender side only moves flat float arrays.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    from .wire import arkit_csv, expression_names
except ImportError:  # a development checkout: the same modules, from the backend package
    from backend.wire import arkit_csv, expression_names

EXPR_CHUNK = 25  # values per expression vector property (Blender's limit is 32)
EXPR_CHUNKS = 4  # 4 x 25 = the 100 expressions of FLAME 2020
MAX_EXPR = EXPR_CHUNK * EXPR_CHUNKS

# Per-frame pose fields of flame_param.npz (VHAP / GaussianAvatars) and their widths.
POSE_FIELDS: dict[str, int] = {"rotation": 3, "neck_pose": 3, "jaw_pose": 3, "eyes_pose": 6, "translation": 3}
PROP_GROUP = "spatialavatar_flame"  # the Object's PointerProperty name


class FlameFileError(ValueError):
    """A flame_param.npz that cannot be used; the message names the file and field."""


def expr_chunk_name(chunk: int) -> str:
    return f"expr_{chunk}"


def expr_location(index: int) -> tuple[str, int]:
    """(property name, element index) of expression coefficient ``index``."""
    if not 0 <= index < MAX_EXPR:
        raise IndexError(f"expression {index} is outside 0..{MAX_EXPR - 1}")
    return expr_chunk_name(index // EXPR_CHUNK), index % EXPR_CHUNK


def expression_labels(names: list[str] | None, count: int = MAX_EXPR) -> list[str]:
    """Display names of the expression coefficients: the backend's when given, else expr_000..."""
    names = list(names or [])
    return [names[i] if i < len(names) and names[i] else f"expr_{i:03d}" for i in range(count)]


@dataclass(frozen=True)
class Channel:
    """One animated float: ``<group>.<prop>[index]`` on the object."""

    prop: str
    index: int

    @property
    def data_path(self) -> str:
        return f"{PROP_GROUP}.{self.prop}"


@dataclass
class FlameAnimation:
    """Per-frame FLAME parameters: ``expr`` [T, E] and every POSE_FIELDS entry [T, width]."""

    expr: np.ndarray
    poses: dict[str, np.ndarray]
    shape: np.ndarray | None = None  # identity coefficients [S], kept for the round trip
    expr_names: tuple[str, ...] = ()  # the head's names of expr[:, :k]; empty when not known

    @property
    def frames(self) -> int:
        return int(self.expr.shape[0])

    def channels(self) -> list[tuple[Channel, np.ndarray]]:
        """Every animated channel with its [T] values (expressions beyond MAX_EXPR are dropped)."""
        out: list[tuple[Channel, np.ndarray]] = []
        for i in range(min(self.expr.shape[1], MAX_EXPR)):
            prop, k = expr_location(i)
            out.append((Channel(prop, k), self.expr[:, i]))
        for name, width in POSE_FIELDS.items():
            for k in range(width):
                out.append((Channel(name, k), self.poses[name][:, k]))
        return out

    @classmethod
    def from_channels(
        cls, n_expr: int, values: dict[Channel, np.ndarray], frames: int, shape: np.ndarray | None = None, expr_names: Sequence[str] = ()
    ) -> FlameAnimation:
        """The inverse of ``channels``: missing channels are zero."""

        def column(ch: Channel) -> np.ndarray:
            v = values.get(ch)
            return np.zeros(frames, np.float32) if v is None else np.asarray(v, np.float32)

        expr = np.stack([column(Channel(*expr_location(i))) for i in range(n_expr)], axis=1) if n_expr else np.zeros((frames, 0), np.float32)
        poses = {name: np.stack([column(Channel(name, k)) for k in range(w)], axis=1) for name, w in POSE_FIELDS.items()}
        return cls(expr=expr.reshape(frames, n_expr), poses=poses, shape=shape, expr_names=tuple(expr_names)[:n_expr])


def read_flame_npz(path: str | Path, head_names: Sequence[str] | None = None, head: str = "the avatar") -> FlameAnimation:
    """Read and check a flame_param.npz; missing pose fields are zero, ``expr`` is required.

    With ``head_names`` (the avatar's expression names), a file that names its expressions
    otherwise is refused; ``head`` is how the message calls the avatar.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise FlameFileError(f"{path.name}: not a readable .npz file ({e})") from e
    if "expr" not in data:
        raise FlameFileError(f"{path.name}: no 'expr' array (expected the flame_param.npz layout)")
    expr = data["expr"]
    if expr.ndim != 2:
        raise FlameFileError(f"{path.name}: 'expr' must have shape [T, E], got {list(expr.shape)}")
    frames = expr.shape[0]
    if frames == 0:
        raise FlameFileError(f"{path.name}: 'expr' has no frames")
    poses: dict[str, np.ndarray] = {}
    for name, width in POSE_FIELDS.items():
        arr = data.get(name)
        if arr is None:
            arr = np.zeros((frames, width), np.float32)
        elif arr.shape != (frames, width):
            raise FlameFileError(f"{path.name}: '{name}' must have shape [{frames}, {width}], got {list(arr.shape)}")
        poses[name] = arr.astype(np.float32)
    anim = FlameAnimation(expr.astype(np.float32), poses, data.get("shape"), expression_names.from_arrays(data, expr.shape[1], path.name))
    for name, arr in [("expr", anim.expr), *poses.items()]:
        if not np.isfinite(arr).all():
            raise FlameFileError(f"{path.name}: '{name}' holds NaN or Inf")
    if head_names is not None:
        expression_names.check(anim.expr_names, head_names, head, path.name)
    return anim


def write_flame_npz(path: str | Path, anim: FlameAnimation) -> Path:
    """Write the flame_param.npz layout (``shape`` included when known)."""
    path = Path(path)
    arrays = {"expr": anim.expr.astype(np.float32), **{k: v.astype(np.float32) for k, v in anim.poses.items()}}
    if anim.shape is not None:
        arrays["shape"] = np.asarray(anim.shape, np.float32)
    if anim.expr_names:
        arrays[expression_names.KEY] = expression_names.to_array(anim.expr_names)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def read_arkit_csv(
    path: str | Path, expr_names: Sequence[str], n_expr: int, fps: float, source_fps: float, head: str = "the avatar"
) -> tuple[FlameAnimation, tuple[str, ...]]:
    """A Live Link Face CSV as an animation at ``fps`` for an avatar with ``n_expr`` expressions
    named ``expr_names``: each ARKit weight on the expression of its name, the head's angles
    on the neck, the eyes' on the eye joints, every other channel zero (what ``spatialavatar
    arkit`` writes; ``arkit_csv`` says who owns which motion). Also returns
    the file's weights the avatar has no expression for. ``source_fps``: the recording's rate.
    """
    curves = arkit_csv.resample(arkit_csv.read_live_link_csv(path, source_fps), fps)
    channels = arkit_csv.flame_channels(curves, expr_names, n_expr, head)
    poses = {name: np.zeros((len(curves.seconds), width), np.float32) for name, width in POSE_FIELDS.items()}
    poses["neck_pose"] = channels.neck_pose
    poses["eyes_pose"] = channels.eyes_pose
    return FlameAnimation(channels.expr, poses, expr_names=tuple(expr_names)[:n_expr]), channels.missing


def keyframe_coords(values: np.ndarray, frame_start: float, frame_step: float) -> np.ndarray:
    """Flat (frame, value) pairs for ``keyframe_points.foreach_set("co", ...)``."""
    t = len(values)
    co = np.empty((t, 2), np.float32)
    co[:, 0] = frame_start + frame_step * np.arange(t, dtype=np.float64)
    co[:, 1] = values
    return co.ravel()


def frame_buffers(values: Mapping[str, Sequence[float]], expression_count: int) -> dict[str, np.ndarray]:
    """One frame of FLAME buffers ([1, k] float32), as ``deform`` and ``render`` take them.

    Args:
        values: ``expr_0``.. ``expr_{EXPR_CHUNKS-1}`` (chunks of EXPR_CHUNK) and every
            ``POSE_FIELDS`` entry, as the ``spatialavatar_flame`` group holds them.
        expression_count: how many expression coefficients the head uses.
    """
    chunks = [np.asarray(values[expr_chunk_name(c)], np.float32) for c in range(EXPR_CHUNKS)]
    # The service needs at least one coefficient; a head without expressions gets a zero.
    expr = np.concatenate(chunks)[:expression_count] if expression_count > 0 else np.zeros(1, np.float32)
    out = {"expr": expr[None]}
    for name, width in POSE_FIELDS.items():
        out[name] = np.asarray(values[name], np.float32).reshape(1, width)
    return out


def frame_step_for(file_fps: float, scene_fps: float) -> float:
    """Scene frames per file frame: a 25 fps file in a 50 fps scene steps by 2."""
    if file_fps <= 0 or scene_fps <= 0:
        raise ValueError("frame rates must be positive")
    return scene_fps / file_fps
