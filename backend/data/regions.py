"""Image regions that metrics are taken in: the face as the convex hull of its landmarks.

numpy only (no OpenCV), so the same region is computed on every machine that scores.
"""

from __future__ import annotations

import numpy as np


def convex_hull(points: np.ndarray) -> np.ndarray:
    """[M, 2] vertices of the convex hull of [N, 2] points, counter-clockwise in (x, y) with
    y down (Andrew's monotone chain; collinear points dropped)."""
    pts = sorted(map(tuple, np.asarray(points, np.float64)))

    def cross(o: tuple, a: tuple, b: tuple) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple] = []
    upper: list[tuple] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])


def hull_mask(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """[height, width] bool: pixels whose centres lie inside the convex hull of [N, 2] points
    given in pixels ((0, 0) is the top-left pixel's corner, so its centre is (0.5, 0.5))."""
    hull = convex_hull(points)
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    inside = np.ones((height, width), bool)
    for a, c in zip(hull, np.roll(hull, -1, axis=0)):
        inside &= (c[0] - a[0]) * (yy - a[1]) - (c[1] - a[1]) * (xx - a[0]) >= 0
    return inside
