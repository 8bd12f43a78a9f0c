"""mediapipe's face mesh embedded on a FLAME-format head: where each of its 468 points lies.

mediapipe defines its landmarks on its own canonical face (468 vertices, a mean face in
centimetres; it ships inside the Face Landmarker bundle, ``face_landmarker.task``, as the
geometry pipeline's canonical mesh). Registering that face onto a head gives every mediapipe
point a place on the head's surface (``correspondence.MediapipeEmbedding``), so the tracker
compares like with like: the head's landmarks are built from its mediapipe points exactly as
the targets are built from a detection. A head's own iBUG landmarks sit several millimetres
away from where mediapipe puts the same landmark (nasion, nose base, inner eye corners, the
jaw contour), a gap the fit could only close by bending the expression.

The registration, as non-rigid ICP on the head's identity space:

1. a similarity from the canonical face's iBUG points to the head's own (a rough start);
2. then, in turn: each canonical point's closest point on the head's skin; the similarity
   that best maps the canonical face onto those points (Umeyama); the identity coefficients
   that best move those points onto the canonical face (ridge least squares, so the head
   takes the canonical face's proportions without leaving its own span);
3. each canonical point's closest point on the shaped head: a triangle and barycentric
   coordinates, which hold on every identity, expression and pose of the head.

Shipped: the ICT head's (``backend/tracking/models/mediapipe_on_ict-facekit-v1.npz``, 9 kB),
rebuilt with ``python -m backend.tracking.embedding --head ict``. The canonical face lies on
it within 0.27 mm (median; 1.5 mm at most). The built-in head has none: its identity space
cannot take a human face's proportions (median 1.0 mm, up to 5.9 mm off), and with such an
embedding its head pose on synthetic renders came out worse (8.6 -> 10.4 degrees on a
tracking-test subject), so it keeps its own landmarks, as FLAME does.

No benchmark or other face data goes in: only the head and mediapipe's canonical face.
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from backend.head.builtin.landmarks import _closest_on_triangles
from backend.head.model import HeadModelData
from backend.head.registry import fingerprint, load_head_data
from backend.tracking.blendshapes import read_model
from backend.tracking.correspondence import NUM_FACE_MESH, MediapipeEmbedding, embedding_path, inner_table, model_points
from backend.tracking.fit import umeyama
from backend.wire.errors import InputError, SpatialAvatarError

CANONICAL_MESH = "geometry_pipeline_metadata_landmarks.binarypb"


@dataclass(frozen=True)
class RegistrationConfig:
    """Knobs of the registration.

    Attributes:
        iterations: closest-point / similarity / identity rounds.
        identity_sigma_mm: an identity coefficient of 1 costs as much as this RMS distance
            over the canonical points (the ridge prior; smaller keeps the head nearer its mean).
        candidates: nearest triangles (by centroid) searched for each closest point.
    """

    iterations: int = 40
    identity_sigma_mm: float = 0.1
    candidates: int = 16


def canonical_face(model: Path | None = None) -> np.ndarray:
    """[468, 3] mediapipe's canonical face in metres, FLAME's axes (+x the subject's left, +y up,
    +z where the face looks), read from the Face Landmarker bundle (checked by its SHA-256)."""
    from mediapipe.tasks.cc.vision.face_geometry.proto.geometry_pipeline_metadata_pb2 import GeometryPipelineMetadata

    with zipfile.ZipFile(io.BytesIO(read_model(model))) as bundle:
        meta = GeometryPipelineMetadata.FromString(bundle.read(CANONICAL_MESH))
    # Vertex buffer: x, y, z in centimetres, then u, v; the canonical face already looks down +z.
    vertices = np.asarray(meta.canonical_mesh.vertex_buffer, np.float64).reshape(-1, 5)[:, :3] * 0.01
    if vertices.shape[0] != NUM_FACE_MESH:
        raise ValueError(f"{CANONICAL_MESH}: expected {NUM_FACE_MESH} canonical vertices, got {vertices.shape[0]}")
    return vertices


def skin_triangles(data: HeadModelData) -> np.ndarray:
    """Indices of the triangles a canonical point may land on: skin, never eyeballs or the mouth's inside."""
    masks = data.part_masks or {}
    if "skin" in masks:
        keep = np.asarray(masks["skin"], bool)
    else:
        keep = np.ones(data.num_vertices, bool)
        for name in ("left_eyeball", "right_eyeball", "mouth_interior", "teeth"):
            if name in masks:
                keep &= ~np.asarray(masks[name], bool)
        if not masks and data.num_joints >= 5:  # FLAME without masks: the eye joints own the eyeballs
            keep &= data.weights[:, 3:5].max(axis=1) < 0.95
    return np.nonzero(keep[np.asarray(data.faces)].all(axis=1))[0]


