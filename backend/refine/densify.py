"""Adaptive density control with binding inheritance: baseline (a), GaussianAvatars-style.

Clones small Gaussians and splits large ones where the view-space positional gradient is
high, prunes transparent ones while keeping at least one per triangle, and periodically
resets opacities. Children inherit the parent's triangle and barycentric point. This
changes the layout, which is exactly what our refinement avoids; it exists to compare.
"""

from __future__ import annotations

import torch

from backend.data.subject import Subject
from backend.gaussians.avatar import logit
from backend.gaussians.frames import quat_to_matrix
from backend.gaussians.layout import Binding
from backend.gaussians.splats import Splats
from backend.refine.config import Densify
from backend.refine.packed import PackLayout, RowAdam, pack, unpacked_copy
from backend.render.camera import Cameras

_SPLIT_SHRINK = 1.6  # 3DGS divides a split Gaussian's scale by 0.8 * 2


class DensityControl:
    def __init__(self, config: Densify, binding: Binding, subject: Subject) -> None:
        self.config = config
        self.width = subject.info.width
        self._reset_stats(binding.count, binding.face_idx.device)

    def _reset_stats(self, n: int, device: torch.device) -> None:
        self.grad_sum = torch.zeros(n, device=device)
        self.seen = torch.zeros(n, device=device)

    @torch.no_grad()
    def observe(self, splats: Splats, means_grad: torch.Tensor, cameras: Cameras) -> None:
        """Accumulate each Gaussian's view-space gradient norm (NDC units, as 3DGS thresholds use).

        A world-space gradient g on a mean at depth z maps to |g| z / f per pixel of motion; 3DGS
        measures gradients in NDC, which is W / 2 pixels per unit.
        """
        r = cameras.world_to_cam[:, 0, :3, :3]
        t = cameras.world_to_cam[:, 0, :3, 3]
        depth = (torch.einsum("bij,bnj->bni", r, splats.means) + t[:, None])[..., 2]  # [B, N]
        f = cameras.K[:, 0, 0, 0][:, None]
        g = means_grad.norm(dim=-1) * depth.clamp_min(1e-6) / f * (self.width / 2)
        hit = means_grad.abs().sum(-1) > 0
        self.grad_sum += (g * hit).sum(0)
        self.seen += hit.float().sum(0)

    @torch.no_grad()
    def step(
        self, step: int, packed: torch.Tensor, layout: PackLayout, binding: Binding, optimizer: RowAdam
    ) -> tuple[torch.Tensor, Binding, RowAdam]:
        """After optimizer step ``step``: densify and prune, or reset opacities, when due.
        Returns the (possibly new) packed parameters [M, D], binding and optimizer."""
        c = self.config
        if c.start <= step <= c.stop and step % c.every == 0:
            packed, binding, optimizer = self._densify_and_prune(packed, layout, binding, optimizer)
        if step % c.reset_every == 0 and step <= c.stop:
            opacity = layout.columns("opacity_logit")
            packed[:, opacity] = packed[:, opacity].clamp(max=float(logit(c.reset_opacity)))
            optimizer.zero_moments(opacity)
        return packed, binding, optimizer

    def _densify_and_prune(
        self, packed: torch.Tensor, layout: PackLayout, binding: Binding, optimizer: RowAdam
    ) -> tuple[torch.Tensor, Binding, RowAdam]:
        c = self.config
        local = unpacked_copy(packed, layout)
        n = binding.count
        device = binding.face_idx.device
        avg = self.grad_sum / self.seen.clamp_min(1)
        grow = avg >= c.grad_threshold
        room = max(c.max_count - n, 0)
        if int(grow.sum()) > room:
            keep_top = avg.topk(room).indices if room > 0 else torch.zeros(0, dtype=torch.long, device=device)
            grow = torch.zeros_like(grow)
            grow[keep_top] = True
        big = local.log_scale.max(-1).values.exp() > c.clone_max_scale
        clone, split = grow & ~big, grow & big
        # Prune transparent Gaussians and split parents, but keep one per triangle.
        opacity = torch.sigmoid(local.opacity_logit)
        drop = (opacity < c.min_opacity) | split
        survivors = torch.zeros(int(binding.face_idx.max()) + 1, device=device).index_add_(0, binding.face_idx, (~drop).float())
        orphan = survivors[binding.face_idx] == 0
        face_best = torch.full_like(survivors, -1.0).scatter_reduce(0, binding.face_idx, opacity, reduce="amax")
        rescue = orphan & (opacity == face_best[binding.face_idx]) & ~split
        drop &= ~rescue

        keep_idx = (~drop).nonzero().squeeze(1)
        clone_idx = clone.nonzero().squeeze(1)
        split_idx = split.nonzero().squeeze(1).repeat(2)
        src = torch.cat([keep_idx, clone_idx, split_idx])
        fresh = torch.cat([torch.zeros(len(keep_idx), dtype=torch.bool, device=device), torch.ones(len(clone_idx) + len(split_idx), dtype=torch.bool, device=device)])
        new = local.map(lambda p: p[src])
        k = len(keep_idx) + len(clone_idx)
        if len(split_idx):
            s = new.log_scale[k:].exp()
            rot = quat_to_matrix(new.rotation[k:])
            new.offset[k:] += (rot @ (s * torch.randn_like(s))[..., None]).squeeze(-1)
            new.log_scale[k:] -= torch.log(torch.tensor(_SPLIT_SHRINK))
        new_packed = pack(new).requires_grad_(True)
        new_binding = Binding(binding.face_idx[src], binding.bary[src], binding.texel[src], binding.resolution)
        self._reset_stats(new_binding.count, device)
        return new_packed, new_binding, optimizer.gathered(new_packed, src, fresh)
