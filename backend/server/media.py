"""Checks of uploaded portraits and videos: decodable, within size limits, and what file suffix they need."""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from backend.server.config import RequestLimits
from backend.wire.protocol import ErrorCode, WireError

if TYPE_CHECKING:
    import av

# The video containers a tracker would read, by their leading bytes: (offset, magic, file
# suffix, FFmpeg demuxer). The demuxer is named when probing, so FFmpeg never guesses one
# from untrusted bytes.
_VIDEO_MAGIC = ((4, b"ftyp", ".mp4", "mov"), (0, b"\x1aE\xdf\xa3", ".mkv", "matroska"), (8, b"AVI ", ".avi", "avi"))
# Pillow's format names -> the file suffix the tracker reads them by.
_IMAGE_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "GIF": ".gif", "PPM": ".ppm"}


def image_suffix(data: bytes, name: str, max_pixels: int) -> str:
    """The file suffix of an encoded image, after decoding it completely; WireError otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise WireError(ErrorCode.TOO_LARGE, f"'{name}' is {w}x{h} pixels; at most {max_pixels} pixels")
                if im.format not in _IMAGE_SUFFIX:
                    raise WireError(
                        ErrorCode.INVALID_ARGUMENT, f"'{name}' is a {im.format} image; send PNG, JPEG, BMP, TIFF, WebP, GIF or PPM"
                    )
                im.load()
                suffix = _IMAGE_SUFFIX[im.format]
    except WireError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise WireError(ErrorCode.TOO_LARGE, f"'{name}' decodes to more than {max_pixels} pixels") from None
    except Exception as exc:  # pillow raises many kinds for bad input
        raise WireError(ErrorCode.INVALID_ARGUMENT, f"'{name}' is not a decodable image ({type(exc).__name__})") from None
    return suffix


def video_suffix(data: bytes, name: str, limits: RequestLimits) -> str:
    """The file suffix of a video upload, after probing it with PyAV: a container the tracker
    reads, holding a video stream whose first frame decodes, every frame there that its header
    promises, and a length and resolution within ``limits``; WireError otherwise."""
    for offset, magic, suffix, demuxer in _VIDEO_MAGIC:
        if data[offset : offset + len(magic)] == magic:
            break
    else:
        raise WireError(ErrorCode.INVALID_ARGUMENT, f"'{name}' is not an MP4, MOV, Matroska, WebM or AVI video")
    try:
        import av  # here, not at the top: a service that only renders needs no FFmpeg
    except ImportError:
        raise WireError(ErrorCode.NOT_AVAILABLE, "this service cannot read videos: PyAV is not installed beside it") from None
    try:
        with av.open(io.BytesIO(data), format=demuxer) as container:
            _probe(container, name, limits, av.time_base)
    except av.FFmpegError as exc:
        raise WireError(
            ErrorCode.INVALID_ARGUMENT, f"'{name}' cannot be read as a video ({type(exc).__name__}): it may be truncated or damaged"
        ) from None
    return suffix


def _probe(container: av.container.InputContainer, name: str, limits: RequestLimits, time_base: int) -> None:
    """``time_base``: units per second of the container's duration (FFmpeg's AV_TIME_BASE)."""
    if not container.streams.video:
        raise WireError(ErrorCode.INVALID_ARGUMENT, f"'{name}' has no video stream")
    stream = container.streams.video[0]
    w, h = stream.codec_context.width, stream.codec_context.height
    if max(w, h) > limits.max_video_side:
        raise WireError(ErrorCode.TOO_LARGE, f"'{name}' is {w}x{h} pixels; at most {limits.max_video_side} on a side")
    if min(w, h) < limits.min_video_side:
        raise WireError(ErrorCode.INVALID_ARGUMENT, f"'{name}' is {w}x{h} pixels; tracking needs {limits.min_video_side} on each side")
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    else:
        seconds = container.duration / time_base if container.duration else 0.0
    if seconds > limits.max_video_seconds:
        raise WireError(ErrorCode.TOO_LARGE, f"'{name}' lasts {seconds:.1f} s; at most {limits.max_video_seconds:g} s")
    decoded = False
    count = 0
    # Packets are counted, not decoded (the real frame count, cheaply), once one frame has come out.
    for packet in container.demux(stream):
        decoded = decoded or bool(packet.decode())
        if packet.size == 0 and packet.pts is None:  # PyAV's end-of-stream packet, which flushes the decoder
            continue
        count += 1
        if count > limits.max_video_frames:
            raise WireError(ErrorCode.TOO_LARGE, f"'{name}' has more than {limits.max_video_frames} frames")
    if not decoded:
        raise WireError(ErrorCode.INVALID_ARGUMENT, f"'{name}' has no frame that can be decoded")
    if count < stream.frames:
        raise WireError(ErrorCode.INVALID_ARGUMENT, f"'{name}' is truncated: its header lists {stream.frames} frames, {count} are there")


def blob(array: np.ndarray, name: str, max_bytes: int) -> bytes:
    """The bytes of an uploaded file buffer ([n] <u1), within ``max_bytes`` and not empty."""
    if array.size == 0:
        raise WireError(ErrorCode.INVALID_ARGUMENT, f"buffer '{name}' is empty")
    if array.size > max_bytes:
        raise WireError(ErrorCode.TOO_LARGE, f"buffer '{name}' has {array.size} bytes; at most {max_bytes}")
    return array.tobytes()
