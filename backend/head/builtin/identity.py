"""Identity basis: named proportions first, then smooth random low-frequency fields.

Columns are orthogonalised in order and scaled so that a coefficient drawn from N(0, 1)
moves the head by a plausible amount: the leading column peaks at 9 mm and later ones
shrink. Every field is made rigid around the eyes (``rigid_eyes``), so eyeballs translate
without deforming and the lids keep resting on them.
"""

from __future__ import annotations

import numpy as np

from backend.head.builtin.features import FaceShape, gauss, smoothstep
from backend.head.builtin.fields import orthogonalize, rigid_eyes
from backend.head.builtin.mesh import HeadMesh
from backend.head.builtin.spec import HeadSpec

IDENTITY_UNITS: tuple[tuple[str, str], ...] = (
    ("head_size", "whole head larger"),
    ("head_width", "wider head"),
    ("head_length", "longer back of the head"),
    ("face_height", "longer lower face (eyes to chin)"),
    ("jaw_width", "wider jaw"),
    ("nose_length", "nose sticks out further"),
    ("nose_width", "wider nose base"),
    ("brow_ridge", "stronger brow ridge"),
    ("cheek_fullness", "fuller cheeks"),
    ("chin", "chin forward and down"),
    ("ear_size", "larger ears"),
    ("eye_spacing", "eyes further apart"),
    ("forehead_slope", "more upright forehead"),
    ("lip_fullness", "fuller lips"),
    ("neck_thickness", "thicker neck"),
    ("crown_height", "higher crown"),
    ("mouth_width", "wider mouth"),
    ("nose_bridge", "higher nose bridge"),
    ("eye_height", "eyes higher in the face"),
    ("ear_position", "ears higher and further back"),
)


def _outward(v: np.ndarray, centre_z: float) -> np.ndarray:
    d = np.stack([v[:, 0], np.zeros(len(v)), v[:, 2] - centre_z], axis=1)
    return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-9)


def _named_fields(spec: HeadSpec, shape: FaceShape) -> list:
    """Field functions [N, 3] -> [N, 3] (metres per unit, before scaling) in IDENTITY_UNITS order."""
    ex, ey, ez = spec.eye_centre
    ty = spec.nose_tip_y
    ym = spec.stomion[0]
    ear = np.asarray(spec.ear_centre)

    def front(v: np.ndarray) -> np.ndarray:
        return smoothstep(0.0, 0.04, v[:, 2])

    def nose_weight(v: np.ndarray) -> np.ndarray:
        relief = shape.face_depth(v[:, 0], v[:, 1]) - shape.face_depth(v[:, 0], v[:, 1], nose=False)
        return np.clip(relief / 0.02, 0.0, 1.0) * front(v)

    def ear_weight(v: np.ndarray) -> np.ndarray:
        # A soft disc around each pinna, so its outline moves as one with the ear.
        d2 = (v[:, 1] - ear[1]) ** 2 + (v[:, 2] - ear[2]) ** 2
        return np.exp(-d2 / (2 * 0.024**2)) * smoothstep(0.045, 0.065, np.abs(v[:, 0]))

    def eyes_near(v: np.ndarray) -> np.ndarray:
        return sum(np.exp(-np.sum((v - c) ** 2, axis=1) / (2 * 0.02**2)) for c in ([ex, ey, ez], [-ex, ey, ez]))

    def zeros(v: np.ndarray) -> np.ndarray:
        return np.zeros(len(v))

    def vec(dx, dy, dz) -> np.ndarray:
        return np.stack([dx, dy, dz], axis=1)

    return [
        lambda v: 0.05 * (v - [0.0, 0.0, -0.01]),
        lambda v: vec(0.07 * v[:, 0], zeros(v), zeros(v)),
        lambda v: vec(zeros(v), zeros(v), 0.06 * v[:, 2] * smoothstep(0.03, -0.03, v[:, 2])),
        lambda v: vec(
            zeros(v),
            0.065 * np.clip(v[:, 1] - ey, -0.125, 0.0) * smoothstep(-0.03, 0.01, v[:, 2]) * smoothstep(-0.2, -0.12, v[:, 1]),
            zeros(v),
        ),
        lambda v: vec(
            0.12 * v[:, 0] * gauss(v[:, 1], v[:, 2], -0.07, 0.0, 0.03, 0.05) * smoothstep(0.02, 0.05, np.abs(v[:, 0])), zeros(v), zeros(v)
        ),
        lambda v: nose_weight(v)[:, None] * [0.0, -0.0015, 0.006],
        lambda v: vec(0.2 * v[:, 0] * gauss(v[:, 0], v[:, 1], 0.0, ty - 0.006, 0.02, 0.012) * front(v), zeros(v), zeros(v)),
        lambda v: vec(
            zeros(v),
            zeros(v),
            0.004 * np.exp(-(((v[:, 1] - shape.brow_line(v[:, 0])) / 0.01) ** 2) - ((np.abs(v[:, 0]) - 0.028) / 0.025) ** 2) * front(v),
        ),
        lambda v: 0.004 * (gauss(np.abs(v[:, 0]), v[:, 1], 0.045, -0.045, 0.02, 0.02) * front(v))[:, None] * _outward(v, 0.0),
        lambda v: (
            (gauss(v[:, 0], v[:, 1], 0.0, spec.chin_y, 0.02, 0.016) * smoothstep(0.05, 0.08, v[:, 2]))[:, None] * [0.0, -0.002, 0.005]
        ),
        lambda v: 0.15 * ear_weight(v)[:, None] * (v - ear * np.stack([np.sign(v[:, 0]), np.ones(len(v)), np.ones(len(v))], axis=1)),
        lambda v: vec(0.003 * np.sign(v[:, 0]) * eyes_near(v), zeros(v), zeros(v)),
        lambda v: vec(zeros(v), zeros(v), 0.004 * smoothstep(0.02, 0.09, v[:, 1]) * front(v)),
        lambda v: vec(zeros(v), zeros(v), 0.0025 * gauss(v[:, 0], v[:, 1], 0.0, ym, 0.02, 0.01) * front(v)),
        lambda v: 0.004 * smoothstep(-0.09, -0.13, v[:, 1])[:, None] * _outward(v, spec.neck_centre_z),
        lambda v: vec(zeros(v), 0.005 * smoothstep(0.04, 0.11, v[:, 1]), zeros(v)),
        lambda v: vec(0.15 * v[:, 0] * gauss(v[:, 0], v[:, 1], 0.0, ym, 0.03, 0.012) * front(v), zeros(v), zeros(v)),
        lambda v: vec(zeros(v), zeros(v), 0.003 * gauss(v[:, 0], v[:, 1], 0.0, ey + 0.004, 0.008, 0.015) * front(v)),
        lambda v: vec(zeros(v), 0.0025 * eyes_near(v), zeros(v)),
        lambda v: ear_weight(v)[:, None] * [0.0, 0.003, -0.003],
    ]


