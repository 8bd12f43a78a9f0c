"""Build the ICT head (FLAME layout) from an ICT-FaceKit snapshot and write the shipped arrays.

    python -m backend.head.ict.build SNAPSHOT_DIR --out backend/head/ict/data

SNAPSHOT_DIR is a checkout of github.com/ICT-VGL/ICT-FaceKit or a bare git directory of it.
Written: ``ict_head.npz`` (the arrays, see ``backend.head.ict`` for how they are read),
``ict_head.json`` (sha256 and shape of every array, and the numbers measured while
building) and ``LICENSE-ICT-FaceKit.txt`` (ICT-FaceKit's MIT license, copied from the
snapshot). What is kept, the frame, the rig and the landmarks are described in docs/head.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.optimize import nnls
from scipy.spatial import cKDTree

from backend.head.ict import ARRAYS_FILE, CHECKSUMS_FILE, DELTA_STEP_M, LICENSE_FILE, NAME
from backend.head.ict import rig
from backend.head.ict.source import LANDMARK_VERTICES, NUM_IDENTITIES, PARTS, IctMesh, IctPart, Snapshot
from backend.head.registry import load_head_model
from backend.wire.errors import InputError, SpatialAvatarError

# The parts a Gaussian head needs; eye sockets (hidden behind the eyeballs), tear film, eye
# blend and occlusion meshes and eyelash strips are left out.
KEPT_PARTS = ("face", "head_and_neck", "mouth_socket", "gums_and_tongue", "teeth", "eyeball_left", "eyeball_right")
CM_TO_M = 0.01
# Where the midpoint of the eyeball centres goes (FLAME frame, metres): where the built-in
# head has it, so both heads share framing, joint heights and camera defaults.
EYE_MIDPOINT = np.array([0.0, 0.002, 0.066])
# ICT's README: teeth 0-15 are the upper, 16-31 the lower teeth; the lower ones start here.
LOWER_TEETH_START = 19247
# ICT's README: the first 770 vertices of each eyeball are its sclera, the rest its iris;
# the first 800 polygons are the sclera's.
SCLERA_VERTICES = 770
SCLERA_POLYGONS = 800
# Share of an eye socket's old UV spot each eye chart may fill (a margin between charts).
EYE_CHART_FILL = 0.9
# ICT marks no ears (its "face" part runs over their fronts): an ear is the skin around the
# ear canal, measured on the neutral head in the shipped frame (metres): centre of the left
# canal (the right one mirrored), half-height and half-depth of the ear, and how far out from
# the mid-plane the ear starts.
EAR_CANAL = np.array([0.076, -0.025, -0.018])
EAR_HALF_HEIGHT = 0.036
EAR_HALF_DEPTH = 0.026
EAR_MIN_X = 0.062


def arkit_name(ict_name: str) -> str:
    """ARKit's spelling of an ICT expression name: ``mouthSmile_L`` -> ``mouthSmileLeft``, the
    names artists animate with (iPhone face capture, MetaHuman, VRM). ICT's two extras beyond
    ARKit's 52 (cheekPuff split per side; no tongueOut) are spelt the same way."""
    for suffix, side in (("_L", "Left"), ("_R", "Right")):
        if ict_name.endswith(suffix):
            return ict_name[: -len(suffix)] + side
    return ict_name

def _part(name: str) -> IctPart:
    return next(p for p in PARTS if p.name == name)


def _triangulate(mesh: IctMesh, polygons: range) -> tuple[np.ndarray, np.ndarray]:
    """Triangles [F, 3] and their UV triangles [F, 3]; each quad is split along its shorter diagonal."""
    tris: list[tuple[int, int, int]] = []
    uv_tris: list[tuple[int, int, int]] = []
    v = mesh.vertices
    for i in polygons:
        p, t = mesh.polygons[i], mesh.uv_polygons[i]
        if len(p) == 3:
            splits = ((0, 1, 2),)
        elif len(p) == 4:
            # The shorter diagonal gives the better-shaped pair of triangles.
            short_ac = np.linalg.norm(v[p[0]] - v[p[2]]) <= np.linalg.norm(v[p[1]] - v[p[3]])
            splits = ((0, 1, 2), (0, 2, 3)) if short_ac else ((0, 1, 3), (1, 2, 3))
        else:
            raise InputError(f"ICT-FaceKit polygon {i} has {len(p)} corners; only triangles and quads are expected")
        for a, b, c in splits:
            tris.append((p[a], p[b], p[c]))
            uv_tris.append((t[a], t[b], t[c]))
    return np.asarray(tris, np.int64), np.asarray(uv_tris, np.int64)


