"""LPIPS (v0.1, AlexNet) from weights already on this machine; never downloaded.

The metric of Zhang et al. 2018: both images go through AlexNet's five convolution stages,
each stage's features are scaled to unit length along channels, and the squared differences
are weighted per channel (learned 1x1 weights), averaged over the image and summed over
stages. It needs two files that are not ours to ship:

- AlexNet's ImageNet weights as torchvision stores them (``alexnet-owt-7be5be79.pth``, keys
  ``features.{0,3,6,8,10}.{weight,bias}``), looked for in the given folder, then in torch's
  hub cache (``torch.hub.get_dir()/checkpoints``), where torchvision keeps what it fetched;
- the LPIPS per-channel weights (``alex.pth`` of the ``lpips`` package, v0.1, keys
  ``lin{0..4}.model.1.weight``), looked for in the given folder, then inside an installed
  ``lpips`` package (read as a file: importing it would need torchvision).

Written here rather than imported from ``lpips``, which builds AlexNet through torchvision;
torchvision's wheels are tied to torch builds, and the CPU build of torch this project pins
has none that loads.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
LINEAR_FILE = "alex.pth"
# AlexNet's convolutions up to each stage LPIPS reads: (index in torchvision's ``features``,
# out channels, kernel, stride, padding, max-pool before it).
_STAGES = ((0, 64, 11, 4, 2, False), (3, 192, 5, 1, 2, True), (6, 384, 3, 1, 1, True), (8, 256, 3, 1, 1, False), (10, 256, 3, 1, 1, False))
# The input normalization LPIPS v0.1 applies to images in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


@dataclass(frozen=True)
class LpipsFiles:
    alexnet: Path
    linear: Path


def find_lpips_files(folder: Path | None = None) -> LpipsFiles | str:
    """The two weight files, or a sentence saying which is missing and where it was looked for."""
    spec = importlib.util.find_spec("lpips")
    package = [Path(p) / "weights" / "v0.1" for p in (spec.submodule_search_locations or [])] if spec else []
    places = {
        ALEXNET_FILE: ([folder] if folder else []) + [Path(torch.hub.get_dir()) / "checkpoints"],
        LINEAR_FILE: ([folder] if folder else []) + package,
    }
    found: dict[str, Path] = {}
    for name, dirs in places.items():
        hits = [d / name for d in dirs if (d / name).is_file()]
        if not hits:
            where = ", ".join(str(d) for d in dirs) or "nowhere: no folder given and no lpips package installed"
            return f"LPIPS needs {name} on this machine (looked in {where}); weights are never downloaded"
        found[name] = hits[0]
    return LpipsFiles(found[ALEXNET_FILE], found[LINEAR_FILE])


class Lpips(nn.Module):
    """LPIPS distance between [B, H, W, 3] images in [0, 1] -> [B]; frozen, differentiable in
    its inputs (usable as a loss)."""

    def __init__(self, files: LpipsFiles) -> None:
        super().__init__()
        backbone = torch.load(files.alexnet, map_location="cpu", weights_only=True)
        linear = torch.load(files.linear, map_location="cpu", weights_only=True)
        self.convs = nn.ModuleList()
        self.linear = nn.ParameterList()
        in_channels = 3
        for k, (index, out_channels, kernel, stride, padding, _) in enumerate(_STAGES):
            conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding)
            conv.load_state_dict({"weight": backbone[f"features.{index}.weight"], "bias": backbone[f"features.{index}.bias"]})
            self.convs.append(conv)
            self.linear.append(nn.Parameter(linear[f"lin{k}.model.1.weight"].reshape(1, out_channels, 1, 1)))
            in_channels = out_channels
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def _features(self, image: torch.Tensor) -> list[torch.Tensor]:
        h = ((image.permute(0, 3, 1, 2) * 2 - 1) - self.shift) / self.scale
        out = []
        for conv, (*_, pool_first) in zip(self.convs, _STAGES):
            if pool_first:
                h = F.max_pool2d(h, 3, 2)
            h = F.relu(conv(h))
            out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sum(((fa - fb).pow(2) * w).sum(1).mean((1, 2)) for fa, fb, w in zip(self._features(a), self._features(b), self.linear))


@lru_cache(maxsize=4)
def _loaded(files: LpipsFiles, device: torch.device) -> Lpips:
    return Lpips(files).to(device)


def load_lpips(device: torch.device | str, folder: Path | None = None) -> tuple[Lpips | None, str]:
    """LPIPS on ``device`` from local files and where they came from, or None and what is
    missing. The files are looked for on every call (they may appear while a service runs)."""
    files = find_lpips_files(folder)
    if isinstance(files, str):
        return None, files
    return _loaded(files, torch.device(device)), f"LPIPS v0.1 (AlexNet) from {files.alexnet} and {files.linear}"