def _random_fields(mesh: HeadMesh, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random displacement fields: ([V, 3, count] at the vertices, [2, 3, count] at the
    eye centres).

    All fields mix one bank of random plane waves; field k only uses waves no shorter than
    its wavelength, which shortens from a quarter metre to 6 cm along the columns. Three in
    four fields are mirror-symmetric, the rest antisymmetric.
    """
    bank = 384
    direction = rng.normal(size=(bank, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    wavenumber = 2 * np.pi / rng.uniform(0.06, 0.4, bank)
    omega = (direction * wavenumber[:, None]).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, bank).astype(np.float32)
    k = np.arange(count)
    shortest = 0.25 * (0.06 / 0.25) ** (k / max(count - 1, 1))
    usable = (2 * np.pi / wavenumber)[:, None] >= shortest[None]  # [bank, count]
    mix = (rng.normal(size=(bank, 3, count)) * usable[:, None]).astype(np.float32)
    sign = np.where(k % 4 == 3, -1.0, 1.0)
    mirror = np.array([-1.0, 1.0, 1.0])
    points = np.concatenate([mesh.vertices, mesh.eye_centres]).astype(np.float32)
    # float32: these arrays are large, and a basis direction needs no more precision.
    waves = np.cos(points @ omega.T + phase)
    raw = (waves @ mix.reshape(bank, -1)).reshape(len(points), 3, count).astype(np.float64)
    # Mirror-(anti)symmetric part f(p) +/- M f(M p), M the reflection x -> -x. The mesh is
    # symmetric, so f(M p) is f at the mirror vertex (and at the other eye centre).
    n = len(mesh.vertices)
    reflected = np.concatenate([mesh.mirror, [n + 1, n]])
    out = 0.5 * (raw + sign[None, None] * raw[reflected] * mirror[None, :, None])
    return out[:n], out[n:]


def identity_basis(spec: HeadSpec, shape: FaceShape, mesh: HeadMesh) -> np.ndarray:
    """[V, 3, spec.identity_columns] orthogonal identity columns (metres per unit)."""
    named = _named_fields(spec, shape)
    n_rest = spec.identity_columns - len(named)
    rng = np.random.default_rng(spec.seed)
    n = len(mesh.vertices)
    designed = np.stack([f(np.concatenate([mesh.vertices, mesh.eye_centres])) for f in named], axis=-1)
    random_at_vertices, random_at_eyes = _random_fields(mesh, n_rest, rng)
    values = np.concatenate([designed[:n], random_at_vertices], axis=-1)
    at_eyes = np.concatenate([designed[n:], random_at_eyes], axis=-1)
    cols = orthogonalize(rigid_eyes(mesh, values, at_eyes))
    # Peak displacement per unit coefficient: 9 mm for the first named column, falling to
    # 1.5 mm for the last; the random fields start below 1 mm and fade quickly, so heads
    # drawn from N(0, 1) differ mostly in the named proportions.
    peak = np.linalg.norm(cols, axis=1).max(axis=0)
    k = np.arange(spec.identity_columns) + 1.0
    n = len(named)
    target = np.where(k <= n, 0.009 * k**-0.6, 0.0007 * (k / (n + 1)) ** -1.5)
    return cols * (target / peak)
