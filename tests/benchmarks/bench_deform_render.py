"""Deform + render throughput: a surface avatar of N Gaussians on a shipped head, posed
for a batch of B frames and rendered at S x S, timed per frame: eagerly (every kernel
launched from Python) and through the frame player (one captured CUDA graph per call).

    python tests/benchmarks/bench_deform_render.py --gaussians 100000 --size 512 --batch 1 16
    python tests/benchmarks/bench_deform_render.py --head ict --gaussians 100000 --size 512 --batch 1 16
    python tests/benchmarks/bench_deform_render.py --batch 1 16 --compile --profile   # where the player's time goes
    python tests/benchmarks/bench_deform_render.py --device cpu --gaussians 20000 --size 256 --batch 1

Medians of several repeats after warm-up; CUDA timings use events around the region.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backend.gaussians.avatar import deform  # noqa: E402
from backend.gaussians.surface import surface_avatar  # noqa: E402
from backend.head.registry import SHIPPED_HEADS, load_head_model  # noqa: E402
from backend.render.frame_player import FramePlayer, PlayerConfig  # noqa: E402
from backend.render.animation import ViewConfig, view_cameras  # noqa: E402
from backend.render.rasterize import render  # noqa: E402
from tests.helpers import random_params  # noqa: E402


def time_it(fn, device: str, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Median seconds of ``fn()`` over ``repeats`` runs after two warm-ups."""
    for _ in range(2):
        fn()
    out = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def kernels(fn) -> int:  # type: ignore[no-untyped-def]
    """CUDA kernels one call of ``fn`` runs (a graph's replay counts each kernel it holds)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def kernel_table(fn, rows: int = 30) -> str:  # type: ignore[no-untyped-def]
    """The CUDA kernels of one call of ``fn`` by GPU time: where a frame's time goes."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gaussians", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--head", choices=SHIPPED_HEADS, default=None, help="shipped head (default: the default head)")
    ap.add_argument("--profile", action="store_true", help="also print the player's kernels by GPU time (CUDA)")
    ap.add_argument("--compile", action="store_true", help="also time a player whose posing is fused by torch.compile")
    ap.add_argument("--headroom", type=float, default=PlayerConfig.headroom, help="the players' tile budget over the pairs seen")
    args = ap.parse_args()
    head = load_head_model(args.head)
    gen = torch.Generator().manual_seed(0)
    avatar = surface_avatar(head, torch.randn(head.n_shape, generator=gen), args.gaussians, lambda f, b: torch.rand(f.shape[0], 3, generator=gen))
    head, avatar = head.to(args.device), avatar.to(args.device)
    bg = torch.ones(3, device=args.device)
    for b in args.batch:
        params = random_params(load_head_model(args.head), b, gen).to(args.device)
        cams = view_cameras(ViewConfig(size=args.size), b).to(args.device)

        def deform_only() -> None:
            deform(avatar, head, params)

        def deform_render() -> None:
            render(deform(avatar, head, params), cams, bg)

        player = FramePlayer(avatar, head, bg, config=PlayerConfig(headroom=args.headroom))

        def played() -> None:
            player(params, cams)

        with torch.no_grad():
            t_def = time_it(deform_only, args.device, args.repeats)
            t_all = time_it(deform_render, args.device, args.repeats)
        t_play = time_it(played, args.device, args.repeats)
        fused = ""
        if args.compile:
            compiled = FramePlayer(avatar, head, bg, config=PlayerConfig(compile=True, headroom=args.headroom))
            t0 = time.perf_counter()
            compiled(params, cams)
            first = time.perf_counter() - t0

            def played_compiled() -> None:
                compiled(params, cams)

            t_comp = time_it(played_compiled, args.device, args.repeats)
            fused = f", compiled player {1000 * t_comp / b:.3f} ms/frame (first call {first:.1f} s)"
        counts = ""
        if args.device == "cuda":
            with torch.no_grad():
                counts = f", kernels per call: eager {kernels(deform_render)}, player {kernels(played)}"
                if args.compile:
                    counts += f", compiled player {kernels(played_compiled)}"
        print(
            f"head={args.head or 'default'} device={args.device} gaussians={args.gaussians} size={args.size} batch={b}: "
            f"deform {1000 * t_def / b:.3f} ms/frame, deform+render {1000 * t_all / b:.3f} ms/frame, "
            f"player {1000 * t_play / b:.3f} ms/frame ({'graphed' if player.graphed else 'eager'}){fused}{counts}"
        )
        if args.profile and args.device == "cuda":
            print(kernel_table(played_compiled if args.compile else played))


if __name__ == "__main__":
    main()
