"""Which mediapipe face-mesh landmark matches which point of a FLAME-format head.

Defined once, for every FLAME-format model (the built-in head, FLAME 2020 / 2023):

* The 68 iBUG landmarks. The head model carries their embedding (``lmk_faces`` /
  ``lmk_bary``); this module says where each lies among mediapipe's 478 points. Inner
  points (brows, nose, eyes, lips: iBUG 17-67) are fixed blends of one or two mediapipe
  points, chosen on mediapipe's canonical face topology (eye and lip contours as in
  mediapipe's ``FACEMESH_*`` connection sets, the nose on its midline 168-6-197-195-5-4-1-2).
* The jaw contour (iBUG 0-16) depends on the silhouette, so it is not a fixed mediapipe
  point: the 17 targets are spaced evenly by arc length along mediapipe's face-oval polyline
  (ear to chin to ear), and the fitter treats them as contour points (low weight, plus a
  point-to-curve term that lets them slide along the oval).
* Iris centres (mediapipe 468 = subject's right eye, 473 = subject's left eye) match the
  front pole of each eyeball on the model, found from the part masks ``left_eyeball`` /
  ``right_eyeball`` when the model has them, else from the eye joints' skinning weights.
  A model without eyeballs simply skips eye fitting.

Left and right are the subject's: iBUG 36-41 and mediapipe 33 / 133 / 468 are the subject's
right eye, which is on the image's left for a face looking at the camera; FLAME's +x is the
subject's left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend.head.model import HeadModelData

NUM_MEDIAPIPE = 478
IRIS_RIGHT = 468  # subject's right eye (image left)
IRIS_LEFT = 473  # subject's left eye

# iBUG index -> ((mediapipe index, weight), ...) for the 51 inner points.
_INNER: dict[int, tuple[tuple[int, float], ...]] = {
    # brows, outer to inner on the subject's right, inner to outer on the left (upper brow line)
    17: ((70, 1.0),), 18: ((63, 1.0),), 19: ((105, 1.0),), 20: ((66, 1.0),), 21: ((107, 1.0),),
    22: ((336, 1.0),), 23: ((296, 1.0),), 24: ((334, 1.0),), 25: ((293, 1.0),), 26: ((300, 1.0),),
    # nose bridge (nasion to tip) and base (right alar, subnasale, left alar)
    27: ((168, 1.0),), 28: ((197, 1.0),), 29: ((5, 1.0),), 30: ((1, 0.5), (4, 0.5)),
    31: ((98, 1.0),), 32: ((97, 1.0),), 33: ((2, 1.0),), 34: ((326, 1.0),), 35: ((327, 1.0),),
    # right eye: outer corner, upper lid x2, inner corner, lower lid x2
    36: ((33, 1.0),), 37: ((160, 1.0),), 38: ((158, 1.0),), 39: ((133, 1.0),), 40: ((153, 1.0),), 41: ((144, 1.0),),
    # left eye: inner corner, upper lid x2, outer corner, lower lid x2
    42: ((362, 1.0),), 43: ((385, 1.0),), 44: ((387, 1.0),), 45: ((263, 1.0),), 46: ((373, 1.0),), 47: ((380, 1.0),),
    # outer lips: right corner, upper lip to the left corner, lower lip back
    48: ((61, 1.0),), 49: ((40, 0.5), (39, 0.5)), 50: ((37, 1.0),), 51: ((0, 1.0),), 52: ((267, 1.0),),
    53: ((270, 0.5), (269, 0.5)), 54: ((291, 1.0),), 55: ((321, 1.0),), 56: ((405, 0.5), (314, 0.5)), 57: ((17, 1.0),),
    58: ((181, 0.5), (84, 0.5)), 59: ((91, 1.0),),
    # inner lips: right corner, upper x3, left corner, lower x3
    60: ((78, 1.0),), 61: ((81, 1.0),), 62: ((13, 1.0),), 63: ((311, 1.0),), 64: ((308, 1.0),),
    65: ((402, 1.0),), 66: ((14, 1.0),), 67: ((178, 1.0),),
}

# Face oval, subject's right ear to chin and subject's left ear to chin (mediapipe FACEMESH_FACE_OVAL).
OVAL_RIGHT = (127, 234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152)
OVAL_LEFT = (356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152)
# Where iBUG 0 / 16 start along each half of the oval (arc fraction from the ear end):
# between 127 (temple, eye height) and 234 (below the eye), as iBUG's contour starts.
JAW_START = 0.05

# Loss weights per group (relative; the fitter normalizes by the inter-ocular distance).
GROUP_WEIGHTS = {"jaw": 0.5, "brows": 1.0, "nose": 1.0, "eyes": 1.0, "lips": 1.0}


def ibug_group(i: int) -> str:
    if i <= 16:
        return "jaw"
    if i <= 26:
        return "brows"
    if i <= 35:
        return "nose"
    if i <= 47:
        return "eyes"
    return "lips"


def _resample(poly: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Points at arc-length ``fractions`` (in [0, 1]) along polylines [..., N, D]."""
    seg = np.linalg.norm(np.diff(poly, axis=-2), axis=-1)  # [..., N-1]
    cum = np.concatenate([np.zeros(seg.shape[:-1] + (1,)), np.cumsum(seg, axis=-1)], axis=-1)
    total = np.maximum(cum[..., -1:], 1e-9)
    s = cum / total
    out = np.empty(poly.shape[:-2] + (len(fractions), poly.shape[-1]))
    flat_poly = poly.reshape(-1, *poly.shape[-2:])
    flat_s = s.reshape(-1, s.shape[-1])
    flat_out = out.reshape(-1, len(fractions), poly.shape[-1])
    for b in range(flat_poly.shape[0]):
        for d in range(poly.shape[-1]):
            flat_out[b, :, d] = np.interp(fractions, flat_s[b], flat_poly[b, :, d])
    return out


