"""Render benchmark: median ms per frame, forward and forward+backward.

    python -m tests.benchmarks.bench_render --n 20000 --size 256 --device cpu
    python -m tests.benchmarks.bench_render --n 20000 --size 512 --device cuda

CPU runs the pure-torch reference; CUDA runs gsplat (``--backend reference`` forces the
reference there too). Not collected by pytest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backend.gaussians.splats import Splats  # noqa: E402
from backend.render.camera import orbit_cameras  # noqa: E402
from backend.render.rasterize import render  # noqa: E402
from tests.benchmarks.scenes import head_splats  # noqa: E402

PARAMS = ("means", "quats", "scales", "opacities", "colors")


def timed(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall-clock seconds of each of ``repeats`` calls after ``warmup`` untimed ones."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="number of Gaussians")
    parser.add_argument("--size", type=int, default=256, help="image width = height, pixels")
    parser.add_argument("--cameras", type=int, default=1, help="views rendered per call")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backend", default="auto", choices=["auto", "gsplat", "reference"])
    parser.add_argument("--sh-degree", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    scene = head_splats(args.n, sh_degree=args.sh_degree, device=device)
    cameras = orbit_cameras(args.cameras, 0.6, args.size, args.size, fov_deg=25.0).to(device)
    background = torch.ones(3, device=device)
    leaves = {name: getattr(scene, name).clone().requires_grad_() for name in PARAMS}

    def forward() -> None:
        with torch.no_grad():
            render(scene, cameras, background, backend=args.backend)

    def forward_backward() -> None:
        out = render(Splats(**leaves, sh_degree=args.sh_degree), cameras, background, backend=args.backend)
        (out.rgb.sum() + out.depth.sum()).backward()

    coverage = render(scene, cameras, background, backend=args.backend).alpha.gt(0.5).float().mean().item()
    print(
        f"{args.n} Gaussians, {args.cameras} x {args.size}x{args.size}, {device.type}, "
        f"backend={args.backend}, threads={torch.get_num_threads()}, coverage(alpha>0.5)={coverage:.2f}"
    )
    for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
        times = timed(fn, device, args.warmup, args.repeats)
        per_frame = [1000.0 * t / args.cameras for t in times]
        print(
            f"{name:>17}: median {statistics.median(per_frame):8.1f} ms/frame "
            f"(min {min(per_frame):.1f}, max {max(per_frame):.1f}, {args.repeats} runs)"
        )


if __name__ == "__main__":
    main()
