"""Reading user photos robustly: any common mode, EXIF orientation, clear errors.

Everything comes back as 8-bit sRGB ``[H, W, 3]`` arrays. Modes handled: RGB, RGBA / LA /
palette with transparency (composited on white), L, 1, P, CMYK, YCbCr, LAB, 16-bit and
32-bit integer greyscale (I;16, I), float (F) and 16-bit colour PNGs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.wire.errors import InputError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pnm", ".jfif"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts", ".mts"})
# A face needs roughly 100 px across for landmarks worth fitting; a whole image smaller than this cannot hold one.
MIN_IMAGE_SIDE = 64
# Refuse absurd images before decoding them (Pillow's own bomb check is a warning below 2x this).
MAX_PIXELS = 300_000_000


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def is_video_path(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def to_rgb8(im: Image.Image) -> np.ndarray:
    """Any Pillow image -> [H, W, 3] uint8 RGB (transparent parts composited on white)."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode == "F":
            hi = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        elif mode == "I":
            # 32-bit integer images mostly hold 16-bit data (Pillow reads 16-bit PNGs so on some versions).
            hi = 65535.0 if a.size and a.max() > 255 else 255.0
        else:
            hi = 65535.0
        g = np.clip(np.nan_to_num(a) / hi, 0.0, 1.0)
        g8 = (g * 255.0 + 0.5).astype(np.uint8)
        return np.repeat(g8[..., None], 3, axis=2)
    if mode.startswith(("RGB;16", "RGBA;16", "RGBX;16")) or mode in ("RGB;16B", "RGBA;16B"):
        im = im.convert("RGBA" if "A" in mode else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode == "CMYK":
        # Adobe writes inverted CMYK JPEGs; Pillow undoes that when it reads them.
        return np.asarray(im.convert("RGB"))
    return np.asarray(im.convert("RGB"))


def load_image(path: str | Path, min_side: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """Read a photo as [H, W, 3] uint8 RGB, upright (EXIF orientation applied).

    Raises InputError naming the file when it is missing, not an image, damaged, too small
    or absurdly large.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise InputError(f"{path}: {im.width}x{im.height} pixels is too large (limit {MAX_PIXELS // 1_000_000} megapixels); downscale it first")
                im.load()
                im = ImageOps.exif_transpose(im) or im
                rgb = to_rgb8(im)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{path}: image too large to decode safely ({exc}); downscale it first") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{path}: not an image Pillow can read (unknown format or not an image at all)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: damaged or truncated image ({exc})") from exc
    h, w = rgb.shape[:2]
    if min(h, w) < min_side:
        raise InputError(f"{path}: image is only {w}x{h} pixels; a face needs at least {min_side} px on the short side (use a larger photo)")
    return np.ascontiguousarray(rgb)


def check_frame(rgb: np.ndarray, source: str, min_side: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """Validate an in-memory frame (video or caller-supplied) the same way as a file."""
    a = np.asarray(rgb)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise InputError(f"{source}: expected an [H, W, 3] image, got shape {list(a.shape)}")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating):
            a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
        elif a.dtype == np.uint16:
            a = (a.astype(np.float64) / 65535.0 * 255 + 0.5).astype(np.uint8)
        else:
            a = np.clip(a, 0, 255).astype(np.uint8)
    a = a[..., :3]
    if min(a.shape[:2]) < min_side:
        raise InputError(f"{source}: frame is only {a.shape[1]}x{a.shape[0]} pixels; need at least {min_side} px on the short side")
    return np.ascontiguousarray(a)