def jaw_targets(mp_points: np.ndarray) -> np.ndarray:
    """[..., 478, D] mediapipe points -> [..., 17, D] iBUG jaw contour targets (0 = subject's right)."""
    pts = np.asarray(mp_points, np.float64)
    frac = JAW_START + (1.0 - JAW_START) * np.arange(9) / 8.0
    right = _resample(pts[..., list(OVAL_RIGHT), :], frac)  # iBUG 0..8
    left = _resample(pts[..., list(OVAL_LEFT), :], frac)  # iBUG 16..8
    return np.concatenate([right, left[..., 7::-1, :]], axis=-2)


def inner_table() -> tuple[np.ndarray, np.ndarray]:
    """The fixed part of the table as dense arrays: indices [51, 2] and weights [51, 2] (iBUG 17-67)."""
    idx = np.zeros((51, 2), np.int64)
    w = np.zeros((51, 2), np.float64)
    for k in range(17, 68):
        for j, (m, wt) in enumerate(_INNER[k]):
            idx[k - 17, j] = m
            w[k - 17, j] = wt
    return idx, w


def ibug68_from_mediapipe(mp_points: np.ndarray) -> np.ndarray:
    """[..., 478, D] mediapipe landmarks -> [..., 68, D] iBUG-68 targets."""
    pts = np.asarray(mp_points, np.float64)
    if pts.shape[-2] < NUM_MEDIAPIPE:
        raise ValueError(f"expected {NUM_MEDIAPIPE} mediapipe landmarks (refine_landmarks=True), got {pts.shape[-2]}")
    idx, w = inner_table()
    inner = (pts[..., idx, :] * w[:, :, None]).sum(axis=-2)
    return np.concatenate([jaw_targets(pts), inner], axis=-2)


def oval_polyline(mp_points: np.ndarray) -> np.ndarray:
    """[..., 478, D] -> [..., 23, D] the lower face oval, subject's right ear over the chin to the left ear."""
    order = list(OVAL_RIGHT) + list(OVAL_LEFT[-2::-1])
    return np.asarray(mp_points, np.float64)[..., order, :]


def ibug_weights() -> np.ndarray:
    """[68] relative loss weight of each iBUG landmark."""
    return np.array([GROUP_WEIGHTS[ibug_group(i)] for i in range(68)])


def inter_ocular(mp_points: np.ndarray) -> np.ndarray:
    """[..., 478, 2] -> [...] distance between the outer eye corners (iBUG 36-45, mediapipe 33-263)."""
    pts = np.asarray(mp_points, np.float64)
    return np.linalg.norm(pts[..., 33, :2] - pts[..., 263, :2], axis=-1)


