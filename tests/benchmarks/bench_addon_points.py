"""Time to turn N Gaussians into a Blender point-cloud object (bpy as a module, background).

    python tests/benchmarks/bench_addon_points.py [--n 100000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bpy  # noqa: E402

from blender_addon import pointcloud  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    r = np.random.default_rng(0)
    g = pointcloud.GaussianBuffers(
        positions=r.normal(size=(args.n, 3)).astype(np.float32),
        scales=r.uniform(1e-3, 1e-2, (args.n, 3)).astype(np.float32),
        rotations=r.normal(size=(args.n, 4)).astype(np.float32),
        opacities=r.uniform(size=args.n).astype(np.float32),
        colors=r.uniform(size=(args.n, 3)).astype(np.float32),
    )
    times = []
    for i in range(args.repeats):
        bpy.ops.wm.read_factory_settings(use_empty=True)
        t0 = time.perf_counter()
        pointcloud.create_avatar_object(f"Avatar{i}", g)
        times.append(time.perf_counter() - t0)
    print(f"{args.n} Gaussians -> point-cloud object: median {statistics.median(times):.3f} s (min {min(times):.3f}, {args.repeats} runs)")


if __name__ == "__main__":
    main()
