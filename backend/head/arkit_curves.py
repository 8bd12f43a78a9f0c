"""ARKit face curves (a Live Link Face CSV, read by ``arkit_csv``) as ``FlameParams`` for a head model.

The weights drive expressions (the jaw included: the jaw joint stays at rest), the head's
angles the neck, the eyes' angles the eye joints (``arkit_csv`` says who owns which motion).
"""

from __future__ import annotations

import torch

from backend.head.model import HeadModelData
from backend.head.params import FlameParams
from backend.wire.arkit_csv import ArkitCurves, flame_channels


def to_flame_params(curves: ArkitCurves, head: HeadModelData) -> tuple[FlameParams, list[str]]:
    """FLAME parameters [T] for ``head`` (neutral identity, its expression names kept) and the
    ARKit names it has no component for. InputError when it has none of them."""
    channels = flame_channels(curves, head.expr_names, head.n_expr, f"head model '{head.name}'")
    params = FlameParams.neutral(len(curves.seconds), head.n_shape, head.n_expr, expr_names=head.expr_names)
    params.expr = torch.from_numpy(channels.expr)
    params.neck_pose = torch.from_numpy(channels.neck_pose)
    params.eyes_pose = torch.from_numpy(channels.eyes_pose)
    return params, list(channels.missing)
