"""Which mediapipe face-mesh landmark matches which point of a FLAME-format head.

Defined once, for every FLAME-format model (the built-in head, the ICT head, FLAME 2020 / 2023):

* The 68 iBUG landmarks, as the fit's targets: inner points (brows, nose, eyes, lips: iBUG
  17-67) are fixed blends of one or two mediapipe points, chosen on mediapipe's canonical face
  topology (eye and lip contours as in mediapipe's ``FACEMESH_*`` connection sets, the nose on
  its midline 168-6-197-195-5-4-1-2). The jaw contour (iBUG 0-16) depends on the silhouette, so
  it is not a fixed mediapipe point: the 17 targets are spaced evenly by arc length along
  mediapipe's face-oval polyline (ear to chin to ear), and the fitter also lets them slide
  along the oval (a point-to-curve term).
* The same landmarks on the head. A head with a mediapipe embedding (``MediapipeEmbedding``:
  where each of mediapipe's 468 face-mesh points lies on its surface, made once by
  ``backend.tracking.embedding``; the ICT head ships one) gets them by the very construction
  the detections get (``ibug68``): the same table, the same arc-length resampling of its own
  face oval after projection. A head without one (the built-in head, FLAME as loaded) uses
  its own iBUG embedding (``lmk_faces`` / ``lmk_bary``), whose definition of a landmark
  differs from mediapipe's by a few millimetres at the brows, nose, eye corners and jaw.
* Iris centres (mediapipe 468 = subject's right eye, 473 = subject's left eye) match the
  front pole of each eyeball on the model, found from the part masks ``left_eyeball`` /
  ``right_eyeball`` when the model has them, else from the eye joints' skinning weights.
  A model without eyeballs simply skips eye fitting.

Left and right are the subject's: iBUG 36-41 and mediapipe 33 / 133 / 468 are the subject's
right eye, which is on the image's left for a face looking at the camera; FLAME's +x is the
subject's left.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backend.head.model import HeadModelData
from backend.head.registry import fingerprint

NUM_MEDIAPIPE = 478
NUM_FACE_MESH = 468  # mediapipe's face mesh without the ten iris points
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


def resample_polyline(poly: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Points at arc-length ``fractions`` [F] (in [0, 1]) along polylines [..., N, D] -> [..., F, D].

    Differentiable in the polyline's points (which segment a fraction falls on is not).
    """
    d = poly[..., 1:, :] - poly[..., :-1, :]
    seg = (d * d).sum(-1).clamp_min(1e-24).sqrt()  # [..., N-1]; no NaN gradient at a repeated point
    cum = torch.cat([torch.zeros_like(seg[..., :1]), seg.cumsum(-1)], dim=-1)
    s = cum / cum[..., -1:]
    f = fractions.to(s.dtype).expand(*s.shape[:-1], -1).contiguous()
    k = (torch.searchsorted(s.detach().contiguous(), f, right=True) - 1).clamp(0, poly.shape[-2] - 2)
    s0, s1 = s.gather(-1, k), s.gather(-1, k + 1)
    t = ((f - s0) / (s1 - s0).clamp_min(1e-12)).clamp(0.0, 1.0)[..., None]
    ends = (*k.shape, poly.shape[-1])
    a = poly.gather(-2, k[..., None].expand(ends))
    b = poly.gather(-2, (k + 1)[..., None].expand(ends))
    return a + t * (b - a)


def jaw_contour(points: torch.Tensor) -> torch.Tensor:
    """[..., 478 (or 468), D] mediapipe points -> [..., 17, D] iBUG jaw contour (0 = subject's right)."""
    frac = JAW_START + (1.0 - JAW_START) * torch.arange(9, dtype=points.dtype) / 8.0
    right = resample_polyline(points[..., list(OVAL_RIGHT), :], frac)  # iBUG 0..8
    left = resample_polyline(points[..., list(OVAL_LEFT), :], frac)  # iBUG 16..8
    return torch.cat([right, left.flip(-2)[..., 1:, :]], dim=-2)


def inner_table() -> tuple[np.ndarray, np.ndarray]:
    """The fixed part of the table as dense arrays: indices [51, 2] and weights [51, 2] (iBUG 17-67)."""
    idx = np.zeros((51, 2), np.int64)
    w = np.zeros((51, 2), np.float64)
    for k in range(17, 68):
        for j, (m, wt) in enumerate(_INNER[k]):
            idx[k - 17, j] = m
            w[k - 17, j] = wt
    return idx, w