# -- the head model's side ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPoints:
    """Points on a FLAME-format head as fixed blends of its vertices.

    ``vertex_index`` [P, K] and ``vertex_weight`` [P, K] (zero-padded): point p is
    ``sum_k w[p, k] * v[idx[p, k]]``, so it follows posing exactly. The first 68 points are the
    iBUG landmarks; when ``has_eyes`` the next two are the right and left pupils (front poles
    of the eyeballs), matching mediapipe 468 and 473.
    """

    vertex_index: np.ndarray
    vertex_weight: np.ndarray
    has_eyes: bool

    @property
    def count(self) -> int:
        return int(self.vertex_index.shape[0])

    def vertices(self) -> np.ndarray:
        """Unique vertex indices the points use."""
        return np.unique(self.vertex_index[self.vertex_weight != 0])

    def evaluate(self, vertices: np.ndarray) -> np.ndarray:
        """[..., V, 3] vertices -> [..., P, 3] points (numpy)."""
        v = np.asarray(vertices)
        return (v[..., self.vertex_index, :] * self.vertex_weight[:, :, None]).sum(axis=-2)


def eyeball_vertices(data: HeadModelData) -> tuple[np.ndarray, np.ndarray] | None:
    """(right, left) eyeball vertex indices (subject's sides), or None when the model has no eyeballs."""
    masks = data.part_masks or {}
    if "left_eyeball" in masks and "right_eyeball" in masks:
        left = np.nonzero(np.asarray(masks["left_eyeball"], bool))[0]
        right = np.nonzero(np.asarray(masks["right_eyeball"], bool))[0]
    elif data.num_joints >= 5:
        # FLAME's joints 3 and 4 are the eyes: their vertices are the ones they own outright.
        left = np.nonzero(data.weights[:, 3] > 0.95)[0]
        right = np.nonzero(data.weights[:, 4] > 0.95)[0]
    else:
        return None
    if len(left) < 8 or len(right) < 8:
        return None
    # Trust geometry over names: the subject's left eye is on +x.
    if data.v_template[left, 0].mean() < data.v_template[right, 0].mean():
        left, right = right, left
    return right, left


def pupil_blend(data: HeadModelData, eyeball: np.ndarray, cap_cos: float = 0.93) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and weights of an eyeball's front pole: the mean of its forward-facing cap.

    The cap is the eyeball vertices within acos(cap_cos) of +z (FLAME's forward) seen from the
    eyeball's centre; a vertex at the pole alone would do, but not every mesh has one.
    """
    v = data.v_template[eyeball].astype(np.float64)
    centre = 0.5 * (v.min(axis=0) + v.max(axis=0))
    d = v - centre
    d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    cap = d[:, 2] >= cap_cos
    if cap.sum() < 1:
        cap = d[:, 2] >= d[:, 2].max() - 1e-9
    idx = eyeball[cap]
    return idx, np.full(len(idx), 1.0 / len(idx))


def model_points(data: HeadModelData, use_eyes: bool = True) -> ModelPoints:
    """The head model's side of the correspondence (68 iBUG points, then the two pupils if any)."""
    faces = np.asarray(data.faces, np.int64)
    rows_i = [faces[f] for f in np.asarray(data.lmk_faces, np.int64)]
    rows_w = [np.asarray(b, np.float64) for b in np.asarray(data.lmk_bary)]
    eyes = eyeball_vertices(data) if use_eyes else None
    if eyes is not None:
        for eyeball in eyes:
            i, w = pupil_blend(data, eyeball)
            rows_i.append(i)
            rows_w.append(w)
    k = max(len(r) for r in rows_i)
    idx = np.zeros((len(rows_i), k), np.int64)
    wts = np.zeros((len(rows_i), k), np.float64)
    for p, (i, w) in enumerate(zip(rows_i, rows_w)):
        idx[p, : len(i)] = i
        wts[p, : len(w)] = w
    return ModelPoints(idx, wts, eyes is not None)


def mediapipe_targets(mp_points: np.ndarray, has_eyes: bool) -> np.ndarray:
    """[..., 478, D] -> [..., P, D] targets in ``ModelPoints`` order (68 iBUG, then the irises)."""
    pts = np.asarray(mp_points, np.float64)
    out = ibug68_from_mediapipe(pts)
    if has_eyes:
        out = np.concatenate([out, pts[..., [IRIS_RIGHT, IRIS_LEFT], :]], axis=-2)
    return out


def target_weights(has_eyes: bool, iris_weight: float = 1.0) -> np.ndarray:
    w = ibug_weights()
    return np.concatenate([w, [iris_weight, iris_weight]]) if has_eyes else w