def closest_points(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray, candidates: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each point's [N, 3] closest point on the triangles ``faces`` [F, 3] of ``vertices``:
    (index into ``faces`` [N], barycentrics [N, 3], distance [N])."""
    tri = vertices[faces]  # [F, 3, 3]
    _, near = cKDTree(tri.mean(axis=1)).query(points, k=min(candidates, len(faces)))
    near = np.asarray(near).reshape(len(points), -1)
    which = np.zeros(len(points), np.int64)
    bary = np.zeros((len(points), 3))
    dist = np.zeros(len(points))
    for i, p in enumerate(points):
        d2, b = _closest_on_triangles(p, tri[near[i]])
        k = int(np.argmin(d2))
        which[i], bary[i], dist[i] = near[i, k], b[k], np.sqrt(d2[k])
    return which, bary, dist


def register(data: HeadModelData, canonical: np.ndarray, config: RegistrationConfig = RegistrationConfig()) -> MediapipeEmbedding:
    """Embed the canonical face's 468 points on ``data``'s surface (see the module docstring)."""
    faces = np.asarray(data.faces, np.int64)
    skin = faces[skin_triangles(data)]
    template = data.v_template.astype(np.float64)
    basis = data.shapedirs[..., : data.n_shape].astype(np.float64)  # [V, 3, S]
    # 1. Rough start: the canonical face's iBUG points onto the head's own (inner 51).
    idx, w = inner_table()
    own = model_points(data, use_eyes=False, mediapipe=False).evaluate(template)[17:68]
    scale, R, t = umeyama((canonical[idx] * w[..., None]).sum(axis=1), own)
    beta = np.zeros(data.n_shape)
    ridge = len(canonical) * (config.identity_sigma_mm * 1e-3) ** 2
    for _ in range(config.iterations):
        shaped = template + basis @ beta
        target = scale * canonical @ R.T + t
        which, bary, _ = closest_points(target, shaped, skin, config.candidates)
        corners = skin[which]  # [N, 3] vertex indices
        # 2a. Similarity onto the closest points.
        on_head = (shaped[corners] * bary[..., None]).sum(axis=1)
        scale, R, t = umeyama(canonical, on_head)
        target = scale * canonical @ R.T + t
        # 2b. Identity: the closest points, linear in beta, onto the canonical face (ridge).
        A = (basis[corners] * bary[..., None, None]).sum(axis=1).reshape(-1, data.n_shape)  # [N*3, S]
        r = (target - (template[corners] * bary[..., None]).sum(axis=1)).reshape(-1)
        beta = np.linalg.solve(A.T @ A + ridge * np.eye(data.n_shape), A.T @ r)
    shaped = template + basis @ beta
    which, bary, dist = closest_points(scale * canonical @ R.T + t, shaped, skin, config.candidates)
    return MediapipeEmbedding(data.name, fingerprint(data), skin_triangles(data)[which], bary, dist * 1000.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Embed mediapipe's canonical face on a head and write the tracker's embedding file.")
    ap.add_argument("--head", required=True, help="builtin, ict, or a FLAME folder")
    ap.add_argument("--model", type=Path, help="face_landmarker.task (default: the one the ARKit command reads)")
    ap.add_argument("--out", type=Path, help="output file (default: the tracker's shipped file for that head)")
    args = ap.parse_args(argv)
    try:
        data = load_head_data(args.head)
        out = args.out or embedding_path(data.name)
        if out is None:
            raise InputError(f"head name {data.name!r} is no file name: pass --out")
        emb = register(data, canonical_face(args.model))
        emb.save(out)
    except SpatialAvatarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    d = emb.distance_mm
    print(f"{out}: {data.name} ({emb.fingerprint}), canonical points off the surface: median {np.median(d):.2f} mm, 95% {np.percentile(d, 95):.2f} mm, max {d.max():.2f} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
