"""The whole mesh: skin, both eyeballs and the mouth pocket, with a packed UV atlas."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from backend.head.builtin.features import FaceShape
from backend.head.builtin.parts import Part, eyeball, mouth_pocket
from backend.head.builtin.skin import LidState, SkinLayout, SkinPose, build_layout, skin_uv, skin_vertices
from backend.head.builtin.spec import HeadSpec
from backend.head.builtin.surface import build_grid

# Where each UV island goes in the unit square: (u0, v0, width, height).
_SKIN_BOX = (0.005, 0.005, 0.79, 0.99)
_DISC_BOXES = {"left_eye": (0.805, 0.805, 0.19, 0.19), "right_eye": (0.805, 0.605, 0.19, 0.19), "mouth": (0.805, 0.405, 0.19, 0.19)}


@dataclass(frozen=True)
class HeadMesh:
    """Neutral mesh and the index ranges of its parts.

    Attributes:
        vertices: [V, 3] metres. faces: [F, 3] counter-clockwise seen from outside.
        uv: [T, 2] in [0, 1]. uv_faces: [F, 3].
        layout: the skin's index bookkeeping (skin vertices are [0, layout.num_vertices)).
        skin_pose: the neutral skin and its rays, the reference for re-posed lids.
        eyes: (start, stop) vertex ranges of the left and right eyeball.
        mouth: (start, stop) vertex range of the mouth pocket's own vertices.
        mouth_ring: [M] ring number (1..) of each pocket vertex, for depth-based falloffs.
        mouth_parent: [M] loop vertex each pocket vertex was extruded from (-1 for the tip).
        eye_centres: [2, 3] left and right eyeball centres.
        mirror: [V] index of each vertex's mirror image across x = 0.
    """

    vertices: np.ndarray
    faces: np.ndarray
    uv: np.ndarray
    uv_faces: np.ndarray
    layout: SkinLayout
    skin_pose: SkinPose
    eyes: tuple[tuple[int, int], tuple[int, int]]
    mouth: tuple[int, int]
    mouth_ring: np.ndarray
    mouth_parent: np.ndarray
    eye_centres: np.ndarray
    mirror: np.ndarray

    @property
    def num_skin(self) -> int:
        return self.layout.num_vertices


def _place(uv: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    u0, v0, w, h = box
    return np.asarray(uv) * [w, h] + [u0, v0]


def build_mesh(spec: HeadSpec, shape: FaceShape) -> HeadMesh:
    """Assemble the neutral head mesh."""
    grid = build_grid(spec, shape)
    layout = build_layout(spec, grid)
    pose = skin_vertices(spec, shape, layout, layout.neutral_lids(spec))
    skin = pose.vertices
    verts = [skin]
    faces = [layout.faces]
    uvs = [_place(skin_uv(layout, pose.theta), _SKIN_BOX)]
    uv_faces = [layout.uv_faces]
    n, t = len(skin), len(uvs[0])
    ex, ey, ez = spec.eye_centre
    eye_centres = np.array([[ex, ey, ez], [-ex, ey, ez]])
    eyes = []
    for centre, box in zip(eye_centres, ("left_eye", "right_eye")):
        part = eyeball(spec, centre)
        eyes.append((n, n + len(part.vertices)))
        n, t = _append(verts, faces, uvs, uv_faces, part, n, t, _DISC_BOXES[box], offset_faces=True)
    upper = layout.upper_lip_row()
    lower = layout.lower_lip_row()
    loop = np.concatenate([upper, lower[1:-1][::-1]])
    side = np.concatenate([[0], np.ones(len(upper) - 2), [0], -np.ones(len(lower) - 2)])
    pocket = mouth_pocket(spec, loop, side, skin, n)
    rings = spec.mouth_rings
    mouth = (n, n + len(pocket.vertices))
    n, t = _append(verts, faces, uvs, uv_faces, pocket, n, t, _DISC_BOXES["mouth"], offset_faces=False)
    mouth_ring = np.concatenate([np.repeat(np.arange(1, rings + 1), len(loop)), [rings + 1]])
    mouth_parent = np.concatenate([np.tile(loop, rings), [-1]])
    vertices = np.concatenate(verts)
    return HeadMesh(
        vertices=vertices,
        faces=np.concatenate(faces),
        uv=np.concatenate(uvs),
        uv_faces=np.concatenate(uv_faces),
        layout=layout,
        skin_pose=pose,
        eyes=(eyes[0], eyes[1]),
        mouth=mouth,
        mouth_ring=mouth_ring,
        mouth_parent=mouth_parent,
        eye_centres=eye_centres,
        mirror=_mirror_map(vertices, layout),
    )


def _append(
    verts: list, faces: list, uvs: list, uv_faces: list, part: Part, n: int, t: int, box: tuple, offset_faces: bool
) -> tuple[int, int]:
    verts.append(part.vertices)
    faces.append(part.faces + (n if offset_faces else 0))
    uvs.append(_place(part.uv, box))
    uv_faces.append(part.uv_faces + t)
    return n + len(part.vertices), t + len(part.uv)


def _mirror_map(vertices: np.ndarray, layout: SkinLayout) -> np.ndarray:
    """[V] mirror partner of every vertex. Slit copies coincide with their originals, so
    copies are matched among copies and everything else among the rest."""
    copy = np.zeros(len(vertices), bool)
    copy[layout.mouth_copy[layout.mouth_copy >= 0]] = True
    copy[layout.eye_copy[layout.eye_copy >= 0]] = True
    out = np.zeros(len(vertices), np.int64)
    for group in (np.nonzero(copy)[0], np.nonzero(~copy)[0]):
        dist, nearest = cKDTree(vertices[group]).query(vertices[group] * [-1.0, 1.0, 1.0])
        if dist.max() > 1e-9:
            raise AssertionError(f"mesh is not mirror-symmetric (off by {dist.max():.2e} m)")
        out[group] = group[nearest]
    return out


def skin_with_lids(spec: HeadSpec, shape: FaceShape, mesh: HeadMesh, lids: LidState) -> np.ndarray:
    """[V, 3] the neutral mesh with only the eyelids moved to ``lids``."""
    out = mesh.vertices.copy()
    out[: mesh.num_skin] = skin_vertices(spec, shape, mesh.layout, lids, reference=mesh.skin_pose).vertices
    return out
