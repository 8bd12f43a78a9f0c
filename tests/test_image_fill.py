"""Push-pull filling and the colour decontamination of soft mask edges built on it."""

from __future__ import annotations

import torch

from backend.data.image_fill import decontaminate, push_pull_fill


def test_push_pull_fill_keeps_known_and_fills_gaps() -> None:
    grid = torch.zeros(1, 3, 16, 16)
    weight = torch.zeros(1, 1, 16, 16)
    grid[..., :8, :] = torch.tensor([0.2, 0.4, 0.6])[:, None, None]
    weight[..., :8, :] = 1.0
    filled = push_pull_fill(grid, weight)
    assert torch.allclose(filled[..., :8, :], grid[..., :8, :])
    assert torch.allclose(filled[..., 8:, :], torch.tensor([0.2, 0.4, 0.6])[:, None, None].expand(3, 8, 16)[None], atol=1e-5)


def test_decontaminated_edges_take_the_foregrounds_colour_and_solid_pixels_stay() -> None:
    hair, wall = torch.tensor([0.3, 0.2, 0.1]), torch.tensor([0.9, 0.9, 0.95])
    mask = torch.linspace(1.0, 0.0, 32)[None, :].expand(32, 32).clone()  # solid on the left, fading out
    image = mask[..., None] * hair + (1 - mask[..., None]) * wall  # a matte's edge blends both
    clean = decontaminate(image, mask)
    solid = mask >= 0.98
    assert torch.equal(clean[solid], image[solid])
    torch.testing.assert_close(clean[~solid], hair.expand(int((~solid).sum()), 3), atol=1e-4, rtol=0)
    # Composited over black with the mask, the edge is the hair fading, not a light fringe.
    fringe = (image * mask[..., None])[~solid].max(-1).values - (clean * mask[..., None])[~solid].max(-1).values
    assert float(fringe.min()) >= 0.0 and float(fringe.max()) > 0.1
    empty = torch.zeros(8, 8)
    assert torch.equal(decontaminate(image[:8, :8], empty), image[:8, :8])  # no solid pixel: nothing to fill from
