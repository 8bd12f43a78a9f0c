"""What a synthetic identity carries beyond its albedo: hair volume, facial hair and lighting.

A bare textured head teaches a generator that hair is paint on the scalp and that colour
never depends on the light. Real portraits show hair standing centimetres off the skull,
beards, and a key light from one side. These are added here, all bound to the head model's
triangles, so they move with the head, the jaw and the neck as the surface does:

- **Hair** is a volume of strand-like Gaussians (long along the hair's flow, thin across)
  filling the space between the scalp and a style-dependent outer surface, offset along each
  triangle's normal: a buzz cut of millimetres up to long hair covering the ears and the back
  of the neck, with an optional fringe over the forehead.
- **Facial hair** is a thin volume of the same kind over the jaw, chin and upper lip.
- **Glasses** are rims, a bridge and temples of thin Gaussians in front of the eyes, bound
  to the nose and the temples, so that they turn with the head and stay put when
  the jaw opens or the eyes blink.
- **Skin texture** is fine mottling and freckles over the skin (a few millimetres across).
- **Lighting** shades every Gaussian by its world normal, per frame, from one light fixed in
  the world plus ambient light, with a colour tint (white balance): turning the head changes
  its shading, as in a real video.

Positions are in the head template's frame (metres, y up, z forward), so the same identity
gets the same style at any density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from backend.configs import Config, SettingError
from backend.data.albedo import part_weight
from backend.gaussians.avatar import Avatar, LocalGaussians, logit, rgb_to_sh_dc, sh_dc_to_rgb
from backend.gaussians.frames import matrix_to_quat, quat_to_matrix, triangle_frames
from backend.gaussians.layout import MAX_GAUSSIANS, Binding, sample_layout, texel_footprint
from backend.gaussians.splats import Splats
from backend.gaussians.surface import neutral_with_shape
from backend.head.model import HeadModel, HeadModelData
from backend.head.registry import fingerprint
from backend.render.mesh_preview import vertex_normals

# style: (crown thickness range in metres, lowest template height the hair reaches at the
# back and sides, range; None = the scalp alone)
HAIR_STYLES: dict[str, tuple[tuple[float, float], tuple[float, float] | None]] = {
    "buzz": ((0.002, 0.005), None),
    "short": ((0.008, 0.02), None),
    "medium": ((0.015, 0.03), (-0.07, -0.03)),
    "long": ((0.02, 0.04), (-0.2, -0.11)),
}
CROWN = np.array([0.0, 0.12, -0.03], np.float32)  # where the hair's flow starts, template frame
BACK_HANG = 1.3  # hair hanging at the back is up to this many times the crown's thickness
NOSE_BOTTOM_Y = -0.045  # facial hair starts below this height (built-in head; FLAME is close)
EYE_CENTRES = ((0.032, 0.002, 0.066), (-0.032, 0.002, 0.066))  # template frame
LENS_FORWARD = 0.03  # the rims' plane sits this far in front of the eyes' centres
FRAME_COLOURS = np.array([[0.03, 0.03, 0.03], [0.25, 0.13, 0.06], [0.75, 0.62, 0.3], [0.7, 0.7, 0.72], [0.5, 0.08, 0.08]], np.float32)


@dataclass(frozen=True)
class LooksConfig(Config):
    """How often and how strongly synthetic identities get each look.

    Attributes:
        style_weights: relative frequency of each of ``HAIR_STYLES``.
        fringe_chance: share of medium and long styles with a fringe over the forehead.
        beard_chance: share of identities with facial hair.
        glasses_chance: share of identities with glasses.
        skin_texture: range of the skin's fine mottling, as a share of its colour.
        beard_thickness: range of its thickness, metres (stubble to a full beard).
        hair_share: hair Gaussians as a share of the reference head's surface Gaussians.
        ambient: range of the ambient share of the light (1 = flat, unshaded).
        light_spread: how far from the camera's axis the key light may sit (0-1: up to
            about 45 degrees sideways and 35 degrees up or down at 1).
        tint: largest deviation of the light's colour from white, per channel.
    """

    style_weights: tuple[float, float, float, float] = (0.1, 0.3, 0.3, 0.3)
    fringe_chance: float = 0.4
    beard_chance: float = 0.25
    beard_thickness: tuple[float, float] = (0.002, 0.012)
    glasses_chance: float = 0.2
    skin_texture: tuple[float, float] = (0.03, 0.12)
    hair_share: float = 0.6
    ambient: tuple[float, float] = (0.35, 0.8)
    light_spread: float = 1.0
    tint: float = 0.08

    def check(self) -> None:
        """Raise SettingError naming the first field looks cannot be drawn with."""
        if len(self.style_weights) != len(HAIR_STYLES) or min(self.style_weights) < 0 or sum(self.style_weights) <= 0:
            raise SettingError("style_weights", self.style_weights, f"needs {len(HAIR_STYLES)} non-negative weights, not all zero")
        for name in ("fringe_chance", "beard_chance", "glasses_chance", "light_spread", "tint"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SettingError(name, getattr(self, name), "must be in [0, 1]")
        if not 0.0 < self.ambient[0] <= self.ambient[1] <= 1.0:
            raise SettingError("ambient", self.ambient, "must be a range within (0, 1]")
        if not 0.0 <= self.skin_texture[0] <= self.skin_texture[1] <= 0.5:
            raise SettingError("skin_texture", self.skin_texture, "must be a range within [0, 0.5]")
        if not 0.0 < self.hair_share <= 2.0:
            raise SettingError("hair_share", self.hair_share, "must be in (0, 2]")


@dataclass(frozen=True)
class Looks:
    """One identity's hair, facial hair and light (lengths in metres, template frame).

    Attributes:
        hair_style: a key of ``HAIR_STYLES``.
        hair_thickness: thickness of the hair volume on the crown.
        hair_reach: lowest template height the hair covers at the back and sides (None: the
            scalp alone).
        fringe: thickness of the hair over the forehead (0: none).
        beard: thickness of the facial hair (0: none).
        glasses: the glasses' frame colour (None: no glasses).
        skin_texture: amplitude of the skin's fine mottling, a share of its colour.
        light: unit direction toward the key light, world frame (the camera looks along -z).
        ambient: share of the light that does not depend on the normal.
        tint: RGB gain of the light (white balance).
        seed: strands, streaks and layers follow from it.
    """

    hair_style: str
    hair_thickness: float
    hair_reach: float | None
    fringe: float
    beard: float
    glasses: tuple[float, float, float] | None
    skin_texture: float
    light: tuple[float, float, float]
    ambient: float
    tint: tuple[float, float, float]
    seed: int

    @classmethod
    def random(cls, rng: np.random.Generator, config: LooksConfig = LooksConfig()) -> Looks:
        config.check()
        weights = np.asarray(config.style_weights, np.float64)
        style = list(HAIR_STYLES)[int(rng.choice(len(HAIR_STYLES), p=weights / weights.sum()))]
        thickness, reach = HAIR_STYLES[style]
        long_style = reach is not None
        fringe = float(rng.uniform(0.004, 0.012)) if long_style and rng.random() < config.fringe_chance else 0.0
        beard = float(rng.uniform(*config.beard_thickness)) if rng.random() < config.beard_chance else 0.0
        glasses = FRAME_COLOURS[rng.integers(len(FRAME_COLOURS))] if rng.random() < config.glasses_chance else None
        side = rng.uniform(-1.0, 1.0) * config.light_spread
        up = rng.uniform(-0.3, 0.7) * config.light_spread
        light = np.array([side, up, 1.0]) / math.sqrt(side**2 + up**2 + 1.0)
        return cls(
            hair_style=style,
            hair_thickness=float(rng.uniform(*thickness)),
            hair_reach=float(rng.uniform(*reach)) if long_style else None,
            fringe=fringe,
            beard=beard,
            glasses=None if glasses is None else tuple(float(c) for c in glasses),  # type: ignore[arg-type]
            skin_texture=float(rng.uniform(*config.skin_texture)),
            light=tuple(float(c) for c in light),  # type: ignore[arg-type]
            ambient=float(rng.uniform(*config.ambient)),
            tint=tuple(float(c) for c in 1.0 + rng.uniform(-config.tint, config.tint, 3)),  # type: ignore[arg-type]
            seed=int(rng.integers(1 << 30)),
        )


def template_points(head: HeadModelData, face_idx: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """[N, 3] template positions of N surface points (face [N], barycentric [N, 3])."""
    return (head.v_template[head.faces[face_idx]] * bary[..., None]).sum(1)


def _interpolated(head: HeadModelData, values: np.ndarray, face_idx: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """[N] per-vertex ``values`` [V] at N surface points."""
    return (values[head.faces[face_idx]] * bary).sum(1)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _hair_depth_at(head: HeadModelData, looks: Looks, p: np.ndarray, scalp: np.ndarray, bare: np.ndarray) -> np.ndarray:
    """[N] hair thickness at template positions ``p`` [N, 3] with the scalp's and the bare
    parts' weights [N] there (see ``hair_depth``)."""
    depth = looks.hair_thickness * scalp
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    if looks.hair_reach is not None:
        behind_face = 1.0 - _smoothstep(0.0, 0.04, z + 0.1 * np.abs(x) - 0.02)  # sides and back only
        above_reach = _smoothstep(looks.hair_reach, looks.hair_reach + 0.02, y)
        # Lower down the hair hangs: thicker at the back than at the sides' ears.
        hang = looks.hair_thickness * (0.7 + (BACK_HANG - 0.7) * _smoothstep(0.0, -0.08, z))
        depth = np.maximum(depth, hang * behind_face * above_reach)
    if looks.fringe > 0:
        forehead = _smoothstep(0.03, 0.06, z) * _smoothstep(0.045, 0.065, y) * (1.0 - _smoothstep(0.05, 0.07, np.abs(x)))
        depth = np.maximum(depth, looks.fringe * forehead)
    return (depth * (1.0 - bare)).astype(np.float32)


