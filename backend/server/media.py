"""Checks of uploaded portraits and videos: decodable, within size limits, and what file suffix they need."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from backend.server.protocol import ErrorCode, WireError

# Leading bytes of the video containers a tracker would read: (offset, magic, file suffix).
_VIDEO_MAGIC = ((4, b"ftyp", ".mp4"), (0, b"\x1aE\xdf\xa3", ".mkv"), (8, b"AVI ", ".avi"))
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


def video_suffix(data: bytes, name: str) -> str:
    """The file suffix of the container a video upload is, from its leading bytes; WireError when none fits."""
    for offset, magic, suffix in _VIDEO_MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return suffix
    raise WireError(ErrorCode.INVALID_ARGUMENT, f"'{name}' is not an MP4, MOV, Matroska, WebM or AVI video")


def blob(array: np.ndarray, name: str, max_bytes: int) -> bytes:
    """The bytes of an uploaded file buffer ([n] <u1), within ``max_bytes`` and not empty."""
    if array.size == 0:
        raise WireError(ErrorCode.INVALID_ARGUMENT, f"buffer '{name}' is empty")
    if array.size > max_bytes:
        raise WireError(ErrorCode.TOO_LARGE, f"buffer '{name}' has {array.size} bytes; at most {max_bytes}")
    return array.tobytes()
