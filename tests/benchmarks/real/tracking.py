"""Tracking stage (CPU, mediapipe) and the compact packs that carry subjects to the GPU machine.

A pack is one tar per subject: subject.json, flame_param.npz, cameras.npz, landmarks.npz,
frames as JPEG and masks as PNG. ``unpack`` turns it back into a subject folder with PNG
frames (the decoded JPEGs), so every method is scored against the same pixels.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tests.benchmarks.real.data import Clip, Layout, PhotoSet, clip_stride
from tests.benchmarks.real.protocol import Protocol

TRACK_SUMMARY = "track_summary.json"
SUBJECT_FILES = ("subject.json", "flame_param.npz", "cameras.npz", "landmarks.npz", TRACK_SUMMARY)


def _track(inputs: list[Path], out: Path, head: str | None, protocol: Protocol, stride: int, log) -> dict:  # type: ignore[no-untyped-def]
    from backend.head.registry import load_head_model
    from backend.tracking import TrackConfig, track
    from backend.tracking.crop import CropConfig
    from backend.tracking.video import FrameRange

    config = TrackConfig(crop=CropConfig(size=protocol.size), frames=FrameRange(stride=stride))
    t0 = time.perf_counter()
    result = track([str(p) for p in inputs], out, load_head_model(head), config, warn=lambda m: log(f"  warning: {m}"))
    summary = result.summary() | {"stride": stride, "wall_seconds": round(time.perf_counter() - t0, 1)}
    (out / TRACK_SUMMARY).write_text(json.dumps(summary, indent=1))
    return summary


def track_clip(clip: Clip, layout: Layout, protocol: Protocol, log) -> dict:  # type: ignore[no-untyped-def]
    """Track one clip into ``subjects/<clip>`` (skipped when done); its tracking summary."""
    out = layout.subjects / clip.name
    if (out / TRACK_SUMMARY).is_file():
        return json.loads((out / TRACK_SUMMARY).read_text())
    manifest = {e["file"]: e for e in json.loads(layout.manifest.read_text())["files"]}
    frames = manifest[clip.file.local_name]["frames"]
    return _track([layout.media / clip.file.local_name], out, layout.head, protocol, clip_stride(frames, protocol.max_frames), log)


def track_photos(photos: PhotoSet, layout: Layout, protocol: Protocol, log) -> dict:  # type: ignore[no-untyped-def]
    """Track one person's photos together (one identity, a pose and focal length per photo)."""
    out = layout.subjects / photos.name
    if (out / TRACK_SUMMARY).is_file():
        return json.loads((out / TRACK_SUMMARY).read_text())
    return _track([layout.media / f.local_name for f in photos.files], out, layout.head, protocol, 1, log)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def pack(subject_dir: Path, dest: Path, quality: int) -> Path:
    """One tar with the subject's arrays, JPEG frames and PNG masks."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w") as tar:
        for name in SUBJECT_FILES:
            if (subject_dir / name).is_file():
                tar.add(subject_dir / name, arcname=name)
        for png in sorted((subject_dir / "images").glob("*.png")):
            buf = io.BytesIO()
            with Image.open(png) as im:
                im.convert("RGB").save(buf, "JPEG", quality=quality)
            _add(tar, f"images/{png.stem}.jpg", buf.getvalue())
        for png in sorted((subject_dir / "masks").glob("*.png")):
            tar.add(png, arcname=f"masks/{png.name}")
    return dest


def unpack(pack_file: Path, dest: Path) -> Path:
    """A subject folder from a pack (frames decoded to PNG); skipped when already there."""
    if (dest / "subject.json").is_file():
        return dest
    (dest / "images").mkdir(parents=True, exist_ok=True)
    with tarfile.open(pack_file) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member)
            if data is None:
                continue
            name = Path(member.name)
            if name.parent.name == "images":
                rgb = np.asarray(Image.open(io.BytesIO(data.read())).convert("RGB"))
                Image.fromarray(rgb).save(dest / "images" / f"{name.stem}.png", compress_level=1)
            else:
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                (dest / name).write_bytes(data.read())
    return dest