def _separate_eye_charts(mesh: IctMesh, part_faces: dict[str, tuple[int, int]], uv_tris: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """UVs [T', 2] and the kept parts' UV triangles with the eye charts moved off the face's tile.

    ICT maps both scleras and both irises over the whole of UV tile 0, on top of the face (it
    textures them with their own materials). A layout needs every texel in one triangle, so
    each eye's sclera and iris are scaled uniformly into the spot its eye socket (left out)
    had on tile 1: sclera above iris. Every other chart stays as ICT has it.
    """
    uv = [mesh.uv]
    total = len(mesh.uv)
    out = list(uv_tris)
    for k, name in enumerate(KEPT_PARTS):
        if not name.startswith("eyeball_"):
            continue
        socket = _part(name.replace("eyeball_", "eye_socket_"))
        spot = mesh.uv[np.unique([t for i in range(*socket.polygons) for t in mesh.uv_polygons[i]])]
        lo, hi = spot.min(0), spot.max(0)
        half = np.array([hi[0] - lo[0], 0.5 * (hi[1] - lo[1])])
        tris = uv_tris[k].copy()
        # Triangles in polygon order: the sclera's polygons come first.
        first_polygon = _part(name).polygons[0]
        n_sclera = sum(1 if len(mesh.polygons[i]) == 3 else 2 for i in range(first_polygon, first_polygon + SCLERA_POLYGONS))
        for rows, slot in ((slice(0, n_sclera), 1), (slice(n_sclera, None), 0)):
            ids, inverse = np.unique(tris[rows], return_inverse=True)
            chart = mesh.uv[ids]
            c_lo, c_hi = chart.min(0), chart.max(0)
            scale = EYE_CHART_FILL * np.min(half / (c_hi - c_lo))
            centre = lo + half * np.array([0.5, slot + 0.5])
            uv.append(centre + (chart - 0.5 * (c_lo + c_hi)) * scale)
            tris[rows] = total + inverse.reshape(-1, 3)
            total += len(ids)
        out[k] = tris
    return np.concatenate(uv), out


def _sphere_centre(points: np.ndarray) -> np.ndarray:
    """Least-squares sphere centre [3] of [N, 3] points."""
    a = np.c_[2.0 * points, np.ones(len(points))]
    return np.linalg.lstsq(a, (points**2).sum(1), rcond=None)[0][:3]


def _convex_weights_for(points: np.ndarray, target: np.ndarray) -> np.ndarray:
    """[N] non-negative weights summing to 1 whose weighted mean of ``points`` is ``target``,
    kept close to uniform (the eyeball's vertex mean sits in front of its centre because of
    the cornea, so the plain mean will not do)."""
    n = len(points)
    hard = 1e3  # the mean and the sum are constraints; closeness to uniform is the tie-breaker
    a = np.vstack([hard * points.T, hard * np.ones((1, n)), np.eye(n)])
    b = np.concatenate([hard * target, [hard], np.full(n, 1.0 / n)])
    w, _ = nnls(a, b, maxiter=50 * n)
    return w / w.sum()


def _landmarks(faces: np.ndarray, vertex_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """68 (face, one-hot barycentric) pairs: the first triangle that holds each landmark vertex."""
    lmk_faces = np.zeros(len(vertex_ids), np.int64)
    lmk_bary = np.zeros((len(vertex_ids), 3), np.float32)
    for k, vid in enumerate(vertex_ids):
        f, corner = np.argwhere(faces == vid)[0]
        lmk_faces[k] = f
        lmk_bary[k, corner] = 1.0
    return lmk_faces, lmk_bary


def _encode(deltas: np.ndarray) -> np.ndarray:
    """[K, V, 3] metres -> int16 differences along the vertex axis of the deltas in DELTA_STEP_M steps.

    Neighbouring vertex indices are mostly neighbours on the mesh, so the differences are
    small and deflate well; ``backend.head.ict.decode_deltas`` undoes this exactly.
    """
    q = np.round(deltas / DELTA_STEP_M).astype(np.int64)
    d = np.diff(q, axis=1, prepend=0)
    if np.abs(d).max() >= 2**15:
        raise ValueError("a blendshape changes too fast between neighbouring vertices for int16 differences")
    return d.astype(np.int16)


def build_arrays(snapshot: Snapshot) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The shipped arrays (see ``backend.head.ict``) and the numbers measured on the way."""
    mesh = snapshot.neutral()
    kept = [_part(n) for n in KEPT_PARTS]
    keep = np.zeros(len(mesh.vertices), bool)
    for p in kept:
        keep[slice(*p.vertices)] = True
    old_ids = np.nonzero(keep)[0]
    new_id = np.full(len(keep), -1)
    new_id[old_ids] = np.arange(len(old_ids))

    part_faces: dict[str, tuple[int, int]] = {}
    tris, uv_tris = [], []
    count = 0
    for p in kept:
        t, u = _triangulate(mesh, range(*p.polygons))
        if (new_id[t] < 0).any():
            raise InputError(f"ICT-FaceKit part '{p.name}' uses vertices of a part that is left out")
        tris.append(new_id[t])
        uv_tris.append(u)
        part_faces[p.name] = (count, count + len(t))
        count += len(t)
    faces = np.concatenate(tris)
    uv_all, uv_tris = _separate_eye_charts(mesh, part_faces, uv_tris)
    used_uv, uv_faces = np.unique(np.concatenate(uv_tris), return_inverse=True)
    uv = uv_all[used_uv].astype(np.float32)
    uv_faces = uv_faces.reshape(-1, 3)

    def mask_of(*names: str) -> np.ndarray:
        m = np.zeros(len(keep), bool)
        for n in names:
            m[slice(*_part(n).vertices)] = True
        return m[keep]

    # Frame: ICT is centimetres, +y up, +z forward, +x the subject's left (its "left" eyeball
    # is at +x), like FLAME; only the unit and the origin change.
    source = mesh.vertices * CM_TO_M
    eye_centres = []
    for name in ("eyeball_left", "eyeball_right"):
        start = _part(name).vertices[0]
        eye_centres.append(_sphere_centre(source[start : start + SCLERA_VERTICES]))
    shift = EYE_MIDPOINT - 0.5 * (eye_centres[0] + eye_centres[1])
    template = (source + shift)[keep]

    names = snapshot.expression_names()
    identity = np.stack([snapshot.positions(f"identity{i:03d}")[keep] - mesh.vertices[keep] for i in range(NUM_IDENTITIES)]) * CM_TO_M
    expression = np.stack([snapshot.positions(n)[keep] - mesh.vertices[keep] for n in names]) * CM_TO_M
    names = tuple(arkit_name(n) for n in names)

    # Rig (see rig.py): jaw from ICT's own jawOpen, eyes at their sphere centres.
    jaw_open = expression[names.index("jawOpen")]
    lower = new_id[np.arange(LOWER_TEETH_START, _part("teeth").vertices[1])]
    pivot, rot, jaw_residual = rig.jaw_pivot(template[lower], template[lower] + jaw_open[lower])
    jaw = rig.jaw_weights(template, jaw_open, pivot, rot)
    teeth = mask_of("teeth")
    lower_teeth = np.zeros(len(template), bool)
    lower_teeth[lower] = True
    jaw[teeth] = lower_teeth[teeth]  # every tooth is rigid: the lower ones on the jaw, the upper on the skull
    left_eye, right_eye = mask_of("eyeball_left"), mask_of("eyeball_right")
    eye_rows = []
    for name, centre in zip(("eyeball_left", "eyeball_right"), eye_centres):
        start = new_id[_part(name).vertices[0]]
        row = np.zeros(len(template))
        row[start : start + SCLERA_VERTICES] = _convex_weights_for(template[start : start + SCLERA_VERTICES], centre + shift)
        eye_rows.append(row)
    skin = mask_of("face", "head_and_neck")
    skin_faces = faces[skin[faces].all(axis=1)]
    j_regressor = rig.joint_regressor(template, skin_faces, pivot, (eye_rows[0], eye_rows[1]))
    weights = rig.skinning_weights(template, jaw, left_eye, right_eye)

    lmk_faces, lmk_bary = _landmarks(faces[: part_faces["face"][1]], new_id[np.asarray(LANDMARK_VERTICES)])
    masks = _part_masks(template, skin, mask_of, lmk_faces, lmk_bary, faces)

    arrays = {
        "v_template": template.astype(np.float32),
        "faces": faces.astype(np.int32),
        "uv_coords": uv,
        "uv_faces": uv_faces.astype(np.int32),
        "identity": _encode(identity),
        "expression": _encode(expression),
        "expr_names": np.asarray(names),
        "j_regressor": j_regressor.astype(np.float32),
        "weights": weights.astype(np.float32),
        "parents": rig.PARENTS.astype(np.int32),
        "lmk_faces": lmk_faces.astype(np.int32),
        "lmk_bary": lmk_bary,
        "mask_names": np.asarray(sorted(masks)),
        "masks": np.stack([masks[k] for k in sorted(masks)]),
    }
    report = {
        "vertices": int(len(template)),
        "faces": int(len(faces)),
        "face_part_triangles": int(part_faces["face"][1] - part_faces["face"][0]),
        "jaw_pivot_m": [round(float(x), 5) for x in pivot],
        "jaw_open_angle_deg": round(float(np.degrees(np.arctan2(rot[2, 1], rot[1, 1]))), 2),
        "jaw_fit_residual_mm": round(jaw_residual * 1e3, 3),
        "shift_m": [round(float(x), 5) for x in shift],
        **_precision(identity, expression),
    }
    return arrays, report


def _precision(identity: np.ndarray, expression: np.ndarray) -> dict[str, float]:
    """Max vertex errors (mm) of the shipped fixed-point deltas and, for comparison, of float16."""
    out = {}
    for key, d in (("identity", identity), ("expression", expression)):
        fixed = np.cumsum(_encode(d).astype(np.int64), axis=1) * DELTA_STEP_M
        out[f"{key}_fixed_point_max_error_mm"] = float(np.linalg.norm(fixed - d, axis=-1).max() * 1e3)
        out[f"{key}_float16_max_error_mm"] = float(np.linalg.norm(d.astype(np.float16).astype(np.float64) - d, axis=-1).max() * 1e3)
    # A sampled head (identity ~ N(0, 1), all expressions at 0.5) accumulates the rounding of every column.
    rng = np.random.default_rng(0)
    coeffs = rng.normal(size=(16, len(identity)))
    exact = np.einsum("bk,kvc->bvc", coeffs, identity) + 0.5 * expression.sum(0)
    fixed = np.cumsum(_encode(identity).astype(np.int64), axis=1) * DELTA_STEP_M
    fixed_e = np.cumsum(_encode(expression).astype(np.int64), axis=1) * DELTA_STEP_M
    shipped = np.einsum("bk,kvc->bvc", coeffs, fixed) + 0.5 * fixed_e.sum(0)
    half = np.einsum("bk,kvc->bvc", coeffs, identity.astype(np.float16).astype(np.float64)) + 0.5 * expression.astype(np.float16).astype(np.float64).sum(0)
    out["sampled_head_fixed_point_max_error_mm"] = float(np.linalg.norm(shipped - exact, axis=-1).max() * 1e3)
    out["sampled_head_float16_max_error_mm"] = float(np.linalg.norm(half - exact, axis=-1).max() * 1e3)
    return {k: round(v, 5) for k, v in out.items()}


def _part_masks(
    template: np.ndarray,
    skin: np.ndarray,
    mask_of: Callable[..., np.ndarray],
    lmk_faces: np.ndarray,
    lmk_bary: np.ndarray,
    faces: np.ndarray,
) -> dict[str, np.ndarray]:
    """[V] bool masks by name: the parts, plus "neck" (skin below the mandible line, or low,
    off the scalp), "scalp" and "ears" (which ICT does not mark).

    Args:
        template: [V, 3] metres; skin: [V] bool; mask_of: part names -> [V] bool;
        lmk_faces, lmk_bary: the landmark embedding into ``faces`` [F, 3].
    """
    lmk = (template[faces[lmk_faces]] * lmk_bary[:, :, None]).sum(1)
    y, z = template[:, 1], template[:, 2]
    # The mandible line in the (y, z) plane: from the jaw angle (contour points 3 and 13) to the menton (8).
    gy, gz = 0.5 * (lmk[3, 1:] + lmk[13, 1:])
    my, mz = lmk[8, 1:]
    below = ((z - gz) * (my - gy) - (y - gy) * (mz - gz)) / np.hypot(my - gy, mz - gz)
    mouth = mask_of("mouth_socket", "gums_and_tongue")
    teeth = mask_of("teeth")
    ears = _ears(template, skin)
    scalp = _scalp(template, skin, lmk) & ~ears
    return {
        "face": mask_of("face"),
        "scalp": scalp,
        "ears": ears,
        "skin": skin,
        "neck": skin & ((below > 0.004) | (y < -0.13)) & ~scalp,
        "mouth": mouth,
        "teeth": teeth,
        # What the rest of the code treats as the inside of the mouth (albedo, face regions).
        "mouth_interior": mouth | teeth,
        "left_eyeball": mask_of("eyeball_left"),
        "right_eyeball": mask_of("eyeball_right"),
    }


def _ears(template: np.ndarray, skin: np.ndarray) -> np.ndarray:
    """[V] bool: the skin of both ears (an ellipse around each canal, away from the mid-plane)."""
    d = template - EAR_CANAL
    inside = (d[:, 1] / EAR_HALF_HEIGHT) ** 2 + (d[:, 2] / EAR_HALF_DEPTH) ** 2 < 1.0
    return skin & inside & (np.abs(template[:, 0]) > EAR_MIN_X)


def _scalp(template: np.ndarray, skin: np.ndarray, lmk: np.ndarray) -> np.ndarray:
    """[V] bool: the skin above the hairline the built-in head draws, carried over.

    The built-in head's hairline was drawn by hand; the two heads' 68 landmarks give an
    affine map of this head onto it, and each skin vertex takes the label of the built-in
    skin vertex nearest its image (a median 4 mm away on the neutral heads).

    Args:
        template: [V, 3] metres; skin: [V] bool; lmk: [68, 3] this head's landmarks, metres.
    """
    builtin = load_head_model("builtin")
    b_verts = builtin.v_template.double()
    b_lmk = builtin.landmarks(b_verts[None])[0].numpy()
    to_builtin, *_ = np.linalg.lstsq(np.c_[lmk, np.ones(len(lmk))], b_lmk, rcond=None)
    b_skin = builtin.data.part_masks["skin"]
    _, nearest = cKDTree(b_verts.numpy()[b_skin]).query(np.c_[template, np.ones(len(template))] @ to_builtin)
    return skin & builtin.data.part_masks["scalp"][b_skin][nearest]


def array_checksums(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, object]]:
    """sha256 of each array's C-order bytes, with its shape and dtype."""
    return {
        k: {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()}
        for k, a in sorted(arrays.items())
    }


def write(arrays: dict[str, np.ndarray], report: dict[str, float], license_text: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / ARRAYS_FILE, **arrays)
    meta = {"name": NAME, "source": "github.com/ICT-VGL/ICT-FaceKit (MIT)", "delta_step_m": DELTA_STEP_M, "build": report, "arrays": array_checksums(arrays)}
    (out / CHECKSUMS_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    (out / LICENSE_FILE).write_text(license_text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.head.ict.build", description=__doc__.splitlines()[0])
    parser.add_argument("snapshot", type=Path, help="ICT-FaceKit checkout or bare git directory")
    parser.add_argument("--out", type=Path, required=True, help="folder to write ict_head.npz, ict_head.json and the license to")
    args = parser.parse_args(argv)
    try:
        snapshot = Snapshot(args.snapshot)
        arrays, report = build_arrays(snapshot)
        write(arrays, report, snapshot.license_text(), args.out)
    except SpatialAvatarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