def ibug68(points: torch.Tensor) -> torch.Tensor:
    """[..., 478 (or 468), D] mediapipe points -> [..., 68, D] iBUG-68: the one construction for
    detections and for a head's embedded mediapipe points."""
    idx, w = inner_table()
    inner = (points[..., idx, :] * torch.as_tensor(w, dtype=points.dtype)[:, :, None]).sum(dim=-2)
    return torch.cat([jaw_contour(points), inner], dim=-2)


def ibug68_from_mediapipe(mp_points: np.ndarray) -> np.ndarray:
    """[..., 478, D] mediapipe landmarks -> [..., 68, D] iBUG-68 targets."""
    pts = np.asarray(mp_points, np.float64)
    if pts.shape[-2] < NUM_MEDIAPIPE:
        raise ValueError(f"expected {NUM_MEDIAPIPE} mediapipe landmarks (refine_landmarks=True), got {pts.shape[-2]}")
    return ibug68(torch.from_numpy(pts)).numpy()


def oval_order() -> list[int]:
    """The lower face oval's mediapipe indices, subject's right ear over the chin to the left ear (23)."""
    return list(OVAL_RIGHT) + list(OVAL_LEFT[-2::-1])


def oval_polyline(mp_points: np.ndarray) -> np.ndarray:
    """[..., 478, D] -> [..., 23, D] the lower face oval, subject's right ear over the chin to the left ear."""
    return np.asarray(mp_points, np.float64)[..., oval_order(), :]


def used_mediapipe_points() -> np.ndarray:
    """Sorted mediapipe indices that ``ibug68`` reads (the inner table's and the face oval's)."""
    idx, w = inner_table()
    return np.unique(np.concatenate([idx[w > 0], oval_order()]))


def ibug_weights() -> np.ndarray:
    """[68] relative loss weight of each iBUG landmark."""
    return np.array([GROUP_WEIGHTS[ibug_group(i)] for i in range(68)])


def inter_ocular(mp_points: np.ndarray) -> np.ndarray:
    """[..., 478, 2] -> [...] distance between the outer eye corners (iBUG 36-45, mediapipe 33-263)."""
    pts = np.asarray(mp_points, np.float64)
    return np.linalg.norm(pts[..., 33, :2] - pts[..., 263, :2], axis=-1)


# -- the head model's side ------------------------------------------------------------------


EMBEDDING_DIR = Path(__file__).resolve().parent / "models"


@dataclass(frozen=True)
class MediapipeEmbedding:
    """Where mediapipe's 468 face-mesh points lie on one head's surface.

    Point i is the barycentric blend ``bary[i]`` [3] of the corners of triangle ``faces[i]`` of
    the head, so it follows any identity, expression and pose. Made by registering mediapipe's
    canonical face onto the head (``backend.tracking.embedding``).

    Attributes:
        head: the head's name; fingerprint: ``registry.fingerprint`` of the head it was made on.
        faces: [468] triangle indices; bary: [468, 3] barycentric coordinates.
        distance_mm: [468] distance from the registered canonical point to the surface, millimetres.
    """

    head: str
    fingerprint: str
    faces: np.ndarray
    bary: np.ndarray
    distance_mm: np.ndarray

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path,
            head=np.array(self.head),
            fingerprint=np.array(self.fingerprint),
            faces=self.faces.astype("<i4"),
            bary=self.bary.astype("<f4"),
            distance_mm=self.distance_mm.astype("<f4"),
        )

    @classmethod
    def load(cls, path: Path) -> MediapipeEmbedding:
        with np.load(path, allow_pickle=False) as z:
            return cls(str(z["head"]), str(z["fingerprint"]), z["faces"].astype(np.int64), z["bary"].astype(np.float64), z["distance_mm"].astype(np.float64))


def embedding_path(head_name: str) -> Path | None:
    """Where a head's shipped embedding lives (None for a name that is no plain file name)."""
    return EMBEDDING_DIR / f"mediapipe_on_{head_name}.npz" if re.fullmatch(r"[A-Za-z0-9._-]+", head_name) else None


