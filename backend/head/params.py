"""FLAME parameters: names, shapes and the ``flame_param.npz`` exchange layout.

Names follow FLAME / VHAP. Rotations are axis-angle vectors in radians; translation is
in metres. A batch of ``B`` parameter sets shares one identity (``shape``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from backend.wire import expression_names
from backend.wire.errors import InputError

# Per-frame pose fields and their trailing width.
POSE_FIELDS: dict[str, int] = {
    "rotation": 3,
    "neck_pose": 3,
    "jaw_pose": 3,
    "eyes_pose": 6,
    "translation": 3,
}


@dataclass
class FlameParams:
    """A batch of FLAME parameter sets.

    Attributes:
        shape: [S] identity coefficients, shared by the batch.
        expr: [B, E] expression coefficients (~N(0, 1)).
        rotation: [B, 3] global head rotation about the root joint, axis-angle.
        neck_pose: [B, 3] neck joint, axis-angle.
        jaw_pose: [B, 3] jaw joint, axis-angle.
        eyes_pose: [B, 6] left then right eye, axis-angle each.
        translation: [B, 3] metres, applied after posing.
        static_offset: optional [V, 3] per-vertex offset of the template (metres).
        expr_names: the names of the leading expression components in the head model the
            parameters were made for (empty: not known); ``flame_param.npz`` keeps them,
            and posing with another head's names is refused (``check_head``).
    """

    shape: torch.Tensor
    expr: torch.Tensor
    rotation: torch.Tensor
    neck_pose: torch.Tensor
    jaw_pose: torch.Tensor
    eyes_pose: torch.Tensor
    translation: torch.Tensor
    static_offset: torch.Tensor | None = None
    expr_names: tuple[str, ...] = ()

    @property
    def batch_size(self) -> int:
        return int(self.expr.shape[0])

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor field by name (``static_offset`` only when set)."""
        return {f.name: t for f in fields(self) if isinstance(t := getattr(self, f.name), torch.Tensor)}

    @classmethod
    def neutral(
        cls,
        batch: int,
        n_shape: int,
        n_expr: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        expr_names: Sequence[str] = (),
    ) -> FlameParams:
        """Zero expression, zero pose, mean identity; ``expr_names``: the head's."""

        def z(*s: int) -> torch.Tensor:
            return torch.zeros(*s, device=device, dtype=dtype)

        return cls(
            shape=z(n_shape),
            expr=z(batch, n_expr),
            **{name: z(batch, width) for name, width in POSE_FIELDS.items()},
            expr_names=tuple(expr_names),
        )

    def validate(self) -> None:
        """Raise InputError naming the first field with a wrong shape or a non-finite value."""
        b = self.batch_size
        if self.shape.ndim != 1:
            raise InputError(f"FLAME 'shape' must have shape [S], got {list(self.shape.shape)}")
        if self.expr.ndim != 2:
            raise InputError(f"FLAME 'expr' must have shape [B, E], got {list(self.expr.shape)}")
        for name, width in POSE_FIELDS.items():
            t = getattr(self, name)
            if tuple(t.shape) != (b, width):
                raise InputError(f"FLAME '{name}' must have shape [{b}, {width}], got {list(t.shape)}")
        for name, t in self._tensors().items():
            if not bool(torch.isfinite(t).all()):
                raise InputError(f"FLAME '{name}' contains NaN or Inf")

    def check_head(self, head_name: str, head_expr_names: Sequence[str], source: str = "the FLAME parameters") -> None:
        """InputError unless these parameters' expression names are the head's (none known: no check)."""
        expression_names.check(self.expr_names, head_expr_names, f"head model '{head_name}'", source)

    def conformed(self, n_shape: int, n_expr: int) -> FlameParams:
        """These parameters for a model with ``n_shape`` / ``n_expr`` components.

        Missing trailing coefficients are zero (lossless); surplus ones must be zero too,
        otherwise the file does not fit the model and InputError says so.
        """

        def fit(t: torch.Tensor, n: int, name: str) -> torch.Tensor:
            have = t.shape[-1]
            if have > n:
                if bool(t[..., n:].abs().gt(0).any()):
                    raise InputError(f"FLAME '{name}' has {have} coefficients with non-zero ones past the model's {n}")
                return t[..., :n]
            return torch.nn.functional.pad(t, (0, n - have))

        return replace(self, shape=fit(self.shape, n_shape, "shape"), expr=fit(self.expr, n_expr, "expr"))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FlameParams:
        return replace(self, **{name: t.to(device=device, dtype=dtype) for name, t in self._tensors().items()})

    def index(self, idx: slice | list[int] | torch.Tensor) -> FlameParams:
        """Select frames; the identity (and static offset) is kept."""
        per_frame = {name: getattr(self, name)[idx] for name in ("expr", *POSE_FIELDS)}
        return replace(self, **per_frame)

    def detach_clone(self) -> FlameParams:
        return replace(self, **{name: t.detach().clone() for name, t in self._tensors().items()})

    # -- the flame_param.npz layout (VHAP / GaussianAvatars) ---------------------------------

    def to_numpy_dict(self) -> dict[str, np.ndarray]:
        """Arrays in the VHAP ``flame_param.npz`` layout: per-frame arrays are [T, k]; the
        expression names, when known, as ``expr_names`` [k] strings."""
        out = {name: t.detach().cpu().numpy().astype(np.float32) for name, t in self._tensors().items()}
        if "static_offset" in out:
            out["static_offset"] = out["static_offset"][None]
        if self.expr_names:
            out[expression_names.KEY] = expression_names.to_array(self.expr_names)
        return out

    def save(self, path: str | Path) -> None:
        np.savez(path, **self.to_numpy_dict())

    @classmethod
    def from_numpy_dict(cls, arrays: dict[str, np.ndarray], source: str = "arrays") -> FlameParams:
        """Build from the VHAP layout; missing pose fields are zero, extra keys are ignored.

        ``shape`` may be [S] or [1, S] (both are in use); per-frame arrays [T, k]; a single
        frame stored as [k] is accepted too; ``expr_names`` [k] strings, when present.
        """
        if "expr" not in arrays:
            raise InputError(f"{source}: no 'expr' array; a flame_param.npz needs at least 'expr' [T, E]")
        expr = np.asarray(arrays["expr"], dtype=np.float32)
        if expr.ndim == 1:
            expr = expr[None]
        t = expr.shape[0]
        shape = np.asarray(arrays.get("shape", np.zeros(0)), dtype=np.float32)
        if shape.ndim == 2 and shape.shape[0] == 1:
            shape = shape[0]
        values: dict[str, torch.Tensor] = {"shape": torch.from_numpy(shape.copy()), "expr": torch.from_numpy(expr.copy())}
        for name, width in POSE_FIELDS.items():
            a = np.asarray(arrays[name], dtype=np.float32) if name in arrays else np.zeros((t, width), np.float32)
            if a.ndim == 1:
                a = a[None]
            if a.shape != (t, width):
                raise InputError(f"{source}: '{name}' has shape {list(a.shape)}, expected [{t}, {width}] to match 'expr'")
            values[name] = torch.from_numpy(a.copy())
        static = arrays.get("static_offset")
        if static is not None:
            static = np.asarray(static, dtype=np.float32)
            values["static_offset"] = torch.from_numpy(static.reshape(static.shape[-2], 3).copy())
        params = cls(**values, expr_names=expression_names.from_arrays(arrays, expr.shape[1], source))
        params.validate()
        return params

    @classmethod
    def load(cls, path: str | Path) -> FlameParams:
        """A ``flame_param.npz``; its expression names are checked when a head poses it
        (``HeadModel`` calls ``check_head``), or earlier by the caller."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"FLAME parameter file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:  # numpy raises several types for damaged archives
            raise InputError(f"{path}: not a readable .npz file ({exc})") from exc
        return cls.from_numpy_dict(arrays, source=str(path))
