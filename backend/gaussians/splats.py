"""World-space, activated Gaussians: what the rasterizer consumes.

The bound representation (parent triangle, local offsets, log-scales, logits) stays in this
room; ``Splats`` is the posed result, in the world frame (metres).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Splats:
    """A set of N Gaussians, optionally for a batch of B frames.

    Shapes below are given without the optional leading batch dimension ``[B, ...]``;
    all fields share it when present (``colors`` and ``opacities`` may omit it and are then
    shared by every frame).

    Attributes:
        means: [N, 3] centres, metres.
        quats: [N, 4] unit quaternions (w, x, y, z), local-to-world rotation.
        scales: [N, 3] standard deviations along the local axes, metres.
        opacities: [N] in [0, 1].
        colors: [N, 3] linear RGB in [0, 1] (SH degree 0 after evaluation), or
            [N, K, 3] real spherical-harmonics coefficients with K = (sh_degree + 1)^2.
        sh_degree: None for plain RGB, else the degree of ``colors``.
    """

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor
    sh_degree: int | None = None

    @property
    def batched(self) -> bool:
        return self.means.ndim == 3

    @property
    def count(self) -> int:
        return int(self.means.shape[-2])

    def frame(self, b: int) -> Splats:
        """The unbatched Splats of frame ``b``."""
        if not self.batched:
            raise ValueError("Splats.frame() needs batched splats")

        def pick(t: torch.Tensor, unbatched_ndim: int) -> torch.Tensor:
            return t[b] if t.ndim > unbatched_ndim else t

        color_ndim = 2 if self.sh_degree is None else 3
        return replace(
            self,
            means=self.means[b],
            quats=self.quats[b],
            scales=self.scales[b],
            opacities=pick(self.opacities, 1),
            colors=pick(self.colors, color_ndim),
        )
