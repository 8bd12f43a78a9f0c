"""The refined parameters packed into one [N, D] tensor, and Adam over it.

One tensor instead of five makes Adam's update a handful of element-wise kernels over all
parameters at once. torch's fused Adam runs one multi-tensor kernel per parameter group,
and gives each 64K-element chunk of a tensor one thread block. With five groups of
100K-row tensors that is about 200 us per step on an H100, most of it latency. Rows are
Gaussians, so densification gathers parameters and moments with one row index. The small
per-frame parameters refinement may tune beside them (FLAME's, the exposure's) are packed
the same way, one row per frame (``PackedFields``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.gaussians.avatar import LocalGaussians
from backend.wire.errors import InputError


@dataclass(frozen=True)
class PackLayout:
    """Column ranges of ``LocalGaussians``' fields in a packed [N, D] tensor.

    Columns: offset 0-2, rotation 3-6, log-scale 7-9, opacity logit 10, then the SH
    coefficients [K, 3] row-major (colour channel fastest).
    """

    sh_coeffs: int  # K = (degree + 1)^2

    @property
    def widths(self) -> tuple[int, ...]:
        return (3, 4, 3, 1, 3 * self.sh_coeffs)

    @property
    def width(self) -> int:
        return sum(self.widths)

    def columns(self, field: str) -> slice:
        """The columns of a ``LocalGaussians`` field name."""
        names = ("offset", "rotation", "log_scale", "opacity_logit", "sh")
        i = names.index(field)
        start = sum(self.widths[:i])
        return slice(start, start + self.widths[i])

    @classmethod
    def of(cls, local: LocalGaussians) -> PackLayout:
        return cls(local.sh.shape[1])


def pack(local: LocalGaussians) -> torch.Tensor:
    """[N, D] tensor of ``local``'s fields side by side (a copy), in ``PackLayout`` order."""
    n = local.count
    return torch.cat([local.offset, local.rotation, local.log_scale, local.opacity_logit[:, None], local.sh.reshape(n, -1)], dim=1)


def unpack(packed: torch.Tensor, layout: PackLayout) -> LocalGaussians:
    """``LocalGaussians`` whose fields are views of ``packed`` [N, D]: gradients through them
    reach ``packed`` (one concatenation in the backward pass)."""
    offset, rotation, log_scale, opacity, sh = packed.split(layout.widths, dim=1)
    return LocalGaussians(offset, rotation, log_scale, opacity[:, 0], sh.unflatten(1, (layout.sh_coeffs, 3)))


def unpacked_copy(packed: torch.Tensor, layout: PackLayout) -> LocalGaussians:
    """Contiguous, detached copies of ``packed``'s fields (a snapshot the next steps leave alone)."""
    return unpack(packed.detach(), layout).map(lambda t: t.clone(memory_format=torch.contiguous_format))


class RowAdam:
    """Adam without weight decay, as ``torch.optim.Adam`` computes it (non-AMSGrad, bias
    corrected), over one [N, D] leaf tensor with a learning rate per column.

    Every step reads its rates from a device tensor and keeps its step count on the
    device, so it can be captured in a CUDA graph.
    """

    def __init__(self, param: torch.Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-15) -> None:
        self.param = param
        self.betas = betas
        self.eps = eps
        self.exp_avg = torch.zeros_like(param, memory_format=torch.contiguous_format)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.steps = torch.zeros((), dtype=torch.float32, device=param.device)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if set_to_none:
            self.param.grad = None
        elif self.param.grad is not None:
            self.param.grad.zero_()

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        """One update with per-column rates ``lr`` [D] (a device tensor)."""
        grad = self.param.grad
        if grad is None:
            return
        b1, b2 = self.betas
        self.steps.add_(1)
        self.exp_avg.lerp_(grad, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        step_size = lr / (1 - torch.pow(b1, self.steps))
        denom = self.exp_avg_sq.sqrt().div_(torch.sqrt(1 - torch.pow(b2, self.steps))).add_(self.eps)
        self.param.addcdiv_(self.exp_avg * step_size, denom, value=-1.0)

    def zero_moments(self, columns: slice) -> None:
        """Forget the moments of some columns (an opacity reset)."""
        self.exp_avg[:, columns] = 0
        self.exp_avg_sq[:, columns] = 0

    def gathered(self, param: torch.Tensor, rows: torch.Tensor, fresh: torch.Tensor) -> RowAdam:
        """An optimizer of ``param`` [M, D] whose row i continues this one's row ``rows[i]``,
        with zero moments where ``fresh`` [M] (new Gaussians)."""
        out = RowAdam(param, self.betas, self.eps)
        keep = ~fresh[:, None]
        out.exp_avg = torch.where(keep, self.exp_avg[rows], 0.0)
        out.exp_avg_sq = torch.where(keep, self.exp_avg_sq[rows], 0.0)
        out.steps = self.steps.clone()
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"steps": self.steps, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` in place (a captured step keeps reading these tensors)."""
        if set(state) != {"steps", "exp_avg", "exp_avg_sq"} or state["exp_avg"].shape != self.exp_avg.shape:
            raise InputError("the checkpoint's optimizer state does not match this avatar (written by another version?)")
        for name, value in state.items():
            getattr(self, name).copy_(value)


TORCH_ADAM_EPS = 1e-8  # torch.optim.Adam's default; the Gaussians' RowAdam uses a smaller one


@dataclass(frozen=True)
class PackedFields:
    """Small per-frame parameters fine-tuned beside the Gaussians (FLAME's, the exposure's):
    fields [T, d_i] side by side in one leaf [T, D], with one Adam and a rate per column.

    ``RowAdam`` rather than ``torch.optim.Adam``: the first torch optimizer of a process
    imports ``torch._dynamo``, more than a second of a fresh command's start.
    """

    names: tuple[str, ...]
    widths: tuple[int, ...]
    packed: torch.Tensor  # [T, D] the optimized leaf
    optimizer: RowAdam
    rates: torch.Tensor  # [D] on the device

    @classmethod
    def of(cls, fields: dict[str, torch.Tensor], rate: dict[str, float]) -> PackedFields:
        """``fields`` [T, d_i] packed (a copy), each column at its field's ``rate``."""
        widths = tuple(int(v.shape[1]) for v in fields.values())
        packed = torch.cat(list(fields.values()), dim=1).detach().requires_grad_(True)
        rates = torch.cat([torch.full((w,), rate[k]) for k, w in zip(fields, widths)]).to(packed.device)
        return cls(tuple(fields), widths, packed, RowAdam(packed, eps=TORCH_ADAM_EPS), rates)

    def fields(self) -> dict[str, torch.Tensor]:
        """Views of ``packed`` by field name (gradients through them reach it)."""
        return dict(zip(self.names, self.packed.split(self.widths, dim=1)))

    def step(self) -> None:
        self.optimizer.step(self.rates)
