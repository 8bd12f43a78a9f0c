"""Converting the IMavatar / SplattingAvatar monocular benchmark layout into a subject.

That layout (one folder per subject and sequence):

    flame_params.json   intrinsics [fx, fy, cx, cy] as fractions of the image size,
                        shape_params [100], frames: [{file_path, world_mat [3x4], expression [50],
                        pose [15] = global 3, neck 3, jaw 3, eyes 6, bbox, ...}]
    image/N.png         RGB frames (file_path + ".png")
    mask/N.png          foreground masks

Its FLAME is scaled by 4 and its cameras use the OpenGL-style axes (y up, z backward), so
a camera's translation is divided by 4 and its y and z rows are negated to reach our
metres and OpenCV axes. The benchmark tests on the last 350 frames.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from backend.data.subject import SubjectInfo, write_frame, write_subject
from backend.head.params import FlameParams
from backend.wire.errors import InputError

IMAVATAR_SCALE = 4.0
BENCHMARK_TEST_FRAMES = 350


def _read(path: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise InputError(f"missing file {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"unreadable image {path} ({exc})") from exc


def convert_imavatar(
    folder: str | Path, out: str | Path, test_frames: int = BENCHMARK_TEST_FRAMES, head_model: str = "flame2020", progress: Callable[[int, int], None] | None = None
) -> Path:
    """Write the subject for an IMavatar-layout folder; returns the subject folder."""
    folder = Path(folder)
    meta_path = folder / "flame_params.json"
    if not meta_path.is_file():
        raise InputError(f"{folder}: no flame_params.json; is this an IMavatar-preprocessed sequence?")
    try:
        meta = json.loads(meta_path.read_text())
        frames = meta["frames"]
        fx, fy, cx, cy = (abs(float(v)) for v in meta["intrinsics"])
        shape = np.asarray(meta["shape_params"], np.float32).reshape(-1)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{meta_path}: malformed ({type(exc).__name__}: {exc})") from exc
    if not frames:
        raise InputError(f"{meta_path}: no frames")
    t = len(frames)
    try:
        expr = np.stack([np.asarray(f["expression"], np.float32) for f in frames])
        pose = np.stack([np.asarray(f["pose"], np.float32) for f in frames])
        w2c_gl = np.stack([np.asarray(f["world_mat"], np.float32).reshape(3, 4) for f in frames])
    except (KeyError, ValueError) as exc:
        raise InputError(f"{meta_path}: a frame lacks expression, pose or world_mat of the expected size ({exc})") from exc
    if pose.shape[1] != 15:
        raise InputError(f"{meta_path}: pose has {pose.shape[1]} values per frame, expected 15")
    first = folder / (frames[0]["file_path"] + ".png")
    h, w = _read(first, "RGB").shape[:2]
    w2c = np.tile(np.eye(4, dtype=np.float32), (t, 1, 1))
    w2c[:, :3, :4] = w2c_gl
    w2c[:, 1:3, :] *= -1.0  # OpenGL-style camera axes -> OpenCV
    w2c[:, :3, 3] /= IMAVATAR_SCALE
    K = np.array([[fx * w, 0, cx * w], [0, fy * h, cy * h], [0, 0, 1]], np.float32)
    params = FlameParams.from_numpy_dict(
        {
            "shape": shape,
            "expr": expr,
            "rotation": pose[:, 0:3],
            "neck_pose": pose[:, 3:6],
            "jaw_pose": pose[:, 6:9],
            "eyes_pose": pose[:, 9:15],
            "translation": np.zeros((t, 3), np.float32),
        },
        source=str(meta_path),
    )
    n_test = min(test_frames, max(t - 1, 0))
    out = Path(out)
    info = SubjectInfo(
        name=out.name,
        width=w,
        height=h,
        num_frames=t,
        num_cameras=1,
        background=(1.0, 1.0, 1.0),
        split={"train": list(range(t - n_test)), "test": list(range(t - n_test, t))},
        head_model=head_model,
        source="imavatar",
        extra={"converted_from": folder.name},
    )
    write_subject(out, info, params, torch.from_numpy(np.broadcast_to(K, (t, 1, 3, 3)).copy()), torch.from_numpy(w2c[:, None]))
    for i, f in enumerate(frames):
        image_path = folder / (f["file_path"] + ".png")
        mask_path = image_path.parent.parent / "mask" / image_path.name
        rgb, mask = _read(image_path, "RGB"), _read(mask_path, "L")
        if rgb.shape[:2] != (h, w) or mask.shape != (h, w):
            raise InputError(f"{image_path}: frame or mask size differs from the first frame's {w}x{h}")
        write_frame(out, i, 0, rgb, mask)
        if progress:
            progress(i + 1, t)
    return out
