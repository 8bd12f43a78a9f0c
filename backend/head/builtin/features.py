"""Analytic shape of the head: the solids whose union is the skin, and the face relief.

The skin is the boundary of a union of four solids, each star-shaped from the ray-cast
centre: the cranium, the lower-face/jaw block, the neck and the face. The face is a
height field ``z <= face_depth(x, y)`` (metres) that carries the features a front view
reads: brow ridge, eye sockets with lids lying on the eyeballs, nose, lips, chin. The ears
are a radial relief added after the union (``ear_relief``).
"""

from __future__ import annotations

import numpy as np
from scipy.interpolate import PchipInterpolator

from backend.head.builtin.spec import HeadSpec

# Midline depth of the face plane (without nose and lips) against height: (y, z) knots.
_FACE_PROFILE = np.array(
    [
        (0.150, -0.100),
        (0.110, -0.020),
        (0.095, 0.050),
        (0.070, 0.085),
        (0.045, 0.097),
        (0.028, 0.100),
        (0.012, 0.095),
        (-0.010, 0.090),
        (-0.040, 0.093),
        (-0.060, 0.095),
        (-0.085, 0.093),
        (-0.100, 0.094),
        (-0.112, 0.088),
        (-0.122, 0.070),
        (-0.132, 0.030),
        (-0.150, -0.030),
    ]
)
# Half width of the face against height: (y, half width) knots; it follows the skull's
# outline so the face never stands out beside the cranium or the jaw.
_FACE_WIDTH = np.array(
    [
        (0.150, 0.020),
        (0.120, 0.034),
        (0.090, 0.054),
        (0.060, 0.066),
        (0.030, 0.072),
        (-0.030, 0.072),
        (-0.070, 0.063),
        (-0.100, 0.050),
        (-0.125, 0.034),
        (-0.150, 0.020),
    ]
)
# Nose dorsum: (y, z of the ridge, half width at its base) knots from the nasion down to the
# lobule, which is added separately.
_NOSE_RIDGE = np.array(
    [
        (0.030, 0.090, 0.016),
        (0.012, 0.0955, 0.0165),
        (0.000, 0.0995, 0.0150),
        (-0.012, 0.1050, 0.0135),
        (-0.022, 0.1095, 0.0140),
        (-0.030, 0.1130, 0.0150),
        (-0.036, 0.1110, 0.0145),
        (-0.042, 0.1010, 0.0120),
        (-0.048, 0.0880, 0.0100),
    ]
)
# Lip relief (metres) against height from the stomion in vermilion heights (+ up): the
# upper roll, the stomion, the lower roll, then the fold under the lower lip.
_LIP_PROFILE = np.array(
    [
        (-1.6, 0.0),
        (-1.25, 0.0020),
        (-0.95, 0.0060),
        (-0.55, 0.0072),
        (-0.2, 0.0056),
        (0.0, 0.0038),
        (0.2, 0.0054),
        (0.55, 0.0068),
        (0.95, 0.0066),
        (1.25, 0.0046),
        (2.0, 0.0017),
        (3.2, 0.0),
    ]
)
_LIP_RELIEF = PchipInterpolator(_LIP_PROFILE[:, 0], _LIP_PROFILE[:, 1])


