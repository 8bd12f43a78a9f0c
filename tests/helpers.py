"""Helpers shared by several test modules."""

from __future__ import annotations

import torch

from backend.head.model import HeadModel
from backend.head.params import FlameParams


def random_params(head: HeadModel, batch: int, gen: torch.Generator, scale: float = 1.0) -> FlameParams:
    p = head.neutral_params(batch)
    p.shape = torch.randn(head.n_shape, generator=gen) * scale
    p.expr = torch.randn(batch, head.n_expr, generator=gen) * scale
    for name in ("rotation", "neck_pose", "jaw_pose", "eyes_pose"):
        t = getattr(p, name)
        setattr(p, name, torch.randn(t.shape, generator=gen) * 0.2 * scale)
    p.jaw_pose[:, 0] = p.jaw_pose[:, 0].abs()
    p.translation = torch.randn(batch, 3, generator=gen) * 0.05
    return p
