"""Render the built-in head figures used by docs/head.md.

Run from the repository root:  .venv/bin/python docs/figures/make_head_figures.py
Writes head_neutral.png, head_identities.png, head_expressions.png and head_jaw_open.png
next to this script.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.cluster.vq import kmeans2
from scipy.sparse import coo_matrix

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backend.head.builtin import BLINK_CLOSED, build_builtin_head
from backend.head.model import HeadModel, HeadModelData
from backend.render.mesh_preview import intrinsics, look_at, render_mesh

OUT = Path(__file__).resolve().parent
WIDTH, HEIGHT = 400, 480
TARGET = np.array([0.0, -0.025, 0.01])
VIEWS = {
    "front": np.array([0.0, 0.0, 1.0]),
    "profile": np.array([1.0, 0.0, 0.0]),
    "three_quarter": np.array([0.62, 0.1, 0.78]),
    "slight": np.array([0.3, 0.12, 0.95]),
}

SKIN = np.array([0.86, 0.68, 0.57])
HAIR = np.array([0.22, 0.15, 0.10])
LIPS = np.array([0.74, 0.43, 0.42])
MOUTH = np.array([0.30, 0.09, 0.09])
SCLERA = np.array([0.94, 0.93, 0.90])
IRIS = np.array([0.28, 0.40, 0.55])
PUPIL = np.array([0.03, 0.03, 0.03])


def _soften(head: HeadModelData, values: np.ndarray, steps: int) -> np.ndarray:
    """Average per-vertex values over mesh neighbours ``steps`` times (soft mask edges)."""
    f = head.faces
    rows = np.concatenate([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0]])
    cols = np.concatenate([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2]])
    n = head.num_vertices
    adj = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)).tocsr()
    adj.data[:] = 1.0
    adj = adj + coo_matrix((np.ones(n), (np.arange(n), np.arange(n))), shape=(n, n)).tocsr()
    norm = np.asarray(adj.sum(axis=1)).ravel()
    for _ in range(steps):
        values = adj @ values / norm[:, None]
    return values


def preview_colors(head: HeadModelData) -> np.ndarray:
    """[V, 3] simple albedo from the part masks: skin, hair cap, brows, lips, eyes, mouth."""
    m = head.part_masks
    col = np.tile(SKIN, (head.num_vertices, 1))
    skin_only = m["skin"] & ~(m["upper_lip"] | m["lower_lip"])
    hair = _soften(head, m["scalp"][:, None].astype(float), 1)
    brows = _soften(head, m["brows"][:, None].astype(float), 2)
    col = col * (1 - hair) + HAIR * hair
    col = np.where(skin_only[:, None], col * (1 - 0.6 * brows) + HAIR * 0.6 * brows, col)
    col[m["upper_lip"] | m["lower_lip"]] = LIPS
    col[m["mouth_interior"]] = MOUTH
    for side in ("left_eyeball", "right_eyeball"):
        idx = np.nonzero(m[side])[0]
        d = head.v_template[idx] - head.v_template[idx].mean(0)
        cos = d[:, 2] / np.linalg.norm(d, axis=1)
        col[idx] = np.where((cos > np.cos(0.16))[:, None], PUPIL, np.where((cos > np.cos(0.42))[:, None], IRIS, SCLERA))
    return col


def render(verts: np.ndarray, head: HeadModelData, colors: np.ndarray, view: str, distance: float = 0.75) -> np.ndarray:
    eye = TARGET + VIEWS[view] / np.linalg.norm(VIEWS[view]) * distance
    return render_mesh(verts, head.faces, intrinsics(22, WIDTH, HEIGHT), look_at(eye, TARGET), WIDTH, HEIGHT, vertex_colors=colors)


def pose(model: HeadModel, shape: np.ndarray | None = None, expr: dict[str, float] | None = None, jaw: float = 0.0) -> np.ndarray:
    """Posed vertices [V, 3] for identity coefficients, named expression units and jaw opening."""
    params = model.neutral_params()
    if shape is not None:
        params.shape = torch.as_tensor(shape, dtype=torch.float32)
    for name, value in (expr or {}).items():
        params.expr[0, model.expr_names.index(name)] = value
    params.jaw_pose[0, 0] = jaw
    with torch.no_grad():
        return model(params).vertices[0].numpy()


def save_png(image: np.ndarray, name: str) -> None:
    """Write a dithered 256-colour PNG, a third of the size of a true-colour one.

    The palette is k-means over the pixels, with the few saturated ones (iris, lips) weighted
    up so they keep their own entries next to the many skin tones.
    """
    px = image.reshape(-1, 3).astype(np.float64)
    rng = np.random.default_rng(0)
    common = px[rng.choice(len(px), 40000, replace=False)]
    rare = px[np.abs(px[:, 2] - px[:, 0]) > 25]
    sample = np.concatenate([common, rare[rng.choice(len(rare), 10000)]]) if len(rare) else common
    centres, _ = kmeans2(sample, 256, iter=12, minit="++", seed=0)
    palette = Image.new("P", (1, 1))
    palette.putpalette(np.clip(centres, 0, 255).astype(np.uint8).ravel().tolist())
    Image.fromarray(image).quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(OUT / name, optimize=True)
    print("wrote", OUT / name)


def save(images: list[np.ndarray], name: str) -> None:
    save_png(np.concatenate(images, axis=1), name)


def main() -> None:
    head = build_builtin_head()
    model = HeadModel(head)
    colors = preview_colors(head)
    neutral = pose(model)
    save([render(neutral, head, colors, v) for v in ("front", "profile", "three_quarter")], "head_neutral.png")

    identities = []
    for seed in (1, 2, 3):
        coeffs = np.random.default_rng(seed).normal(0.0, 1.5, head.n_shape)
        verts = pose(model, shape=coeffs)
        identities.append(np.concatenate([render(verts, head, colors, "front"), render(verts, head, colors, "three_quarter")], axis=0))
    save(identities, "head_identities.png")

    expressions = {
        "smile": {"smile_L": 2.5, "smile_R": 2.5, "squint_L": 0.8, "squint_R": 0.8},
        "blink": {"blink_L": BLINK_CLOSED, "blink_R": BLINK_CLOSED},
        "brow raise": {"brow_raise_L": 2.5, "brow_raise_R": 2.5},
        "frown": {"frown_L": 2.5, "frown_R": 2.5, "brow_lower_L": 2.0, "brow_lower_R": 2.0},
        "pucker": {"pucker": 2.5},
        "cheek puff": {"cheek_puff_L": 2.5, "cheek_puff_R": 2.5, "lip_press": 1.5},
    }
    tiles = [render(pose(model, expr=e), head, colors, "slight", distance=0.66) for e in expressions.values()]
    rows = [np.concatenate(tiles[:3], axis=1), np.concatenate(tiles[3:], axis=1)]
    save_png(np.concatenate(rows, axis=0), "head_expressions.png")

    jaw = pose(model, jaw=0.3)
    save([render(jaw, head, colors, "front"), render(jaw, head, colors, "three_quarter")], "head_jaw_open.png")


if __name__ == "__main__":
    main()
