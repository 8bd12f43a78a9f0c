"""iBUG-68 landmark embedding of the built-in head: (face, barycentric) per landmark.

Indices follow iBUG: 0-16 jaw contour from the subject's right (image left) to the left,
17-21 right brow (outer to inner), 22-26 left brow (inner to outer), 27-30 nose bridge to
tip, 31-35 nose base right to left, 36-41 right eye and 42-47 left eye (corners, upper lid,
lower lid), 48-59 outer lip contour and 60-67 inner lip contour. Eye and inner-lip points
sit on the slit edges, on the side they belong to, so blinking and jaw opening move them
apart; the rest are the nearest skin points to targets placed on the analytic features.
"""

from __future__ import annotations

import numpy as np

from backend.head.builtin.features import FaceShape
from backend.head.builtin.mesh import HeadMesh
from backend.head.builtin.spec import HeadSpec

# (left index, right index) pairs that mirror each other; the rest lie on the midline.
MIRROR_PAIRS: tuple[tuple[int, int], ...] = (
    *((16 - k, k) for k in range(8)),
    *((26 - k, 17 + k) for k in range(5)),
    (35, 31),
    (34, 32),
    (45, 36),
    (44, 37),
    (43, 38),
    (42, 39),
    (47, 40),
    (46, 41),
    (54, 48),
    (53, 49),
    (52, 50),
    (55, 59),
    (56, 58),
    (64, 60),
    (63, 61),
    (65, 67),
)

# Left half of the jaw contour (landmarks 16 down to 8) as targets (x, y, z), snapped to the skin.
_JAW_CONTOUR = np.array(
    [
        (0.068, 0.000, 0.030),
        (0.067, -0.019, 0.031),
        (0.066, -0.037, 0.030),
        (0.063, -0.055, 0.029),
        (0.058, -0.071, 0.032),
        (0.050, -0.087, 0.043),
        (0.039, -0.100, 0.060),
        (0.023, -0.111, 0.077),
        (0.000, -0.117, 0.090),
    ]
)


