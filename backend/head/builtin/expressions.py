"""Expression basis: named FACS-like units first, then smooth localised random fields.

Each named unit is a displacement field (metres per unit coefficient) designed so that a
coefficient of 1 is a moderate, 2 a clear and 3 a strong expression; positive values do
what the name says. ``_L`` / ``_R`` are the subject's left (+x) / right (-x). Eyelid units
are built by re-casting the skin with the lids moved (``LidState``), so lid margins stay on
the eyeball; blink closes the lid fully at ``BLINK_CLOSED``. The columns are orthogonalised
in order, so earlier units keep their design and later ones lose their overlap with them.
Eyeballs never move with expressions; the mouth pocket follows its lip edge.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from backend.head.builtin.features import FaceShape, gauss, smoothstep
from backend.head.builtin.fields import VertexFacts, follow_pocket, orthogonalize, vertex_facts
from backend.head.builtin.mesh import HeadMesh, skin_with_lids
from backend.head.builtin.skin import LidState
from backend.head.builtin.spec import HeadSpec

# Coefficient at which blink_L / blink_R bring the upper lid onto the lower lid.
BLINK_CLOSED = 2.75

EXPRESSION_UNITS: tuple[tuple[str, str], ...] = (
    ("brow_raise_L", "left brow and forehead up"),
    ("brow_raise_R", "right brow and forehead up"),
    ("brow_lower_L", "left brow down and toward the nose"),
    ("brow_lower_R", "right brow down and toward the nose"),
    ("blink_L", f"left upper lid down; closed at +{BLINK_CLOSED}"),
    ("blink_R", f"right upper lid down; closed at +{BLINK_CLOSED}"),
    ("squint_L", "left lower lid and cheek up, upper lid slightly down"),
    ("squint_R", "right lower lid and cheek up, upper lid slightly down"),
    ("smile_L", "left mouth corner up, out and back; cheek up"),
    ("smile_R", "right mouth corner up, out and back; cheek up"),
    ("frown_L", "left mouth corner down"),
    ("frown_R", "right mouth corner down"),
    ("pucker", "lips forward and narrowed"),
    ("funnel", "lips forward and parted into a rounded opening"),
    ("lip_press", "lips pressed together and thinned"),
    ("cheek_puff_L", "left cheek blown out"),
    ("cheek_puff_R", "right cheek blown out"),
    ("nose_wrinkle", "nose sides and upper lip up, inner brows slightly down"),
    ("upper_lip_raise", "upper lip up, uncovering the mouth"),
    ("lower_lip_depress", "lower lip down"),
    ("mouth_left", "mouth toward the subject's left, left corner drawn back"),
    ("mouth_right", "mouth toward the subject's right, right corner drawn back"),
    ("dimple_L", "left mouth corner pulled back into the cheek"),
    ("dimple_R", "right mouth corner pulled back into the cheek"),
    ("jaw_clench", "masseters bulge at the jaw angles"),
    ("chin_raise", "chin boss and lower lip pushed up"),
    ("nostril_flare", "nostril wings out"),
)
EXPRESSION_NAMES: tuple[str, ...] = tuple(name for name, _ in EXPRESSION_UNITS)


class _Units:
    """Named unit fields for one mesh; ``side`` is +1 for a left unit, -1 for its mirror
    (the field is evaluated at mirrored x and its x component flipped)."""

    def __init__(self, spec: HeadSpec, shape: FaceShape, mesh: HeadMesh, facts: VertexFacts) -> None:
        self.spec, self.shape, self.mesh, self.f = spec, shape, mesh, facts
        p = facts.p
        self.x, self.y, self.z = p[:, 0], p[:, 1], p[:, 2]
        # Only the front of the head moves with the face.
        self.front = smoothstep(0.0, 0.04, self.z) * facts.skin
        self.ey = spec.eye_centre[1]
        self.ym = spec.stomion[0]
        self.mw = spec.mouth_half_width
        # Brow units stop short of the lid margins so blink keeps its exact closure.
        self.above_lids = smoothstep(self.ey + 0.008, self.ey + 0.021, self.y)

    def vec(self, w: np.ndarray, d: tuple[float, float, float], side: float = 1.0) -> np.ndarray:
        """Displacement ``w * d`` with d's x flipped for right units."""
        return w[:, None] * np.array([d[0] * side, d[1], d[2]])

    def g(self, cx: float, cy: float, sx: float, sy: float, side: float = 1.0) -> np.ndarray:
        return gauss(self.x * side, self.y, cx, cy, sx, sy) * self.front

    def lids(self, change: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]], side: float, per: float) -> np.ndarray:
        """Skin displacement from moving one eye's lids, divided by the coefficient ``per``."""
        neutral = self.mesh.layout.neutral_lids(self.spec)
        e = 0 if side > 0 else 1
        upper, lower = neutral.upper.copy(), neutral.lower.copy()
        upper[e], lower[e] = change(neutral.upper[e], neutral.lower[e])
        moved = skin_with_lids(self.spec, self.shape, self.mesh, LidState(upper, lower))
        return (moved - self.mesh.vertices) / per

    def brow_weight(self, side: float, inner: bool) -> np.ndarray:
        ax = self.x * side
        lateral = np.exp(-(((ax - (0.018 if inner else 0.03)) / (0.016 if inner else 0.021)) ** 2))
        brow = self.shape.brow_line(self.x)
        vertical = (0.45 + 0.55 * np.exp(-(((self.y - brow) / 0.012) ** 2))) * smoothstep(0.095, 0.055, self.y)
        return lateral * vertical * self.above_lids * self.front * (ax > -0.01)

    def lips(self, sx: float = 0.021, sy: float = 0.011) -> np.ndarray:
        return self.g(0.0, self.ym, sx, sy)

    def unit(self, name: str) -> np.ndarray:
        """The field of one named unit."""
        if name in ("mouth_left", "mouth_right"):
            return self.mouth(1.0 if name == "mouth_left" else -1.0)
        if name.endswith(("_L", "_R")):
            return getattr(self, name[:-2])(1.0 if name.endswith("_L") else -1.0)
        return getattr(self, name)()

    # -- sided units ---------------------------------------------------------------------

    def brow_raise(self, side: float) -> np.ndarray:
        return self.vec(self.brow_weight(side, inner=False), (0.0, 0.0042, 0.0006), side)

    def brow_lower(self, side: float) -> np.ndarray:
        return self.vec(self.brow_weight(side, inner=True), (-0.0018, -0.0036, 0.0010), side)

    def blink(self, side: float) -> np.ndarray:
        # The upper margin comes down onto the lower margin.
        return self.lids(lambda up, dn: (-dn, dn), side, BLINK_CLOSED)

    def squint(self, side: float) -> np.ndarray:
        lids = self.lids(lambda up, dn: (up - 0.12 * (up + dn), dn - 0.42 * (up + dn)), side, 2.0)
        cheek = self.g(0.035, self.ey - 0.022, 0.017, 0.011, side) * smoothstep(self.ey - 0.008, self.ey - 0.014, self.y)
        return lids + self.vec(cheek, (0.0, 0.0016, 0.0008), side)

    def smile(self, side: float) -> np.ndarray:
        corner = self.g(self.mw, self.ym, 0.014, 0.012, side)
        cheek = self.g(0.040, self.ym + 0.026, 0.016, 0.015, side)
        return self.vec(corner, (0.0014, 0.0030, -0.0016), side) + self.vec(cheek, (0.0004, 0.0013, 0.0010), side)

    def frown(self, side: float) -> np.ndarray:
        corner = self.g(self.mw, self.ym - 0.003, 0.013, 0.013, side)
        chin = self.g(self.mw - 0.004, self.ym - 0.016, 0.012, 0.012, side)
        return self.vec(corner, (0.0008, -0.0040, -0.0004), side) + self.vec(chin, (0.0, -0.0012, 0.0004), side)

    def cheek_puff(self, side: float) -> np.ndarray:
        w = self.g(0.045, self.ym + 0.012, 0.016, 0.019, side)
        out = np.stack([self.x, np.zeros_like(self.x), self.z - 0.02], axis=1)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)
        return w[:, None] * out * 0.005 * (self.x * side > 0)[:, None]

    def mouth(self, side: float) -> np.ndarray:
        # A pure sideways shift would make left and right exact opposites (one direction in
        # an orthogonal basis); leading with the corner on that side keeps them distinct.
        lead = self.vec(self.g(self.mw, self.ym, 0.013, 0.012, side), (0.0032, 0.0005, -0.0015), side)
        middle = self.vec(self.g(0.0, self.ym, 0.012, 0.012), (0.0015, 0.0, 0.0), side)
        trail = self.vec(self.g(self.mw, self.ym, 0.013, 0.012, -side), (0.0007, 0.0, 0.0), side)
        return lead + middle + trail

    def dimple(self, side: float) -> np.ndarray:
        return self.vec(self.g(self.mw, self.ym, 0.009, 0.009, side), (0.0006, 0.0, -0.0030), side)

    # -- symmetric units -----------------------------------------------------------------

    def pucker(self) -> np.ndarray:
        w = self.lips()
        return w[:, None] * np.stack([-0.15 * self.x, np.zeros_like(self.x), np.full_like(self.x, 0.0050)], axis=1)

    def funnel(self) -> np.ndarray:
        # Lips forward and everted: each lip rolls outward from the stomion, opening a small
        # round hole in the middle while the corners close in.
        w = self.lips()
        roll = self.g(0.0, self.ym, 0.010, 0.006) * self.f.lip_side
        forward = w[:, None] * np.stack([-0.12 * self.x, np.zeros_like(self.x), 0.0030 + 0.25 * np.abs(self.y - self.ym)], axis=1)
        return forward + self.vec(roll, (0.0, 0.0018, 0.0))

    def lip_press(self) -> np.ndarray:
        w = self.lips(0.022, 0.012)
        return w[:, None] * np.stack([np.zeros_like(self.x), -0.35 * (self.y - self.ym), np.full_like(self.x, -0.0015)], axis=1)

    def nose_wrinkle(self) -> np.ndarray:
        ty = self.spec.nose_tip_y
        sides = self.g(0.0, ty - 0.004, 0.02, 0.012)
        lip = self.g(0.0, self.ym + 0.010, 0.02, 0.008) * (self.f.lip_side > 0)
        inner_brows = gauss(np.abs(self.x), self.y, 0.012, self.ey + 0.02, 0.010, 0.008) * self.front * self.above_lids
        return self.vec(sides, (0.0, 0.0026, 0.0)) + self.vec(lip, (0.0, 0.0010, 0.0)) + self.vec(inner_brows, (0.0, -0.0012, 0.0))

    def upper_lip_raise(self) -> np.ndarray:
        w = self.g(0.0, self.ym + 0.004, 0.020, 0.012) * (self.f.lip_side > 0)
        return self.vec(w, (0.0, 0.0030, 0.0010))

    def lower_lip_depress(self) -> np.ndarray:
        # Strongest at the lip edge (it parts the lips), unlike lip_press which works on the borders.
        w = self.g(0.0, self.ym - 0.002, 0.016, 0.010) * (self.f.lip_side < 0)
        return self.vec(w, (0.0, -0.0034, 0.0016))

    def jaw_clench(self) -> np.ndarray:
        w = gauss(self.y, self.z, -0.06, 0.004, 0.02, 0.02) * smoothstep(0.035, 0.055, np.abs(self.x)) * self.f.skin
        return w[:, None] * np.stack([np.sign(self.x) * 0.0025, np.zeros_like(self.x), np.zeros_like(self.x)], axis=1)

    def chin_raise(self) -> np.ndarray:
        w = self.g(0.0, self.ym - 0.02, 0.02, 0.015) * (self.f.lip_side < 0)
        return self.vec(w, (0.0, 0.0020, 0.0010))

    def nostril_flare(self) -> np.ndarray:
        ty = self.spec.nose_tip_y
        w = gauss(np.abs(self.x), self.y, 0.013, ty - 0.009, 0.007, 0.007) * self.front
        return w[:, None] * np.stack([np.sign(self.x) * 0.0015, np.zeros_like(self.x), np.zeros_like(self.x)], axis=1)


