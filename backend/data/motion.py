"""Animations of FLAME parameters: random motion for synthetic captures, and a scripted showcase."""

from __future__ import annotations

import numpy as np
import torch

from backend.head.model import HeadModel
from backend.head.params import FlameParams

JAW_OPEN_RAD = 0.5  # the jaw joint's rotation for an open mouth, on heads whose joint carries the jaw


def _smooth_curve(rng: np.random.Generator, t: np.ndarray, amplitude: float, components: int = 3) -> np.ndarray:
    """A smooth random curve over t in [0, 1]: a few sinusoids of 0.3-2 cycles."""
    out = np.zeros_like(t)
    for _ in range(components):
        out += np.sin(2 * np.pi * (rng.uniform(0.3, 2.0) * t + rng.uniform())) * rng.uniform(0.3, 1.0)
    return amplitude * out / components


def random_trajectory(head: HeadModel, frames: int, rng: np.random.Generator, motion: float, moving_head: bool) -> FlameParams:
    """Expression, jaw, neck, eyes and (for monocular captures) global head motion over T frames."""
    t = np.linspace(0.0, 1.0, frames, dtype=np.float64)
    params = head.neutral_params(frames)
    expr = np.zeros((frames, head.n_expr))
    named = len(head.expr_names)
    jaw_expression = head.data.jaw_expression
    # A few named units at a time read as expressions; all of them at once reads as noise.
    pool = [i for i in range(named) if i != jaw_expression]
    active = rng.choice(pool, size=min(5, len(pool)), replace=False) if pool else []
    # ARKit-named weights (a head whose jawOpen carries the jaw) span [0, 1]; the built-in
    # head's units need about 3 to read as an expression. A curve never exceeds its amplitude.
    top = 1.0 if jaw_expression is not None else 3.0
    for i in active:
        expr[:, i] = np.maximum(_smooth_curve(rng, t, top), 0.0)
    for i in range(named, head.n_expr):
        expr[:, i] = _smooth_curve(rng, t, 0.3)
    jaw = np.maximum(_smooth_curve(rng, t, 1.0), 0.0)  # 0 closed, about 1 open
    if jaw_expression is None:
        params.jaw_pose[:, 0] = torch.tensor(JAW_OPEN_RAD * jaw * motion, dtype=torch.float32)
    else:
        expr[:, jaw_expression] = jaw
    params.expr = torch.tensor(expr * motion, dtype=torch.float32)
    params.neck_pose = torch.tensor(np.stack([_smooth_curve(rng, t, 0.1), _smooth_curve(rng, t, 0.15), _smooth_curve(rng, t, 0.05)], 1) * motion, dtype=torch.float32)
    gaze = np.stack([_smooth_curve(rng, t, 0.15), _smooth_curve(rng, t, 0.25), np.zeros_like(t)], 1)
    params.eyes_pose = torch.tensor(np.concatenate([gaze, gaze], 1) * motion, dtype=torch.float32)
    if moving_head:
        rot = np.stack([_smooth_curve(rng, t, 0.2), _smooth_curve(rng, t, 0.5), _smooth_curve(rng, t, 0.1)], 1)
        params.rotation = torch.tensor(rot * motion, dtype=torch.float32)
        params.translation = torch.tensor(np.stack([_smooth_curve(rng, t, 0.01) for _ in range(3)], 1) * motion, dtype=torch.float32)
    return params
