"""Stand-in LPIPS weight files: the real ones (torchvision's AlexNet, LPIPS's per-channel
weights) are not on the test machines and are never downloaded, so tests write files of the
same layout with random values."""

from __future__ import annotations

from pathlib import Path

import torch

from backend.refine.perceptual import ALEXNET_FILE, LINEAR_FILE, LpipsFiles

# torchvision's AlexNet: the convolutions of ``features`` by index, (out, in, kernel).
ALEXNET_CONVS = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}


def stand_in_weights(folder: Path, seed: int = 0) -> LpipsFiles:
    """Random weights in the two files' layouts (AlexNet's with its classifier too)."""
    g = torch.Generator().manual_seed(seed)
    backbone = {}
    for index, (out, inp, k) in ALEXNET_CONVS.items():
        backbone[f"features.{index}.weight"] = torch.randn(out, inp, k, k, generator=g) * (2.0 / (inp * k * k)) ** 0.5
        backbone[f"features.{index}.bias"] = 0.1 * torch.randn(out, generator=g)
    backbone["classifier.1.weight"] = torch.zeros(4, 9216)
    linear = {f"lin{i}.model.1.weight": torch.rand(1, out, 1, 1, generator=g) for i, (out, _, _) in enumerate(ALEXNET_CONVS.values())}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(backbone, folder / ALEXNET_FILE)
    torch.save(linear, folder / LINEAR_FILE)
    return LpipsFiles(folder / ALEXNET_FILE, folder / LINEAR_FILE)