def _relief(
    ax: np.ndarray, y: np.ndarray, centre: tuple[float, float], axes: tuple[float, float], height: float, power: float
) -> np.ndarray:
    """A rounded bump over (|x|, y): ``height * (1 - q) ** power`` inside the ellipse q < 1."""
    q = ((ax - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2
    return height * np.maximum(1.0 - q, 0.0) ** power


def _soft_abs(x: np.ndarray) -> np.ndarray:
    """|x| rounded off within ~2 mm of the midline, so mirrored features meet without a crease."""
    return np.sqrt(x * x + 0.002**2) - 0.002


def smooth_max(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth maximum blending over about k: max(a, b) plus a soft bump of k/4 where a = b.

    Log-sum-exp, so the blend has no curvature seam; a seam would alias into ripples
    along the dense grid rows it crosses.
    """
    s = k / (4.0 * np.log(2.0))
    return np.maximum(a, b) + s * np.log1p(np.exp(-np.abs(a - b) / s))


def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def gauss(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-(((x - cx) / sx) ** 2) - ((y - cy) / sy) ** 2)


class FaceShape:
    """The face height field and the solids of the head, for one ``HeadSpec``."""

    def __init__(self, spec: HeadSpec) -> None:
        self.spec = spec
        self._profile = PchipInterpolator(_FACE_PROFILE[:, 0][::-1], _FACE_PROFILE[:, 1][::-1])
        self._width = PchipInterpolator(_FACE_WIDTH[:, 0][::-1], _FACE_WIDTH[:, 1][::-1])
        ys = _NOSE_RIDGE[:, 0][::-1]
        self._ridge = PchipInterpolator(ys, _NOSE_RIDGE[:, 1][::-1], extrapolate=False)
        self._ridge_w = PchipInterpolator(ys, _NOSE_RIDGE[:, 2][::-1], extrapolate=False)

    # -- the face height field -----------------------------------------------------------------

    def base_depth(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Face plane without features: the midline profile wrapped back around an ellipse."""
        yc = np.clip(y, _FACE_PROFILE[-1, 0], _FACE_PROFILE[0, 0])
        half_width = self._width(yc)
        u = np.minimum(np.abs(x) / half_width, 1.0)
        wrap = 0.105 * (1.0 - np.sqrt(1.0 - u**2)) + 3.0 * np.maximum(np.abs(x) - half_width, 0.0)
        return self._profile(yc) - wrap

    def brow_line(self, x: np.ndarray) -> np.ndarray:
        """[N] height (metres) of the brow arch above lateral position x."""
        return self.spec.eye_centre[1] + 0.024 + 0.004 * np.exp(-(((_soft_abs(x) - 0.030) / 0.016) ** 2))

    def lip_heights(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([N], [N]) heights (metres) of the upper and lower vermilion above/below the stomion."""
        ax = _soft_abs(x)
        fade = np.clip(1.0 - (ax / self.spec.mouth_half_width) ** 2, 0.0, 1.0)
        # Narrower toward the corners; the cupid's bow lifts the upper border.
        upper = 0.0015 + 0.0065 * fade**0.7 + 0.0012 * np.exp(-(((ax - 0.0055) / 0.0035) ** 2))
        lower = 0.0020 + 0.0085 * fade**0.7
        return upper, lower

    def face_depth(self, x: np.ndarray, y: np.ndarray, nose: bool = True) -> np.ndarray:
        """[N] z of the face surface at (x, y) (metres); the face solid is z <= this."""
        s = self.spec
        ax = _soft_abs(x)
        ex, ey, ez = s.eye_centre
        z = self.base_depth(x, y)
        # Brow ridge, arched, strongest above the middle of the eye.
        z = z + 0.0045 * np.exp(-(((y - self.brow_line(x)) / 0.009) ** 2) - ((ax - 0.028) / 0.026) ** 4)
        # Cheekbones and cheeks.
        z = z + 0.007 * gauss(ax, y, 0.047, ey - 0.022, 0.017, 0.013)
        z = z + 0.004 * gauss(ax, y, 0.040, ey - 0.050, 0.016, 0.016)
        # Eye socket: a hollow that the lids (a sphere around the eyeball) fill again.
        z = z - 0.009 * gauss(ax, y, ex, ey, 0.018, 0.015)
        lid_r = s.eye_radius + s.lid_gap
        r2 = lid_r**2 - (ax - ex) ** 2 - (y - ey) ** 2
        lids = np.where(r2 > 0, ez + np.sqrt(np.maximum(r2, 0.0)), -1.0)
        z = smooth_max(z, lids, 0.008)
        # Upper lid crease: a soft fold arching over the eye, under the brow.
        crease_y = ey + 0.0085 + 0.0015 * np.exp(-(((ax - ex + 0.002) / 0.010) ** 2))
        z = z - 0.0012 * np.exp(-(((y - crease_y) / 0.0024) ** 2) - ((ax - ex) / 0.014) ** 4)
        # Nose: ridge with an elliptic cross-section, then the alae beside the tip.
        if nose:
            z = self._add_nose(x, y, z)
        # Lips, the groove where they meet, the fold under the lower lip, the chin.
        z = z + self._lips(x, y)
        z = z + 0.0075 * gauss(ax, y, 0.0, s.chin_y, 0.017, 0.013)
        return z

    def _add_nose(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Dorsum (a ridge with a rounded, edge-free cross-section), lobule and alae."""
        s = self.spec
        ax = _soft_abs(x)
        ty = s.nose_tip_y
        ridge = self._ridge(y)
        width = self._ridge_w(y)
        inside = np.isfinite(ridge)
        ridge = np.where(inside, ridge, 0.0)
        width = np.where(inside, width, 1e-3)
        profile = (1.0 - np.clip((ax / width) ** 2, 0.0, 1.0)) ** 1.5
        # Ends of the ridge table lie below the face, so the dorsum fades in and out smoothly.
        height = ridge - self.base_depth(np.zeros_like(y), y)
        dorsum = self.base_depth(x, y) + height * profile - 0.003 * (1.0 - profile)
        z = smooth_max(z, np.where(inside & (ax < width), dorsum, -1.0), 0.002)
        # Lobule and alae are reliefs over the dorsum and cheek; the alar crease bounds the alae.
        z = z + _relief(ax, y, (0.0, ty - 0.003), (0.0135, 0.0125), 0.0055, 1.5)
        z = z + _relief(ax, y, (0.0130, ty - 0.0095), (0.0090, 0.0078), 0.0068, 1.5)
        # Nostrils: small pits on the underside, either side of the columella.
        return z - 0.002 * gauss(ax, y, 0.0065, ty - 0.0125, 0.0045, 0.0035)

    def _lips(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Relief of the lips over the face plane: two rolls meeting at the stomion."""
        s = self.spec
        ax = _soft_abs(x)
        ym = s.stomion[0]
        fade = np.clip(1.0 - (ax / s.mouth_half_width) ** 2, 0.0, 1.0)
        upper_h, lower_h = self.lip_heights(x)
        t = np.where(y >= ym, (y - ym) / upper_h, (y - ym) / lower_h)
        relief = _LIP_RELIEF(np.clip(t, _LIP_PROFILE[0, 0], _LIP_PROFILE[-1, 0]))
        relief = relief * fade**0.8
        # Philtrum: a shallow groove from the nose to the upper lip.
        philtrum_band = smoothstep(ym + 0.006, ym + 0.010, y) * smoothstep(s.nose_tip_y - 0.013, s.nose_tip_y - 0.017, y)
        relief = relief - philtrum_band * 0.0008 * np.exp(-((ax / 0.0045) ** 2))
        # The fold under the lower lip, then the mouth corners sinking into the cheek.
        relief = relief - 0.0022 * gauss(ax, y, 0.0, ym - 0.021, 0.02, 0.0045)
        return relief - 0.0025 * gauss(ax, y, s.mouth_half_width + 0.0015, ym, 0.0045, 0.0045)

    # -- the other solids (implicit: negative inside) ------------------------------------------

    def cranium(self, p: np.ndarray) -> np.ndarray:
        s = self.spec
        d = p - np.asarray(s.cranium_centre)
        ay = np.where(d[:, 1] > 0, s.cranium_up, s.cranium_down)
        # The forehead bulges forward; below the brow the front pulls back behind the face.
        front = s.cranium_front * (0.72 + 0.28 * smoothstep(-0.01, 0.05, d[:, 1]))
        az = np.where(d[:, 2] > 0, front, s.cranium_back)
        # Squarer than an ellipse across the top (x-y), so the vault is broad, not egg-shaped.
        e = s.cranium_power
        xy = (np.abs(d[:, 0] / s.cranium_x) ** e + np.abs(d[:, 1] / ay) ** e) ** (2.0 / e)
        return np.sqrt(xy + (d[:, 2] / az) ** 2) - 1.0

    def jaw(self, p: np.ndarray) -> np.ndarray:
        s = self.spec
        d = np.abs(p - np.asarray(s.jaw_centre)) / np.asarray(s.jaw_axes)
        # Narrower toward the chin, so the front view tapers from the jaw angles.
        d[:, 0] /= 1.0 - 0.2 * smoothstep(-0.02, -0.09, p[:, 1] - s.jaw_centre[1]) * smoothstep(-0.02, 0.06, p[:, 2] - s.jaw_centre[2])
        e = s.jaw_power
        return (d[:, 0] ** e + d[:, 1] ** e + d[:, 2] ** 2) ** (1.0 / e) - 1.0

    def neck(self, p: np.ndarray) -> np.ndarray:
        s = self.spec
        ax, az = s.neck_axes
        # The neck leans forward going down, as the throat does.
        z = p[:, 2] - s.neck_centre_z + 0.10 * (p[:, 1] + 0.08)
        r = np.sqrt((p[:, 0] / ax) ** 2 + (z / az) ** 2) - 1.0
        return np.maximum(r, (p[:, 1] - s.neck_top) / 0.05)

    def face(self, p: np.ndarray) -> np.ndarray:
        # Clipped by the cranium and jaw stretched forward from the centre: in front the clip
        # lies well ahead of the face, at the sides it stays inside the skull, so the face
        # solid never stands out beside the head.
        c = np.asarray(self.spec.centre)
        d = p - c
        front = d[:, 2] > 0
        d[:, 2] = np.where(front, d[:, 2] / 1.6, d[:, 2])
        d[:, 1] = np.where(front & (d[:, 1] < 0), d[:, 1] / 1.2, d[:, 1])
        q = c + d
        # Roughly metres near the surface; toward the back a 1 cm margin keeps the clip's own
        # crease (where cranium and jaw meet) inside the head instead of on the skin.
        clip = 0.07 * np.minimum(self.cranium(q), self.jaw(q)) + 0.01 * smoothstep(0.05, 0.0, p[:, 2])
        return smooth_max(p[:, 2] - self.face_depth(p[:, 0], p[:, 1]), clip, 0.012)

    # -- ears ----------------------------------------------------------------------------------

    def ear_relief(self, p: np.ndarray) -> np.ndarray:
        """[N] outward offset (metres) of the pinna at skull points p [N, 3]."""
        s = self.spec
        ecx, ecy, ecz = s.ear_centre
        t = np.radians(s.ear_tilt_deg)
        dy, dz = p[:, 1] - ecy, p[:, 2] - ecz
        # a: along the ear's long axis (up), b: across it (toward the back of the head).
        a = (dy * np.cos(t) - dz * np.sin(t)) / (0.5 * s.ear_height)
        b = (-dy * np.sin(t) - dz * np.cos(t)) / (0.5 * s.ear_width)
        # Outline: wider at the top, narrowing into the lobe.
        half_w = 1.0 - 0.35 * smoothstep(-0.2, -0.95, a)
        q = np.sqrt((a / 1.0) ** 2 + (b / half_w) ** 2)
        side = smoothstep(0.0, 0.01, np.abs(p[:, 0]) - 0.6 * abs(ecx))
        # The free edge (top, back, lobe) is a sharp outline; the front, where the pinna grows
        # out of the head, ramps up softly.
        attached = smoothstep(-0.2, -0.9, b)
        mask = smoothstep(1.05 + 0.35 * attached, 0.88 - 0.3 * attached, q) * side
        # The pinna leans out toward its back rim; the helix rim stands up; the concha is a bowl.
        lean = s.ear_flare * smoothstep(-1.0, 1.0, b) * (0.45 + 0.55 * smoothstep(-1.0, 0.2, a))
        rim = 0.0035 * np.exp(-(((q - 0.84) / 0.09) ** 2)) * (1.0 - attached)
        antihelix = 0.0022 * np.exp(-(((q - 0.55) / 0.10) ** 2)) * smoothstep(-0.5, 0.1, a)
        concha = 0.010 * gauss(a, b, -0.12, -0.25, 0.32, 0.34)
        tragus = 0.0035 * gauss(a, b, -0.18, -0.95, 0.14, 0.12)
        lobe = 0.003 * gauss(a, b, -0.78, 0.0, 0.18, 0.4)
        body = 0.003 * (1.0 - attached) + lean + rim + antihelix + lobe - concha
        return mask * np.maximum(body, 0.0) + tragus * side
