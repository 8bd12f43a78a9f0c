"""Procedural albedo of synthetic identities: skin tone, hair cap, brows, lips, iris, markings.

Colours are a function of the neutral template position and the head model's part masks,
interpolated to any surface point, so the same identity looks the same at any density.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from backend.head.model import HeadModelData

SKIN_TONES = np.array(
    [[0.93, 0.76, 0.65], [0.87, 0.67, 0.54], [0.78, 0.57, 0.43], [0.63, 0.44, 0.32], [0.45, 0.30, 0.21], [0.33, 0.22, 0.16]],
    np.float32,
)
HAIR_COLOURS = np.array(
    [[0.08, 0.06, 0.05], [0.25, 0.16, 0.09], [0.45, 0.30, 0.16], [0.70, 0.55, 0.32], [0.55, 0.20, 0.10], [0.6, 0.6, 0.6]], np.float32
)
IRIS_COLOURS = np.array([[0.30, 0.18, 0.08], [0.20, 0.35, 0.55], [0.30, 0.45, 0.30], [0.45, 0.35, 0.20]], np.float32)
MOUTH_INTERIOR = np.array([0.35, 0.12, 0.12], np.float32)
SCLERA = np.array([0.92, 0.90, 0.88], np.float32)
PUPIL = np.array([0.02, 0.02, 0.02], np.float32)
IRIS_COS = np.cos(0.42)  # iris disc: within ~24 degrees of the eye's forward axis
PUPIL_COS = np.cos(0.16)
MARKINGS = (4, 7)  # blotches per identity, inclusive
MARKING_RADIUS_M = (0.015, 0.035)
MARKING_STRENGTH = 0.7  # colour mix at a blotch's centre


@dataclass(frozen=True)
class AlbedoParams:
    """One identity's colours (linear RGB in [0, 1]) and its skin-noise seed."""

    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    lips: tuple[float, float, float]
    iris: tuple[float, float, float]
    noise_seed: int

    @classmethod
    def random(cls, rng: np.random.Generator) -> AlbedoParams:
        skin = np.clip(SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.93, 1.07, 3), 0, 1)
        hair = np.clip(HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] * rng.uniform(0.85, 1.15, 3), 0, 1)
        lips = np.clip(skin * np.array([0.95, 0.62, 0.62]) + rng.uniform(-0.03, 0.03, 3), 0, 1)
        iris = np.clip(IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))] * rng.uniform(0.8, 1.2, 3), 0, 1)
        return cls(tuple(skin), tuple(hair), tuple(lips), tuple(iris), int(rng.integers(1 << 30)))  # type: ignore[arg-type]


def part_weight(head: HeadModelData, *names: str) -> np.ndarray:
    """[V] float32: 1 on the vertices of any of the named part masks (those the head has), else 0."""
    out = np.zeros(head.num_vertices, np.float32)
    for n in names:
        if n in head.part_masks:
            out = np.maximum(out, head.part_masks[n].astype(np.float32))
    return out


def vertex_albedo(head: HeadModelData, params: AlbedoParams) -> np.ndarray:
    """[V, 3] per-vertex albedo of the neutral template (eyeballs excluded: see surface_albedo)."""
    v = head.v_template
    rng = np.random.default_rng(params.noise_seed)
    freqs = rng.normal(0, 40.0, (6, 3)).astype(np.float32)  # cycles per metre: blotches a few cm wide
    phases = rng.uniform(0, 2 * np.pi, 6).astype(np.float32)
    noise = np.sin(v @ freqs.T + phases).mean(axis=1, keepdims=True)
    colour = np.asarray(params.skin, np.float32) * (1.0 + 0.06 * noise)
    hair = part_weight(head, "scalp")[:, None]
    brows = part_weight(head, "brows")[:, None]
    lips = part_weight(head, "upper_lip", "lower_lip")[:, None]
    mouth = part_weight(head, "mouth_interior")[:, None]
    colour = colour * (1 - lips) + np.asarray(params.lips, np.float32) * lips
    colour = colour * (1 - 0.8 * brows) + np.asarray(params.hair, np.float32) * 0.8 * brows
    colour = colour * (1 - hair) + np.asarray(params.hair, np.float32) * (1.0 + 0.08 * noise) * hair
    colour = _with_markings(colour, v, rng) * (1 - mouth) + MOUTH_INTERIOR * mouth
    return np.clip(colour, 0, 1)


def _with_markings(colour: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``colour`` [V, 3] with a few soft blotches (birthmarks, hair streaks, tattoos, dye) at
    random places around the head, each a few centimetres wide.

    Real heads differ from side to side and front to back. Without such markings one view of
    a synthetic identity (its skin tone and hair colour) would predict every other view, and
    extra source views could not show what they add.
    """
    centre = v.mean(axis=0)
    directions = v - centre
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    for _ in range(int(rng.integers(MARKINGS[0], MARKINGS[1] + 1))):
        aim = rng.normal(size=3)
        spot = v[np.argmax(directions @ (aim / np.linalg.norm(aim)))]
        radius = rng.uniform(*MARKING_RADIUS_M)
        weight = MARKING_STRENGTH * np.exp(-np.sum((v - spot) ** 2, axis=1) / radius**2)[:, None]
        tint = rng.uniform(0.05, 0.95, 3).astype(np.float32)
        colour = colour * (1 - weight) + tint * weight
    return colour


def surface_albedo(head: HeadModelData, params: AlbedoParams, face_idx: torch.Tensor, bary: torch.Tensor) -> torch.Tensor:
    """Albedo at N surface points given by (face, barycentric) -> [N, 3] float32.

    Skin, hair, brows and lips come from interpolated per-vertex colours; eyeballs get a
    sclera, iris and pupil by the angle from each eyeball's forward (+z) axis.
    """
    faces = torch.as_tensor(head.faces)[face_idx]  # [N, 3]
    colour = (torch.from_numpy(vertex_albedo(head, params))[faces] * bary[..., None]).sum(1)
    template = torch.from_numpy(head.v_template)
    points = (template[faces] * bary[..., None]).sum(1)
    for side in ("left_eyeball", "right_eyeball"):
        mask = torch.from_numpy(head.part_masks.get(side, np.zeros(head.num_vertices, bool)))
        if not bool(mask.any()):
            continue
        centre = template[mask].mean(0)
        on_eye = mask[faces].all(dim=1)
        direction = torch.nn.functional.normalize(points - centre, dim=-1)
        cos = direction[:, 2]
        eye = torch.from_numpy(SCLERA).expand_as(colour).clone()
        eye[cos > IRIS_COS] = torch.tensor(params.iris, dtype=torch.float32)
        eye[cos > PUPIL_COS] = torch.from_numpy(PUPIL)
        colour = torch.where(on_eye[:, None], eye, colour)
    return colour.float()