def _random_fields(mesh: HeadMesh, facts: VertexFacts, count: int, rng: np.random.Generator) -> np.ndarray:
    """[V, 3, count] smooth bumps on the face, each a few Gaussian blobs with random directions."""
    p = facts.p
    face = facts.skin & (p[:, 2] > 0.04) & (p[:, 1] > -0.12) & (p[:, 1] < 0.06)
    centres = p[face]
    front = smoothstep(0.0, 0.04, p[:, 2]) * facts.skin
    out = np.zeros((len(p), 3, count))
    for k in range(count):
        for _ in range(3):
            c = centres[rng.integers(len(centres))]
            sigma = rng.uniform(0.010, 0.022)
            w = np.exp(-np.sum((p - c) ** 2, axis=1) / (2 * sigma**2)) * front
            out[:, :, k] += w[:, None] * rng.normal(0.0, 1.0, 3)
        out[:, :, k] = follow_pocket(mesh, out[:, :, k])
    return out


def expression_basis(spec: HeadSpec, shape: FaceShape, mesh: HeadMesh) -> np.ndarray:
    """[V, 3, spec.expression_columns] orthogonal expression columns (metres per unit)."""
    facts = vertex_facts(mesh)
    units = _Units(spec, shape, mesh, facts)
    named = [follow_pocket(mesh, units.unit(name)) for name in EXPRESSION_NAMES]
    rest = spec.expression_columns - len(named)
    cols = np.concatenate([np.stack(named, axis=-1), _random_fields(mesh, facts, rest, np.random.default_rng(spec.seed + 1))], axis=-1)
    cols[facts.eyeball] = 0.0
    cols = orthogonalize(cols)
    # Random fields: a peak displacement shrinking from 1.5 mm to 0.3 mm with their index.
    peak = np.linalg.norm(cols, axis=1).max(axis=0)
    target = 0.0015 * (0.2 ** (np.arange(rest) / max(rest - 1, 1)))
    cols[..., len(named) :] *= target / peak[len(named) :]
    return cols
