"""Preview images of a tracked frame: landmarks, the fitted mesh over the photo, the mask."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from backend.render.mesh_preview import rasterize, render_mesh

DETECTED = (60, 220, 60)  # mediapipe's landmarks (as iBUG targets), green
FITTED = (235, 40, 40)  # the fitted model's landmarks, red


def _label(img: np.ndarray, text: str) -> None:
    scale = max(img.shape[0] / 700.0, 0.4)
    thick = max(1, int(round(scale * 2)))
    cv2.putText(img, text, (int(10 * scale), int(28 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(img, text, (int(10 * scale), int(28 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)


def _dots(img: np.ndarray, pts: np.ndarray, colour: tuple[int, int, int], r: int) -> None:
    for x, y in np.asarray(pts, np.float64):
        if np.isfinite(x) and np.isfinite(y):
            cv2.circle(img, (int(round(x * 16)), int(round(y * 16))), r * 16, colour, -1, cv2.LINE_AA, shift=4)


def landmark_panel(rgb: np.ndarray, detected: np.ndarray, fitted: np.ndarray, mesh_points: np.ndarray | None = None, zoom: bool = True) -> np.ndarray:
    """All 478 mediapipe points (small, grey), the iBUG + iris targets (green) and the fit (red).

    With ``zoom`` the panel shows the face only (a square around the landmarks, resized to the
    crop's size) so that the dots can be told apart.
    """
    h, w = rgb.shape[:2]
    pts = [np.asarray(p, np.float64)[:, :2] for p in (detected, fitted)] + ([np.asarray(mesh_points)[:, :2]] if mesh_points is not None else [])
    img = rgb.copy()
    if zoom:
        allp = np.concatenate(pts)
        lo, hi = allp.min(0), allp.max(0)
        c, half = (lo + hi) / 2, 0.58 * float((hi - lo).max())
        x0, y0 = c - half
        scale = w / (2 * half)
        M = np.array([[scale, 0, -x0 * scale], [0, scale, -y0 * scale]])
        img = cv2.warpAffine(rgb, M, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
        pts = [(p - [x0, y0]) * scale for p in pts]
    r = max(1, int(round(h / 160)))
    if mesh_points is not None:
        _dots(img, pts[2], (215, 215, 215), max(1, r // 2))
    _dots(img, pts[0], DETECTED, r + 1)
    _dots(img, pts[1], FITTED, r)
    _label(img, "landmarks: detected (green), fitted (red)")
    return img


def mesh_panel(rgb: np.ndarray, vertices: np.ndarray, faces: np.ndarray, K: np.ndarray, world_to_cam: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """The fitted mesh, shaded, blended over the crop."""
    h, w = rgb.shape[:2]
    base = rgb.astype(np.float64) / 255.0
    shaded = render_mesh(vertices, faces, K, world_to_cam, w, h, background=base, wireframe=(0.15, 0.15, 0.2), wire_px=0.35).astype(np.float64) / 255.0
    hit = (rasterize(vertices, faces, K, world_to_cam, w, h)[0] >= 0)[..., None]
    out = np.where(hit, opacity * shaded + (1 - opacity) * base, base)
    img = (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
    _label(img, "fitted mesh")
    return img


def mask_panel(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The crop composited on a checkerboard through the mask."""
    h, w = mask.shape
    tile = max(8, h // 32)
    yy, xx = np.mgrid[0:h, 0:w]
    checker = np.where(((yy // tile) + (xx // tile)) % 2 == 0, 0.85, 0.65)[..., None]
    m = mask[..., None].astype(np.float64)
    out = rgb.astype(np.float64) / 255.0 * m + checker * (1 - m)
    img = (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
    _label(img, "mask")
    return img


def preview_strip(panels: list[np.ndarray], gap: int = 4) -> np.ndarray:
    h = max(p.shape[0] for p in panels)
    w = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.full((h, w, 3), 255, np.uint8)
    x = 0
    for p in panels:
        out[: p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def stack_rows(rows: list[np.ndarray], gap: int = 4) -> np.ndarray:
    w = max(r.shape[1] for r in rows)
    h = sum(r.shape[0] for r in rows) + gap * (len(rows) - 1)
    out = np.full((h, w, 3), 255, np.uint8)
    y = 0
    for r in rows:
        out[y : y + r.shape[0], : r.shape[1]] = r
        y += r.shape[0] + gap
    return out


def save_png(img: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path
