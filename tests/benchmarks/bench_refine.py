"""Stage 2 benchmark: ours vs baselines on synthetic monocular subjects.

For each identity: synthesize a monocular subject, initialize a surface avatar, refine it
with "ours", "no-antispike" (baseline b) and "densify" (baseline a) at the same iteration
budget, and evaluate on the test split and on a turntable around the head (``orbit_holes``:
what the refinement left uncovered that the initialization covered). Writes a JSON with every
number and a picture of each method's worst test view (ground truth | render).

    python tests/benchmarks/bench_refine.py --out DIR [--identities 3] [--size 512]
        [--iters 10000] [--gaussians 100000] [--frames 100] [--methods 'ours;no-antispike;densify']
        [--profile-iters 500] [--trace-iters 300] [--work DIR]

--profile-iters times each stage of the first method's step (GPU time between CUDA events on
a GPU, inside the captured step too).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backend.data.subject import Subject  # noqa: E402
from backend.data.synthetic import SynthConfig, synthesize  # noqa: E402
from backend.head.registry import load_head_model  # noqa: E402
from backend.refine.config import RefineConfig, preset  # noqa: E402
from backend.refine.evaluate import evaluate, orbit_holes  # noqa: E402
from backend.refine.initialize import InitConfig, initialize_on_subject  # noqa: E402
from backend.refine.refine import refine  # noqa: E402


def _config(method: str, **fields: object) -> RefineConfig:
    """A preset name, or NAME={"anti_spike": {...}, "lr": {...}, ...}: overrides of "ours"."""
    if "=" not in method:
        return preset(method, **fields)
    overrides = json.loads(method.split("=", 1)[1])
    d = preset("ours", **fields).to_dict()
    for key, value in overrides.items():
        d[key] = {**d[key], **value} if isinstance(value, dict) else value
    return RefineConfig.from_dict(d)


def _trace(avatar, head, subject, iters: int, out: Path) -> None:  # type: ignore[no-untyped-def]
    """Kernel and operator tables of ``iters`` iterations of ours (after a warm-up run), and
    the share of the wall time the GPU was busy."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    config = preset("ours", iterations=iters, log_every=iters, checkpoint_every=0)
    refine(avatar, head, subject, config)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        refine(avatar, head, subject, config)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6
    lines = [f"{iters} iterations: wall {wall:.3f} s ({1000 * wall / iters:.2f} ms/it), GPU busy {busy:.3f} s ({100 * busy / wall:.0f}%)", ""]
    lines.append(events.table(sort_by="self_device_time_total", row_limit=40))
    lines.append(events.table(sort_by="cpu_time_total", row_limit=40))
    (out / "trace.txt").write_text("\n".join(lines))
    print(lines[0], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True, help="results: bench_refine.json and worst-view pictures")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_refine"), help="where the synthetic subjects are written")
    ap.add_argument("--identities", type=int, default=3)
    ap.add_argument("--first-identity", type=int, default=0, help="to split the identities over several runs")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--iters", type=int, default=10_000)
    ap.add_argument("--gaussians", type=int, default=100_000)
    ap.add_argument("--reference-gaussians", type=int, default=400_000)
    ap.add_argument("--methods", default="ours;no-antispike;densify", help="';'-separated presets, or NAME=JSON overrides of 'ours'")
    ap.add_argument("--profile-iters", type=int, default=0, help="also run this many profiled iterations of the first method (stage breakdown)")
    ap.add_argument("--trace-iters", type=int, default=0, help="also run this many iterations of ours under torch.profiler (kernel tables)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    head = load_head_model().to(device)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for ident in range(args.first_identity, args.first_identity + args.identities):
        t0 = time.perf_counter()
        root = synthesize(head, args.work / f"subject{ident}", SynthConfig(frames=args.frames, size=args.size, seed=100 + ident, reference_gaussians=args.reference_gaussians))
        subject = Subject.load(root)
        synth_s = time.perf_counter() - t0
        avatar = initialize_on_subject(head, subject, InitConfig(gaussians=args.gaussians))
        init_scores = evaluate(avatar, head, subject)
        rows.append({"identity": ident, "method": "init", "synth_seconds": synth_s, **init_scores})
        print(json.dumps(rows[-1]), flush=True)
        for method in args.methods.split(";"):
            config = _config(method, iterations=args.iters, log_every=max(args.iters // 10, 1), checkpoint_every=0)
            method = method.split("=", 1)[0]
            if device == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            result = refine(avatar, head, subject, config)
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t1
            scores = evaluate(result.avatar, head, subject, worst_view_png=args.out / f"worst_{method}_id{ident}.png")
            holes = orbit_holes(result.avatar, avatar, head, subject.params.index(subject.split["test"][:1]))
            rows.append({"identity": ident, "method": method, "iterations": args.iters, "wall_seconds": wall, "orbit_holes": holes, **scores})
            print(json.dumps(rows[-1]), flush=True)
        if args.profile_iters and ident == args.first_identity:
            first = args.methods.split(";")[0]
            config = _config(first, iterations=args.profile_iters, log_every=args.profile_iters, checkpoint_every=0)
            result = refine(avatar, head, subject, config, profile=True)
            per_it = {k: 1000 * v / args.profile_iters for k, v in result.timings.items()}
            rows.append({"identity": ident, "method": f"{first.split('=', 1)[0]}-profile-ms-per-iteration", **per_it})
            print(json.dumps(rows[-1]), flush=True)
        if args.trace_iters and ident == args.first_identity:
            _trace(avatar, head, subject, args.trace_iters, args.out)
    (args.out / "bench_refine.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
