"""The skin as a grid of rays from one centre, with slits cut for the mouth and eyelids.

The skin is star-shaped from ``HeadSpec.centre``: grid vertex (row i, column j) lies where
the ray with polar angle theta (from +y) and azimuth phi (0 = +z, +pi/2 = +x) leaves the
head. Rows run from just below the crown pole down to the open bottom of the neck; columns
go around the head starting at the back seam. Rows and columns are spread by weighted
arc length so the face and ears get most vertices. The mouth is a slit along one row; each
eye is a slit along another row whose two sides are pulled apart, in the rays' polar
angle, into an almond opening that shows the eyeball behind it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from backend.head.builtin.features import FaceShape, smooth_max, smoothstep
from backend.head.builtin.spec import HeadSpec

# An implicit solid: [N, 3] points -> [N] values, negative inside.
Solid = Callable[[np.ndarray], np.ndarray]
# A row target for ``_bend_rows``: (row, target height of x, weight per column, limit in radians).
RowAnchor = tuple[int, Callable[[np.ndarray], np.ndarray], np.ndarray, float]


def ray_dirs(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """[..., 3] unit directions for polar angle theta (from +y) and azimuth phi (from +z toward +x)."""
    theta, phi = np.broadcast_arrays(theta, phi)
    st = np.sin(theta)
    return np.stack([st * np.sin(phi), np.cos(theta), st * np.cos(phi)], axis=-1)


def _exit_distance(solid: Solid, centre: np.ndarray, dirs: np.ndarray, t_max: float = 0.34, steps: int = 56, iters: int = 16) -> np.ndarray:
    """[N] distance along each ray where it last leaves ``solid`` (implicit, negative inside);
    0 for rays that never are inside. A coarse march finds the last crossing, bisection refines it."""
    if len(dirs) == 0:
        return np.zeros(0)
    ts = np.linspace(0.0, t_max, steps)
    g = solid((centre + ts[:, None, None] * dirs[None]).reshape(-1, 3)).reshape(steps, -1)
    inside = g < 0
    last = steps - 1 - np.argmax(inside[::-1], axis=0)
    lo = ts[last]
    hi = ts[np.minimum(last + 1, steps - 1)]
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        out = solid(centre + mid[:, None] * dirs) >= 0
        hi = np.where(out, mid, hi)
        lo = np.where(out, lo, mid)
    return np.where(inside.any(axis=0), 0.5 * (lo + hi), 0.0)


def _exit_where(solid: Solid, centre: np.ndarray, dirs: np.ndarray, use: np.ndarray) -> np.ndarray:
    """``_exit_distance`` for the rays in ``use``; 0 elsewhere (rays that solid cannot matter for)."""
    out = np.zeros(len(dirs))
    out[use] = _exit_distance(solid, centre, dirs[use])
    return out


def skin_radius(shape: FaceShape, dirs: np.ndarray, ears: bool = True) -> np.ndarray:
    """[N] distance from the centre to the skin along unit rays [N, 3]."""
    c = np.asarray(shape.spec.centre)
    # Rays that point away from a solid leave it deep inside the cranium, so skip them.
    jaw = _exit_where(shape.jaw, c, dirs, dirs[:, 1] < 0.6)
    neck = _exit_where(shape.neck, c, dirs, dirs[:, 1] < 0.2)
    face = _exit_where(shape.face, c, dirs, dirs[:, 2] > -0.1)
    r = smooth_max(_exit_distance(shape.cranium, c, dirs), jaw, 0.02)
    r = smooth_max(r, neck, 0.02)
    r = smooth_max(r, face, 0.008)
    if ears:
        r = r + shape.ear_relief(c + r[:, None] * dirs)
    return r


def _inverse_cdf(x: np.ndarray, density: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Positions where the running integral of ``density`` over ``x`` (normalised) hits ``targets``."""
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(x))])
    return np.interp(targets, cdf / cdf[-1], x)


@dataclass(frozen=True)
class SkinGrid:
    """Ray directions of the skin grid and where its slits are.

    Attributes:
        theta: [R, C] polar angle of each grid vertex (radians); constant along a row except
            near the slit rows, which bend to run level across the face.
        phi: [R, C] azimuth of each grid vertex (radians); column C/2 is the midline front.
        eye_row / mouth_row: row of the eyelid and lip slits.
        eye_cols: (inner, outer) corner columns of the left eye; the right eye is mirrored.
        mouth_cols: (right, left) corner columns of the mouth.
    """

    theta: np.ndarray
    phi: np.ndarray
    eye_row: int
    mouth_row: int
    eye_cols: tuple[int, int]
    mouth_cols: tuple[int, int]

    @property
    def rows(self) -> int:
        return int(self.theta.shape[0])

    @property
    def cols(self) -> int:
        return int(self.phi.shape[1])

    def mirror_col(self, j: np.ndarray | int) -> np.ndarray | int:
        return (self.cols - j) % self.cols


