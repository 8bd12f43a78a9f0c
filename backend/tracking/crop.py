"""Square head crops, the intrinsics that go with them, and foreground masks.

A crop is an integer square (x0, y0, side) in source pixels, resized to ``size``; a source
pixel coordinate u maps to (u - x0) * size / side in the crop (pixel edges onto pixel edges),
so intrinsics follow exactly. Parts of the square outside the source image are filled with
the subject background and masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from backend.data.subject import inside_source
from backend.wire.errors import InputError


@dataclass(frozen=True)
class CropConfig:
    """Where the square crop goes, relative to the face's landmarks.

    Attributes:
        size: output width and height in pixels.
        scale: crop side as a multiple of the landmark box's longer side (forehead to chin).
        lift: centre moved up by this fraction of the landmark box (keeps hair, trims shoulders).
        smooth: for sequences, half-width in frames of the moving average over crop boxes.
        neck: the mask keeps this many landmark-box heights below the chin (fading out after).
    """

    size: int = 512
    scale: float = 1.9
    lift: float = 0.12
    smooth: int = 4
    neck: float = 0.35

    def check(self) -> None:
        if not 64 <= self.size <= 4096:
            raise InputError(f"--size must be in [64, 4096], got {self.size}")


def face_frame(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre [2] and size (longer side of the landmark box) of a face's 478 landmarks."""
    p = np.asarray(points)[:, :2]
    lo, hi = p.min(axis=0), p.max(axis=0)
    return 0.5 * (lo + hi), float((hi - lo).max())


def crop_boxes(points: np.ndarray, config: CropConfig, sequence_groups: list[np.ndarray] | None = None) -> np.ndarray:
    """[B, 478, 2+] landmarks -> [B, 3] integer squares (x0, y0, side).

    Frames listed together in ``sequence_groups`` (one array of frame indices per video or
    folder) get their box centres and sides smoothed over time, so the crop does not jitter.
    """
    b = len(points)
    raw = np.zeros((b, 3))
    for i in range(b):
        c, s = face_frame(points[i])
        raw[i] = (c[0], c[1] - config.lift * s, config.scale * s)
    if sequence_groups:
        for idx in sequence_groups:
            if len(idx) > 2 and config.smooth > 0:
                raw[idx] = _moving_average(raw[idx], config.smooth)
    out = np.zeros((b, 3), np.int64)
    side = np.maximum(np.round(raw[:, 2]), 16).astype(np.int64)
    out[:, 0] = np.round(raw[:, 0] - side / 2.0)
    out[:, 1] = np.round(raw[:, 1] - side / 2.0)
    out[:, 2] = side
    return out


def _moving_average(x: np.ndarray, half: int) -> np.ndarray:
    n = len(x)
    out = np.empty_like(x)
    for i in range(n):
        lo, hi = max(0, i - half), min(n, i + half + 1)
        out[i] = x[lo:hi].mean(axis=0)
    return out


def crop_image(rgb: np.ndarray, box: np.ndarray, size: int, fill: tuple[int, int, int] = (255, 255, 255)) -> tuple[np.ndarray, np.ndarray]:
    """Cut and resize the square; returns the crop [size, size, 3] uint8 and its in-image mask [size, size] bool."""
    x0, y0, side = (int(v) for v in box)
    h, w = rgb.shape[:2]
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = fill
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = rgb[sy0:sy1, sx0:sx1, :3]
    img = np.asarray(Image.fromarray(canvas).resize((size, size), Image.LANCZOS))
    return img, inside_source((x0, y0, side), (w, h), size)


def crop_intrinsics(K: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Source intrinsics [..., 3, 3] -> the crop's."""
    x0, y0, side = (float(v) for v in box)
    s = size / side
    out = np.array(K, np.float64, copy=True)
    out[..., 0, :] *= s
    out[..., 1, :] *= s
    out[..., 0, 2] -= x0 * s
    out[..., 1, 2] -= y0 * s
    return out


def to_crop(points: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Source pixel points [..., 2] -> crop pixels."""
    x0, y0, side = (float(v) for v in box)
    p = np.asarray(points, np.float64)[..., :2]
    return (p - np.array([x0, y0])) * (size / side)


def mesh_silhouette(vertices: np.ndarray, faces: np.ndarray, K: np.ndarray, world_to_cam: np.ndarray, size: int) -> np.ndarray:
    """[size, size] bool: where the mesh's triangles project (no depth test needed for a silhouette)."""
    import cv2  # half a second to import: only tracking draws masks, so commands that do not track skip it

    cam = vertices @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    z = cam[:, 2]
    uv = cam[:, :2] / np.maximum(z, 1e-6)[:, None] @ K[:2, :2].T + K[:2, 2]
    tri = faces[(z[faces] > 1e-6).all(axis=1)]
    # Pixel centres sit at +0.5: shift by half a pixel so cv2's integer grid lines up.
    poly = np.round((uv[tri] - 0.5) * 16).astype(np.int32)
    img = np.zeros((size, size), np.uint8)
    cv2.fillPoly(img, list(poly), 255, lineType=cv2.LINE_8, shift=4)
    return img > 0


def head_mask(
    person: np.ndarray, points_crop: np.ndarray, valid: np.ndarray, config: CropConfig, silhouette: np.ndarray | None = None
) -> np.ndarray:
    """Foreground mask of the head in a crop, float in [0, 1].

    The person segmentation, united with the convex hull of the face landmarks (the face is
    always foreground) and kept within the source image. Shoulders and clothes are not part of
    a head model: above the mouth everything the segmentation calls person stays (hair, ears);
    below it only what lies near the fitted mesh's silhouette (jaw, neck) when it is given;
    and everything fades out a little below the chin (``config.neck``).
    """
    import cv2  # imported here, as in mesh_silhouette

    size = person.shape[0]
    m = np.clip(person.astype(np.float32), 0.0, 1.0)
    hull = cv2.convexHull(np.round(points_crop[:, :2] * 16).astype(np.int32))
    face = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(face, hull, 255, lineType=cv2.LINE_AA, shift=4)
    face_f = face.astype(np.float32) / 255.0
    # Along the face's own down axis (forehead 10 -> chin 152), in face heights past the chin.
    top, chin = points_crop[10, :2], points_crop[152, :2]
    axis = chin - top
    length = float(np.linalg.norm(axis))
    if length > 1e-6:
        axis = axis / length
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        along = ((xx - chin[0]) * axis[0] + (yy - chin[1]) * axis[1]) / length
        if silhouette is not None:
            radius = max(1, int(round(0.04 * length)))
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
            near = cv2.dilate(silhouette.astype(np.uint8), kernel).astype(np.float32)
            near = cv2.GaussianBlur(near, (0, 0), max(radius / 2.0, 0.5))
            lower = np.clip((along + 0.35) / 0.1, 0.0, 1.0)  # 0 above the mouth, 1 from the lower lip down
            m = m * (1.0 - lower + lower * near)
        fade = 0.15
        m *= np.clip((config.neck + fade - along) / fade, 0.0, 1.0)
    m = np.maximum(m, face_f)
    m *= valid.astype(np.float32)
    return np.clip(m, 0.0, 1.0)