def _closest_on_triangles(p: np.ndarray, tri: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared distance [F] from point p [3] to each triangle [F, 3, 3] and barycentrics [F, 3]."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    ab, ac, ap = b - a, c - a, p - a
    d00 = (ab * ab).sum(1)
    d01 = (ab * ac).sum(1)
    d11 = (ac * ac).sum(1)
    d20 = (ap * ab).sum(1)
    d21 = (ap * ac).sum(1)
    den = np.maximum(d00 * d11 - d01 * d01, 1e-30)
    v = (d11 * d20 - d01 * d21) / den
    w = (d00 * d21 - d01 * d20) / den
    bary = np.stack([1 - v - w, v, w], axis=1)
    # Outside the triangle: best point on each edge, keep the nearest.
    best = np.full(len(tri), np.inf)
    best_bary = bary.copy()
    inside = (bary >= 0).all(axis=1)
    q = (bary[:, :, None] * tri).sum(1)
    best[inside] = ((q - p) ** 2).sum(1)[inside]
    for i, j in ((0, 1), (1, 2), (2, 0)):
        e = tri[:, j] - tri[:, i]
        t = np.clip(((p - tri[:, i]) * e).sum(1) / np.maximum((e * e).sum(1), 1e-30), 0.0, 1.0)
        d = ((tri[:, i] + t[:, None] * e - p) ** 2).sum(1)
        better = ~inside & (d < best)
        best[better] = d[better]
        bb = np.zeros((len(tri), 3))
        bb[:, i] = 1 - t
        bb[:, j] = t
        best_bary[better] = bb[better]
    return best, best_bary


def _snap(p: np.ndarray, vertices: np.ndarray, faces: np.ndarray, allowed: np.ndarray) -> tuple[int, np.ndarray]:
    """Nearest point to p on the allowed faces: (face index, barycentrics)."""
    near = np.linalg.norm(vertices[faces[:, 0]] - p, axis=1) < 0.03
    ids = np.nonzero(allowed & near)[0]
    d, bary = _closest_on_triangles(p, vertices[faces[ids]])
    k = int(np.argmin(d))
    return int(ids[k]), bary[k]


def _on_chain(chain: np.ndarray, t: float, faces: np.ndarray) -> tuple[int, np.ndarray]:
    """Point at fraction t (0..1 by index) along a vertex chain, on a face holding that edge
    among ``faces`` (pass skin faces only: the mouth pocket shares the lip edges). A slit
    edge has one such face, on its own side of the slit."""
    f = t * (len(chain) - 1)
    k = min(int(np.floor(f)), len(chain) - 2)
    s = f - k
    a, b = chain[k], chain[k + 1]
    hold = np.nonzero((faces == a).any(1) & (faces == b).any(1))[0]
    if len(hold) == 0:
        raise AssertionError(f"no face holds the edge ({a}, {b})")
    face = int(hold[0])
    bary = np.zeros(3)
    bary[list(faces[face]).index(a)] = 1.0 - s
    bary[list(faces[face]).index(b)] = s
    return face, bary


def _chain_at_y(chain: np.ndarray, vertices: np.ndarray, y: float) -> float:
    """Fraction along a chain running downward where it first reaches height y."""
    ys = vertices[chain, 1]
    k = int(np.argmax(ys <= y))
    if k == 0:
        return 0.0
    s = (ys[k - 1] - y) / (ys[k - 1] - ys[k])
    return float((k - 1 + s) / (len(chain) - 1))


def _chain_at_x(chain: np.ndarray, vertices: np.ndarray, x: float) -> float:
    """Fraction along a chain (ordered by increasing x) where it passes lateral position x."""
    xs = vertices[chain, 0]
    return float(np.interp(x, xs, np.arange(len(chain))) / (len(chain) - 1))


def landmark_embedding(spec: HeadSpec, shape: FaceShape, mesh: HeadMesh) -> tuple[np.ndarray, np.ndarray]:
    """([68] face index, [68, 3] barycentric coordinates) of the iBUG-68 landmarks."""
    v, faces = mesh.vertices, mesh.faces
    layout = mesh.layout
    n_skin_faces = layout.faces.shape[0]
    skin_faces = faces[:n_skin_faces]
    skin_face = np.zeros(len(faces), bool)
    skin_face[:n_skin_faces] = True
    lmk_faces = np.zeros(68, np.int64)
    lmk_bary = np.zeros((68, 3))

    def put(i: int, fb: tuple[int, np.ndarray]) -> None:
        lmk_faces[i], lmk_bary[i] = fb

    def on_face(x: float, y: float, allowed: np.ndarray = skin_face) -> tuple[int, np.ndarray]:
        z = float(shape.face_depth(np.array([x]), np.array([y]))[0])
        return _snap(np.array([x, y, z]), v, faces, allowed)

    # Midline points lie exactly on the grid's midline column, above or below the mouth slit.
    mid = layout.grid.cols // 2
    mouth_row = layout.grid.mouth_row
    mid_upper = layout.grid_index[: mouth_row + 1, mid]
    mid_lower = np.concatenate([[layout.mouth_copy[mid]], layout.grid_index[mouth_row + 1 :, mid]])

    def on_midline(y: float) -> tuple[int, np.ndarray]:
        chain = mid_upper if y > spec.stomion[0] else mid_lower
        return _on_chain(chain, _chain_at_y(chain, v, y), skin_faces)

    for k, target in enumerate(_JAW_CONTOUR[:-1]):
        put(16 - k, _snap(target, v, faces, skin_face))
        put(k, _snap(target * [-1.0, 1.0, 1.0], v, faces, skin_face))
    put(8, on_midline(_JAW_CONTOUR[-1, 1]))
    for k, x in enumerate((0.013, 0.022, 0.031, 0.040, 0.049)):
        y = float(shape.brow_line(np.array([x]))[0])
        put(22 + k, on_face(x, y))
        put(21 - k, on_face(-x, y))
    ey = spec.eye_centre[1]
    ty = spec.nose_tip_y
    for i, y in zip((27, 28, 29, 30, 33), (ey + 0.009, ey - 0.006, ey - 0.020, ty, ty - 0.014)):
        put(i, on_midline(y))
    for i, (x, y) in zip((31, 32, 34, 35), ((-0.0135, ty - 0.010), (-0.0065, ty - 0.0125), (0.0065, ty - 0.0125), (0.0135, ty - 0.010))):
        put(i, on_face(x, y))

    # Eyes: corners and thirds of the lid margins (inner to outer along each slit).
    for e, (inner, up_in, up_out, outer, lo_out, lo_in) in ((0, (42, 43, 44, 45, 46, 47)), (1, (39, 38, 37, 36, 41, 40))):
        upper, lower = layout.lid_rows(e)
        put(inner, _on_chain(upper, 0.0, skin_faces))
        put(outer, _on_chain(upper, 1.0, skin_faces))
        put(up_in, _on_chain(upper, 1 / 3, skin_faces))
        put(up_out, _on_chain(upper, 2 / 3, skin_faces))
        put(lo_in, _on_chain(lower, 1 / 3, skin_faces))
        put(lo_out, _on_chain(lower, 2 / 3, skin_faces))

    # Mouth: outer contour on the vermilion borders, inner contour on the slit edges.
    upper_chain = layout.upper_lip_row()  # right corner to left corner, x increasing
    lower_chain = layout.lower_lip_row()
    upper_side = np.zeros(len(faces), bool)
    lower_side = np.zeros(len(faces), bool)
    ym = spec.stomion[0]
    centroid_y = v[faces[:n_skin_faces]].mean(1)[:, 1]
    upper_side[:n_skin_faces] = centroid_y > ym
    lower_side[:n_skin_faces] = centroid_y < ym
    put(48, _on_chain(upper_chain, 0.0, skin_faces))
    put(54, _on_chain(upper_chain, 1.0, skin_faces))
    up, lo = shape.lip_heights(np.array([0.0, 0.0062, 0.0075, 0.016]))
    put(51, on_midline(ym + up[0] - 0.0008))
    put(57, on_midline(ym - lo[0] + 0.0008))
    for (left, right), x, h in (((52, 50), 0.0062, up[1]), ((53, 49), 0.016, up[3])):
        put(left, on_face(x, ym + h - 0.0008, allowed=upper_side))
        put(right, on_face(-x, ym + h - 0.0008, allowed=upper_side))
    for (left, right), x, h in (((56, 58), 0.0075, lo[2]), ((55, 59), 0.016, lo[3])):
        put(left, on_face(x, ym - h + 0.0008, allowed=lower_side))
        put(right, on_face(-x, ym - h + 0.0008, allowed=lower_side))
    corner_in = 0.09
    put(60, _on_chain(upper_chain, corner_in, skin_faces))
    put(64, _on_chain(upper_chain, 1.0 - corner_in, skin_faces))
    for i, x in zip((61, 62, 63), (-0.009, 0.0, 0.009)):
        put(i, _on_chain(upper_chain, _chain_at_x(upper_chain, v, x), skin_faces))
    for i, x in zip((65, 66, 67), (0.009, 0.0, -0.009)):
        put(i, _on_chain(lower_chain, _chain_at_x(lower_chain, v, x), skin_faces))
    return lmk_faces, lmk_bary