def _polar(spec: HeadSpec, point: tuple[float, float, float]) -> tuple[float, float]:
    d = np.asarray(point) - np.asarray(spec.centre)
    return float(np.arccos(d[1] / np.linalg.norm(d))), float(np.arctan2(d[0], d[2]))


def eye_slit_point(spec: HeadSpec, x: float) -> tuple[float, float, float]:
    """Point on the lid sphere at lateral position x on the closed-lid line (left eye)."""
    ex, ey, ez = spec.eye_centre
    y = ey - spec.lid_slit_drop
    r = spec.eye_radius + spec.lid_gap
    return (x, y, ez + float(np.sqrt(max(r**2 - (x - ex) ** 2 - (y - ey) ** 2, 0.0))))


def build_grid(spec: HeadSpec, shape: FaceShape) -> SkinGrid:
    """Place rows and columns: uniform in weighted arc length, slit rows on their features."""
    theta_max = np.radians(spec.theta_max_deg)
    eye_theta, _ = _polar(spec, eye_slit_point(spec, spec.eye_centre[0]))
    mouth_theta, _ = _polar(spec, (0.0, spec.stomion[0], spec.stomion[1]))
    # Meridian arc length of the skin without ears, averaged over the front and the sides.
    th = np.linspace(1e-3, theta_max, 240)
    ph = np.radians(np.linspace(-100, 100, 7))
    r = skin_radius(shape, ray_dirs(th[:, None], ph[None]).reshape(-1, 3), ears=False).reshape(len(th), len(ph))
    ds = np.sqrt(r**2 + np.gradient(r, th, axis=0) ** 2).mean(axis=1)
    face_band = smoothstep(np.radians(55), np.radians(72), th) * smoothstep(np.radians(150), np.radians(135), th)
    detail = np.exp(-(((th - eye_theta) / np.radians(9)) ** 2)) + np.exp(-(((th - mouth_theta) / np.radians(9)) ** 2))
    density = ds * (0.55 + 1.2 * face_band + 0.9 * detail)
    anchors = [1e-3, eye_theta, mouth_theta, theta_max]
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(th))])
    share = np.diff(np.interp(anchors, th, cdf))
    counts = np.round(share / share.sum() * spec.rows).astype(int)
    counts[-1] = spec.rows - counts[:-1].sum()
    theta = []
    for k in range(3):
        seg = (th >= anchors[k]) & (th <= anchors[k + 1])
        t = np.arange(1, counts[k] + 1) / counts[k]
        theta.append(_inverse_cdf(th[seg], density[seg], t))
    theta = np.concatenate(theta)
    theta[-1] = theta_max
    eye_row = counts[0] - 1
    mouth_row = counts[0] + counts[1] - 1
    theta[eye_row], theta[mouth_row] = eye_theta, mouth_theta
    phi = _columns(spec, theta)
    theta = np.repeat(theta[:, None], spec.columns, axis=1)
    # A row of constant polar angle rises where the face falls back. Bend the slit rows so the
    # lips meet on a level line and the eyes' outer corners sit a little higher, and put a
    # row on each vermilion border so the lip outlines follow grid lines.
    ym = spec.stomion[0]
    corner_phi = _polar(spec, (spec.mouth_half_width, spec.stomion[0], spec.stomion[1] - 0.012))[1]
    mouth_w = smoothstep(corner_phi + np.radians(14), corner_phi + np.radians(1), np.abs(phi[mouth_row]))
    midline = spec.columns // 2
    centre = np.asarray(spec.centre)

    def row_near(y: float, rows: np.ndarray) -> int:
        d = ray_dirs(theta[rows, midline], phi[rows, midline])
        py = centre[1] + skin_radius(shape, d, ears=False) * d[:, 1]
        return int(rows[np.argmin(np.abs(py - y))])

    upper_row = row_near(ym + float(shape.lip_heights(np.zeros(1))[0][0]), np.arange(mouth_row - 8, mouth_row - 1))
    lower_row = row_near(ym - float(shape.lip_heights(np.zeros(1))[1][0]), np.arange(mouth_row + 2, mouth_row + 9))
    theta = _bend_rows(
        shape,
        theta,
        phi,
        [
            (upper_row, lambda x: ym + shape.lip_heights(x)[0], mouth_w, np.radians(3.0)),
            (mouth_row, lambda x: np.full_like(x, ym), mouth_w, np.radians(2.5)),
            (lower_row, lambda x: ym - shape.lip_heights(x)[1], mouth_w, np.radians(3.0)),
        ],
    )
    ex, ey, _ = spec.eye_centre
    tilt = spec.eye_canthal_tilt / (spec.eye_corners[1] - spec.eye_corners[0])
    phi_in, phi_out = (_polar(spec, eye_slit_point(spec, x))[1] for x in spec.eye_corners)
    ap = np.abs(phi[eye_row])
    eye_w = smoothstep(phi_in - np.radians(4), phi_in, ap) * smoothstep(phi_out + np.radians(8), phi_out, ap)
    theta = _bend_rows(shape, theta, phi, [(eye_row, lambda x: ey - spec.lid_slit_drop + tilt * (np.abs(x) - ex), eye_w, np.radians(2.0))])
    eye_cols = tuple(int(np.argmin(np.abs(phi[eye_row] - _polar(spec, eye_slit_point(spec, x))[1]))) for x in spec.eye_corners)
    mouth_phi = _polar(spec, (spec.mouth_half_width, spec.stomion[0], spec.stomion[1] - 0.012))[1]
    left = int(np.argmin(np.abs(phi[mouth_row] - mouth_phi)))
    return SkinGrid(theta, phi, int(eye_row), int(mouth_row), (eye_cols[0], eye_cols[1]), (spec.columns - left, left))