def mediapipe_embedding(data: HeadModelData) -> MediapipeEmbedding | None:
    """The shipped embedding of this head, or None when there is none or it was made on another head
    (same name, different mesh: its triangles would mean nothing here; a warning says so, since
    the fit then falls back to the head's own 68 landmarks)."""
    path = embedding_path(data.name)
    if path is None or not path.is_file():
        return None
    emb = MediapipeEmbedding.load(path)
    if emb.fingerprint != fingerprint(data):
        warnings.warn(
            f"{path.name} was made on another '{data.name}' mesh ({emb.fingerprint}, this one is {fingerprint(data)}): "
            "tracking fits the head's own 68 landmarks instead; `python -m backend.tracking.embedding --head HEAD` rebuilds it",
            stacklevel=2,
        )
        return None
    return emb


@dataclass(frozen=True)
class ModelPoints:
    """Points on a FLAME-format head as fixed blends of its vertices, and the landmarks they make.

    ``vertex_index`` [R, K] and ``vertex_weight`` [R, K] (zero-padded): raw point r is
    ``sum_k w[r, k] * v[idx[r, k]]``, so it follows posing exactly. With ``mediapipe`` None
    the raw points are the head's own 68 iBUG landmarks; with ``mediapipe`` [U] (mediapipe
    indices) the first U raw points are those mediapipe points embedded on the head, and
    ``landmarks`` builds the iBUG-68 from them as ``ibug68`` builds the targets from a
    detection (after projection, so the jaw contour is resampled in the image as mediapipe's
    is). When ``has_eyes`` the last two raw points are the right and left pupils (front poles
    of the eyeballs), matching mediapipe 468 and 473.
    """

    vertex_index: np.ndarray
    vertex_weight: np.ndarray
    has_eyes: bool
    mediapipe: np.ndarray | None = None

    @property
    def count(self) -> int:
        """R: raw points."""
        return int(self.vertex_index.shape[0])

    @property
    def landmark_count(self) -> int:
        """P: landmarks (68 iBUG, then the two pupils when the head has eyeballs)."""
        return 68 + 2 * self.has_eyes

    def vertices(self) -> np.ndarray:
        """Unique vertex indices the points use."""
        return np.unique(self.vertex_index[self.vertex_weight != 0])

    def evaluate(self, vertices: np.ndarray) -> np.ndarray:
        """[..., V, 3] vertices -> [..., R, 3] raw points (numpy)."""
        v = np.asarray(vertices)
        return (v[..., self.vertex_index, :] * self.vertex_weight[:, :, None]).sum(axis=-2)

    def _on_mesh(self, raw: torch.Tensor) -> torch.Tensor:
        """[..., R, D] -> [..., 468, D]: the embedded points in mediapipe's order (the unused ones zero)."""
        out = raw.new_zeros(*raw.shape[:-2], NUM_FACE_MESH, raw.shape[-1])
        out[..., torch.as_tensor(self.mediapipe), :] = raw[..., : len(self.mediapipe), :]
        return out

    def landmarks(self, raw: torch.Tensor) -> torch.Tensor:
        """[..., R, D] raw points (3D, or projected to pixels) -> [..., P, D] landmarks in target order."""
        if self.mediapipe is None:
            return raw
        lmk = ibug68(self._on_mesh(raw))
        return torch.cat([lmk, raw[..., len(self.mediapipe) :, :]], dim=-2) if self.has_eyes else lmk

    def oval(self, raw: torch.Tensor) -> torch.Tensor:
        """[..., R, D] -> the face oval the points define: mediapipe's 23-point polyline when
        embedded, else the 17 jaw landmarks (for ideal detections)."""
        if self.mediapipe is None:
            return raw[..., :17, :]
        return self._on_mesh(raw)[..., oval_order(), :]


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


def model_points(data: HeadModelData, use_eyes: bool = True, mediapipe: bool = True) -> ModelPoints:
    """The head model's side of the correspondence: mediapipe's points on the head when it has a
    shipped embedding (and ``mediapipe``), else its own 68 iBUG points; then the two pupils if any."""
    faces = np.asarray(data.faces, np.int64)
    emb = mediapipe_embedding(data) if mediapipe else None
    if emb is not None:
        ids = used_mediapipe_points()
        rows_i = [faces[f] for f in emb.faces[ids]]
        rows_w = list(emb.bary[ids])
    else:
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
    return ModelPoints(idx, wts, eyes is not None, ids if emb is not None else None)


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
