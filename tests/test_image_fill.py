"""Push-pull filling of images from their confident pixels."""

from __future__ import annotations

import torch

from backend.data.image_fill import push_pull_fill


def test_push_pull_fill_keeps_known_and_fills_gaps() -> None:
    grid = torch.zeros(1, 3, 16, 16)
    weight = torch.zeros(1, 1, 16, 16)
    grid[..., :8, :] = torch.tensor([0.2, 0.4, 0.6])[:, None, None]
    weight[..., :8, :] = 1.0
    filled = push_pull_fill(grid, weight)
    assert torch.allclose(filled[..., :8, :], grid[..., :8, :])
    assert torch.allclose(filled[..., 8:, :], torch.tensor([0.2, 0.4, 0.6])[:, None, None].expand(3, 8, 16)[None], atol=1e-5)