def _bend_rows(shape: FaceShape, theta: np.ndarray, phi: np.ndarray, anchors: list[RowAnchor]) -> np.ndarray:
    """Tilt the rays of some rows so their skin points reach chosen heights.

    anchors: (row, target_y(x) -> y, weight [C], limit radians) in increasing row order. Each
    anchor row is solved for its target, blended in by ``weight`` per column and clipped to
    ``limit``; rows between anchors take interpolated tilts, rows beyond them fading ones.
    """
    c = np.asarray(shape.spec.centre)
    rows = [a[0] for a in anchors]
    offsets = []
    for row, target_y, weight, limit in anchors:
        bent = theta[row].copy()
        for _ in range(3):
            d = ray_dirs(bent, phi[row])
            r = skin_radius(shape, d)
            p = c + r[:, None] * d
            # y = c_y + r cos(theta), so dy/dtheta is about -r sin(theta).
            bent += (p[:, 1] - target_y(p[:, 0])) / (r * np.sin(bent))
        offsets.append(np.clip(bent - theta[row], -limit, limit) * weight)
    offsets = np.stack(offsets)  # [A, C]
    out = theta.copy()
    reach = np.radians(14.0)
    for j in range(theta.shape[1]):
        t = theta[:, j]
        t_anchor = t[rows]
        inner = np.interp(t, t_anchor, offsets[:, j])
        above = offsets[0, j] * np.clip(1.0 - (t_anchor[0] - t) / reach, 0.0, 1.0) ** 2
        below = offsets[-1, j] * np.clip(1.0 - (t - t_anchor[-1]) / reach, 0.0, 1.0) ** 2
        out[:, j] = t + np.where(t < t_anchor[0], above, np.where(t > t_anchor[-1], below, inner))
    return out


def _columns(spec: HeadSpec, theta: np.ndarray) -> np.ndarray:
    """[R, C] column azimuths: per row, denser on the face and, at ear height, on the ears."""
    n = spec.columns
    ph = np.linspace(-np.pi, np.pi, 2001)
    t = theta[:, None]
    face = smoothstep(np.radians(50), np.radians(70), t) * smoothstep(np.radians(158), np.radians(140), t)
    ear_phi = np.radians(100)
    ear = smoothstep(np.radians(62), np.radians(74), t) * smoothstep(np.radians(122), np.radians(110), t)
    w = (
        0.5
        + face * (2.6 * np.exp(-((ph / np.radians(34)) ** 2)) + 0.9 * np.exp(-((ph / np.radians(62)) ** 2)))
        + ear * 1.5 * np.exp(-(((np.abs(ph) - ear_phi) / np.radians(20)) ** 2))
    )
    targets = np.arange(n) / n
    out = np.stack([_inverse_cdf(ph, w_row, targets) for w_row in w])
    # Exact mirror symmetry: column j and column n - j are reflections across x = 0.
    out = 0.5 * (out - out[:, (n - np.arange(n)) % n])
    out[:, 0] = -np.pi
    return out