_NO_HAIR = ("left_eyeball", "right_eyeball", "mouth_interior", "upper_lip", "lower_lip")


def hair_depth(head: HeadModelData, looks: Looks, face_idx: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """[N] thickness of the hair volume (metres, 0 = bare) at N surface points (face, bary).

    The scalp carries the crown's thickness, fading at its edge; a style with a reach also
    covers the ears, the sides and the back of the neck down to that height (never the face:
    only behind the cheekbones); a fringe covers the forehead's upper part.
    """
    scalp = _interpolated(head, part_weight(head, "scalp"), face_idx, bary)
    bare = _interpolated(head, part_weight(head, *_NO_HAIR), face_idx, bary)
    return _hair_depth_at(head, looks, template_points(head, face_idx, bary), scalp, bare)


def hair_lift(head: HeadModel, shape: torch.Tensor, looks: Looks) -> torch.Tensor:
    """[V, 3] per-vertex offset of the template (metres) that moves the head's surface out to
    the hair's outer surface, along the neutral head's vertex normals.

    It is what the generator's outline step measures from the person masks, known here
    exactly: a synthetic subject stores it as its static offset, so that a head posed from
    its parameters wears the hair's outline (the reference Gaussians are bound without it).
    """
    data = head.data
    depth = _hair_depth_at(data, looks, data.v_template, part_weight(data, "scalp"), part_weight(data, *_NO_HAIR))
    verts = head(neutral_with_shape(head, shape)).vertices[0].detach().cpu().numpy()
    return torch.from_numpy((vertex_normals(verts, data.faces) * depth[:, None]).astype(np.float32))


def beard_depth(head: HeadModelData, looks: Looks, face_idx: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """[N] thickness of the facial hair (metres) at N surface points: the jaw, chin, upper lip
    and the front of the neck under the chin, rising along the jaw to the sideburns."""
    if looks.beard <= 0:
        return np.zeros(len(face_idx), np.float32)
    x, y, z = template_points(head, face_idx, bary).T
    ceiling = NOSE_BOTTOM_Y + 0.35 * np.maximum(np.abs(x) - 0.03, 0.0)  # up along the jaw to the sideburns
    region = (1.0 - _smoothstep(ceiling - 0.01, ceiling, y)) * _smoothstep(-0.12, -0.1, y) * _smoothstep(-0.03, 0.0, z)
    bare = _interpolated(head, part_weight(head, *_NO_HAIR, "nose", "eyelids"), face_idx, bary)
    return (looks.beard * region * (1.0 - bare)).astype(np.float32)


def _bound(head: HeadModel, shape: torch.Tensor, binding: Binding, local: LocalGaussians, role: str) -> Avatar:
    """A synthetic part (hair, glasses) as an avatar of ``head`` with identity ``shape``."""
    return Avatar(head.name, fingerprint(head.data), shape.detach().clone().float(), binding, local, meta={"role": role})


def strand_volume(
    head: HeadModel,
    shape: torch.Tensor,
    depth_fn,  # type: ignore[no-untyped-def]
    count: int,
    colour: tuple[float, float, float],
    rng: np.random.Generator,
    strand_length: float = 0.006,
) -> Avatar | None:
    """About ``count`` strand-like Gaussians filling a volume over the head (None: it is empty).

    Args:
        depth_fn: (face_idx [M] int64 numpy, bary [M, 3]) -> [M] thickness in metres.
        colour: the hair's RGB in [0, 1]; roots darker, tips lighter, streaks along the flow.
        strand_length: standard deviation along the flow, metres.
    Gaussians are placed where the volume is, in proportion to its depth times the surface's
    area, at a uniform height within it, long along the flow (away from the crown, then down).
    """
    # Points are drawn with replacement from a dense surface layout; each draw gets its own
    # height and strand, so a layout denser than the layout limit would add nothing.
    source = sample_layout(head.data.uv_coords, head.data.uv_faces, min(max(4 * count, 20_000), MAX_GAUSSIANS))
    face_idx, bary = source.face_idx.numpy(), source.bary.numpy()
    depth = np.maximum(depth_fn(face_idx, bary), 0.0)  # barycentrics a hair below 0 at edges
    verts = head(neutral_with_shape(head, shape)).vertices[0].detach().cpu()
    faces = head.faces.cpu()
    spacing = texel_footprint(verts, faces, head.uv_coords.cpu(), head.uv_faces.cpu(), source).numpy()
    weight = depth * spacing**2
    if count <= 0 or float(weight.sum()) <= 0:
        return None
    pick = rng.choice(len(weight), size=count, p=weight / weight.sum())
    face = torch.from_numpy(face_idx[pick])
    bc = torch.from_numpy(bary[pick])
    height = rng.uniform(0.0, 1.0, count).astype(np.float32)  # 0 at the skin, 1 at the outer surface

    frames = triangle_frames(verts, faces)
    size = frames.size[face]  # [N] metres
    rotation = frames.rotation[face]  # [N, 3, 3] columns t, b, n
    template = template_points(head.data, face_idx[pick], bary[pick])
    flow = F.normalize(torch.from_numpy(template - CROWN), dim=-1) + torch.tensor([0.0, -1.5, -0.3])
    local_flow = (rotation.transpose(1, 2) @ flow[..., None])[..., 0]  # [N, 3] in (t, b, n)
    angle = torch.atan2(local_flow[:, 1], local_flow[:, 0])
    quat = torch.stack([torch.cos(angle / 2), torch.zeros_like(angle), torch.zeros_like(angle), torch.sin(angle / 2)], -1)

    lift = torch.from_numpy(depth[pick] * height)  # metres along the normal
    offset = torch.zeros(count, 3)
    offset[:, 2] = lift / size
    across = torch.from_numpy(rng.uniform(0.0006, 0.0012, count).astype(np.float32))
    along = torch.from_numpy(rng.uniform(0.6, 1.4, count).astype(np.float32)) * strand_length
    log_scale = torch.log(torch.stack([along, across, across], -1) / size[:, None])

    # Streaks: a few thin sinusoidal bands across the flow, plus per-strand jitter.
    streak_rng = np.random.default_rng(rng.integers(1 << 30))
    freqs = streak_rng.normal(0.0, 250.0, (4, 3)).astype(np.float32)
    streak = np.sin(template @ freqs.T + streak_rng.uniform(0, 2 * np.pi, 4)).mean(1)
    shade = (0.65 + 0.45 * height) * (1.0 + 0.15 * streak) * rng.uniform(0.85, 1.15, count)
    rgb = np.clip(np.asarray(colour, np.float32)[None] * shade[:, None].astype(np.float32), 0.0, 1.0)
    opacity = np.where(height > 0.8, rng.uniform(0.35, 0.7, count), rng.uniform(0.75, 0.95, count)).astype(np.float32)

    local = LocalGaussians(
        offset=offset,
        rotation=quat.float(),
        log_scale=log_scale.float(),
        opacity_logit=logit(torch.from_numpy(opacity)).float(),
        sh=rgb_to_sh_dc(torch.from_numpy(rgb))[:, None, :],
    )
    return _bound(head, shape, Binding(face, bc, source.texel[pick], source.resolution), local, "synthetic hair volume")


def _resampled(polyline: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Points [M, 3] every ``spacing`` metres along a polyline [P, 3], and unit tangents [M, 3]."""
    step = np.linalg.norm(np.diff(polyline, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(step)])
    at = np.arange(0.0, arc[-1], spacing)
    points = np.stack([np.interp(at, arc, polyline[:, k]) for k in range(3)], -1)
    segment = np.clip(np.searchsorted(arc, at, side="right") - 1, 0, len(step) - 1)
    return points, np.diff(polyline, axis=0)[segment] / step[segment, None]


def glasses_frame(rim: tuple[float, float]) -> list[np.ndarray]:
    """Polylines [P, 3] of a pair of glasses in the template frame: two rims (half-widths
    ``rim`` (x, y), metres), the bridge between them and the two temples back to the ears."""
    rx, ry = rim
    turn = np.linspace(0.0, 2 * np.pi, 97)
    curves, inner = [], []
    for cx, cy, cz in EYE_CENTRES:
        z, side = cz + LENS_FORWARD, np.sign(cx)
        curves.append(np.stack([cx + rx * np.cos(turn), cy + ry * np.sin(turn), np.full_like(turn, z)], -1))
        curves.append(np.linspace([cx + side * rx, cy + 0.3 * ry, z - 0.003], [side * 0.078, cy + 0.012, -0.01], 24))
        inner.append([cx - side * rx, cy + 0.3 * ry, z])
    t = np.linspace(0.0, 1.0, 16)[:, None]
    bridge = (1 - t) * np.asarray(inner[0]) + t * np.asarray(inner[1])
    bridge[:, 1] += 0.006 * np.sin(np.pi * t[:, 0])
    return curves + [bridge]


def glasses_avatar(head: HeadModel, shape: torch.Tensor, looks: Looks) -> Avatar | None:
    """Glasses as thin Gaussians along ``glasses_frame``, each bound to the nearest triangle
    of where glasses rest, the nose and the temples, which neither blink nor speak (None: the
    identity wears none). Bound on the template, they follow the identity's shape."""
    if looks.glasses is None:
        return None
    rng = np.random.default_rng(looks.seed + 2)
    pieces = [_resampled(c, 0.001) for c in glasses_frame((rng.uniform(0.019, 0.025), rng.uniform(0.013, 0.019)))]
    points = torch.from_numpy(np.concatenate([p for p, _ in pieces])).float()
    tangents = torch.from_numpy(np.concatenate([t for _, t in pieces])).float()
    data, faces = head.data, head.faces.cpu()
    verts = torch.from_numpy(data.v_template).float()
    centroids = verts[faces].mean(1)
    x, y, z = centroids.unbind(-1)
    nose = torch.from_numpy(part_weight(data, "nose"))[faces].amin(1) > 0
    temples = (x.abs() > 0.065) & (z < 0.04) & (y > -0.02) & (y < 0.04)
    candidates = torch.nonzero(nose | temples)[:, 0]
    face = candidates[torch.cdist(points, centroids[candidates]).argmin(1)]
    frames = triangle_frames(verts, faces)
    rotation, size = frames.rotation[face], frames.size[face]  # [N, 3, 3], [N]
    offset = (rotation.transpose(1, 2) @ (points - centroids[face])[..., None])[..., 0] / size[:, None]
    across = F.normalize(torch.cross(tangents, torch.tensor([0.0, 0.0, 1.0]).expand_as(tangents), dim=-1) + 1e-6, dim=-1)
    world = torch.stack([tangents, across, torch.cross(tangents, across, dim=-1)], dim=-1)
    count = len(points)
    thickness = float(rng.uniform(0.0008, 0.0015))
    log_scale = torch.log(torch.tensor([0.0012, thickness, thickness])[None] / size[:, None])
    local = LocalGaussians(
        offset=offset,
        rotation=matrix_to_quat(rotation.transpose(1, 2) @ world),
        log_scale=log_scale.float(),
        opacity_logit=torch.full((count,), float(logit(0.97))),
        sh=rgb_to_sh_dc(torch.tensor(looks.glasses).expand(count, 3))[:, None, :].clone(),
    )
    binding = Binding(face, torch.full((count, 3), 1.0 / 3.0), torch.zeros(count, 2, dtype=torch.int64), 1)
    return _bound(head, shape, binding, local, "synthetic glasses")


def textured_skin(ref: Avatar, head: HeadModelData, looks: Looks) -> Avatar:
    """``ref`` (a surface avatar of plain colours) with fine mottling and a sprinkle of
    freckles multiplied into its colours, the eyeballs left clear."""
    rng = np.random.default_rng(looks.seed + 1)
    face_idx, bary = ref.binding.face_idx.numpy(), ref.binding.bary.numpy()
    p = template_points(head, face_idx, bary)
    fine = rng.normal(0.0, 600.0, (6, 3))  # cycles per metre: a millimetre or two across
    coarse = rng.normal(0.0, 250.0, (4, 3))
    mottle = np.sin(p @ fine.T + rng.uniform(0, 2 * np.pi, 6)).mean(1) + 0.5 * np.sin(p @ coarse.T + rng.uniform(0, 2 * np.pi, 4)).mean(1)
    freckles = np.clip(np.sin(p @ rng.normal(0.0, 400.0, (3, 3)).T).prod(1) * 4.0 - 0.2, 0.0, 1.0)
    eyes = _interpolated(head, part_weight(head, "left_eyeball", "right_eyeball"), face_idx, bary)
    gain = (1.0 + looks.skin_texture * (mottle - freckles)) * (1.0 - eyes) + eyes
    rgb = sh_dc_to_rgb(ref.local.sh[:, 0]) * torch.from_numpy(gain.astype(np.float32))[:, None]
    sh = ref.local.sh.clone()
    sh[:, 0] = rgb_to_sh_dc(rgb.clamp(0.0, 1.0))
    return replace(ref, local=replace(ref.local, sh=sh))


def look_avatars(head: HeadModel, shape: torch.Tensor, looks: Looks, hair_colour: tuple[float, float, float], count: int) -> list[Avatar]:
    """The hair and facial-hair volumes (``count`` hair Gaussians, facial hair a fifth of
    that) and the glasses of one identity, as avatars bound to ``head``."""
    rng = np.random.default_rng(looks.seed)
    parts = [
        strand_volume(head, shape, lambda f, b: hair_depth(head.data, looks, f, b), count, hair_colour, rng),
        strand_volume(head, shape, lambda f, b: beard_depth(head.data, looks, f, b), count // 5, hair_colour, rng, strand_length=0.003),
        glasses_avatar(head, shape, looks),
    ]
    return [p for p in parts if p is not None]


def shade(splats: Splats, looks: Looks) -> Splats:
    """``splats`` (unbatched, plain RGB) lit by the key light and ambient light.

    Each Gaussian's normal is its local z axis in the world; the gain is normalized so that a
    surface facing the camera keeps its albedo, and colours are clipped to [0, 1].
    """
    if splats.batched or splats.sh_degree is not None:
        raise ValueError("shade() takes unbatched splats with plain RGB colours")
    normal = quat_to_matrix(splats.quats)[..., :, 2]  # [N, 3]
    light = torch.tensor(looks.light, dtype=normal.dtype, device=normal.device)
    lambert = (normal @ light).clamp_min(0.0)
    facing = looks.ambient + (1.0 - looks.ambient) * float(looks.light[2])
    gain = (looks.ambient + (1.0 - looks.ambient) * lambert) / facing
    tint = torch.tensor(looks.tint, dtype=normal.dtype, device=normal.device)
    return Splats(splats.means, splats.quats, splats.scales, splats.opacities, (splats.colors * gain[:, None] * tint).clamp(0.0, 1.0))


def concat_splats(parts: list[Splats]) -> Splats:
    """Unbatched, plain-RGB splats of several sets drawn together."""
    if any(p.batched or p.sh_degree is not None for p in parts):
        raise ValueError("concat_splats() takes unbatched splats with plain RGB colours")
    return Splats(*(torch.cat([getattr(p, name) for p in parts]) for name in ("means", "quats", "scales", "opacities", "colors")))
