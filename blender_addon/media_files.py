"""Portraits, photos and videos picked in Blender -> upload buffers (no bpy, no image decoding).

The service decodes every upload completely and answers a clear error for anything it
cannot read; these checks only catch, before any bytes travel, what the add-on can tell
from the file itself: a missing path, an empty file, a file that is not an image or video
container at all, or the wrong number of files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import connection

ops = connection.wire_operations


class MediaError(ValueError):
    """A picked file that cannot be sent; the message names the file."""


@dataclass(frozen=True)
class MediaLimits:
    """How many files each operation takes (the operations' own limits) and how large one may
    be (the service's default)."""

    max_portraits: int = ops.Generate.max_portraits
    max_photos: int = ops.Track.max_images
    max_bytes: int = 256 * 1024 * 1024


LIMITS = MediaLimits()

# Leading bytes of the image formats the service reads (PNG, JPEG, BMP, TIFF, WebP, GIF, PPM).
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"GIF87a", b"GIF89a", b"P6")
# (offset, magic) of the video containers: MP4/MOV, Matroska/WebM, AVI.
_VIDEO_MAGIC = ((4, b"ftyp"), (0, b"\x1aE\xdf\xa3"), (8, b"AVI "))
IMAGE_GLOB = "*.png;*.jpg;*.jpeg;*.bmp;*.tif;*.tiff;*.webp;*.gif;*.ppm"
VIDEO_GLOB = "*.mp4;*.mov;*.mkv;*.webm;*.avi"


def _read(path: str | Path, limits: MediaLimits) -> bytes:
    p = Path(path)
    if not str(path):
        raise MediaError("no file given")
    if not p.is_file():
        raise MediaError(f"{p.name or path}: no such file")
    size = p.stat().st_size
    if size == 0:
        raise MediaError(f"{p.name}: the file is empty")
    if size > limits.max_bytes:
        raise MediaError(f"{p.name}: {size} bytes; at most {limits.max_bytes}")
    return p.read_bytes()


def is_image(head: bytes) -> bool:
    return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def is_video(head: bytes) -> bool:
    return any(head[o : o + len(m)] == m for o, m in _VIDEO_MAGIC)


def _image(path: str | Path, data: bytes) -> np.ndarray:
    if not is_image(data[:16]):
        raise MediaError(f"{Path(path).name}: not an image (PNG, JPEG, BMP, TIFF, WebP, GIF or PPM)")
    return np.frombuffer(data, np.uint8)


def read_image(path: str | Path, limits: MediaLimits = LIMITS) -> np.ndarray:
    """The file's bytes as an [n] uint8 buffer, after checking that it is an image file."""
    return _image(path, _read(path, limits))


def check_count(count: int, most: int, what: str) -> None:
    if not 1 <= count <= most:
        raise MediaError(f"pick 1 to {most} {what} (got {count})")


def portrait_buffers(paths: list[str], limits: MediaLimits = LIMITS) -> dict[str, np.ndarray]:
    """``portrait0`` .. ``portrait3`` for ``generate``."""
    check_count(len(paths), limits.max_portraits, "portraits")
    return {f"portrait{i}": read_image(p, limits) for i, p in enumerate(paths)}


def capture_buffers(paths: list[str], limits: MediaLimits = LIMITS) -> dict[str, np.ndarray]:
    """For ``track``: one ``video``, or photos as ``image0``, ``image1``, ..."""
    check_count(len(paths), limits.max_photos, "photos (or one video)")
    buffers: dict[str, np.ndarray] = {}
    for i, p in enumerate(paths):
        data = _read(p, limits)
        if is_video(data[:16]):
            if len(paths) > 1:
                raise MediaError(f"{Path(p).name}: a video; pick one video alone, or photos")
            return {"video": np.frombuffer(data, np.uint8)}
        buffers[f"image{i}"] = _image(p, data)
    return buffers
