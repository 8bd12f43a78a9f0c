"""Cropped ``render`` replies: a reply asked with ``crop`` carries only the window of the frame
where the avatar is, and ``result["window"]``; ``full_frame`` puts it back in the whole frame.

Pure numpy (the Blender add-on carries this module): no torch, no bpy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .protocol import ErrorCode, WireError


def full_frame(arrays: Mapping[str, np.ndarray], result: Mapping[str, Any], width: int, height: int) -> dict[str, np.ndarray]:
    """Each [h, w, ...] buffer of a reply placed at its window in a zero [height, width, ...]
    frame (pixels, origin top-left); a reply without a window is returned as it is.
    Raises WireError when the window does not fit the frame or the buffers."""
    window = result.get("window")
    if window is None:
        return dict(arrays)
    if not (isinstance(window, list) and len(window) == 4 and all(type(v) is int and v >= 0 for v in window)):
        raise WireError(ErrorCode.MALFORMED, f"'window' must be [x, y, w, h] of non-negative integers, got {window!r}"[:200])
    x, y, w, h = window
    if x + w > width or y + h > height:
        raise WireError(ErrorCode.MALFORMED, f"window {window} does not fit a {width}x{height} frame")
    frames = {}
    for name, a in arrays.items():
        if a.shape[:2] != (h, w):
            raise WireError(ErrorCode.MALFORMED, f"buffer '{name}' is {list(a.shape[:2])}, its window {h}x{w}")
        full = np.zeros((height, width, *a.shape[2:]), a.dtype)
        full[y : y + h, x : x + w] = a
        frames[name] = full
    return frames
