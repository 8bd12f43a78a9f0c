"""Write the synthetic training and evaluation corpus of the Stage 1 generator.

    python tests/benchmarks/make_synthetic_corpus.py --out out/corpus --workers 12

Layout (every leaf is a subject folder, see backend/data/subject.py):

    OUT/train/mono/m0000 ...    monocular videos (moving head)      phase 1
    OUT/train/multi/v0000 ...   multi-view captures (ring of cameras)  phase 2
    OUT/test/mono/m0000 ...     held-out identities: novel expressions, Stage 1 -> Stage 2
    OUT/test/multi/v0000 ...    held-out identities: novel views
    OUT/corpus.json             counts, sizes, seeds, seconds

Identities never repeat: every subject has its own seed, and the four groups use disjoint seed
ranges. Subjects already present are skipped, so an interrupted run continues. Subjects render
on the GPU when there is one (``synthesize`` renders on the head model's device); building each
identity's dense reference head is CPU work, so several worker processes share the GPU.

``--estimate`` times one identity of each kind on this machine and projects the full run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GROUPS = {
    # name: (folder, seed offset)
    "train_mono": ("train/mono", 0),
    "train_multi": ("train/multi", 100_000),
    "test_mono": ("test/mono", 900_000),
    "test_multi": ("test/multi", 950_000),
}

# Golden-ratio steps spread a share of looks identities evenly over any prefix of a group.
_LOOKS_STEP = 0.6180339887498949

_HEAD = None


def _cache_reference_layout() -> None:
    """Compute the reference head's layout once per process instead of once per identity.

    The layout depends only on the UV map and the count, so this changes no output.
    """
    import backend.gaussians.surface as surface

    layouts: dict = {}
    sample_layout = surface.sample_layout

    def cached_layout(uv_coords, uv_faces, count):  # type: ignore[no-untyped-def]
        key = (id(uv_coords), id(uv_faces), int(count))
        if key not in layouts:
            layouts[key] = sample_layout(uv_coords, uv_faces, count)
        return layouts[key]

    surface.sample_layout = cached_layout


def _init_worker(flame: str | None, device: str, threads: int) -> None:
    global _HEAD
    import torch

    from backend.head.registry import load_head_model

    torch.set_num_threads(threads)
    _cache_reference_layout()
    _HEAD = load_head_model(flame).to(device)


def _make(task: tuple[str, dict]) -> tuple[str, float]:
    from backend.data.synthetic import SynthConfig, synthesize

    out, config = task
    t0 = time.perf_counter()
    tmp = Path(out + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    synthesize(_HEAD, tmp, SynthConfig(**config))
    # The folder's name is part of subject.json; rename the finished folder and fix the name.
    meta = json.loads((tmp / "subject.json").read_text())
    meta["name"] = Path(out).name
    (tmp / "subject.json").write_text(json.dumps(meta, indent=1))
    tmp.rename(out)
    return out, time.perf_counter() - t0


def has_looks(index: int, share: float) -> bool:
    """Whether identity ``index`` of a group gets the looks when ``share`` of them do."""
    return (index * _LOOKS_STEP) % 1.0 < share


def plan(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(folder, SynthConfig fields) of every subject still to write."""
    groups = {
        "train_mono": (args.mono, dict(frames=args.mono_frames, views=1, size=args.size, reference_gaussians=args.reference_gaussians)),
        "train_multi": (args.multi, dict(frames=args.multi_frames, views=args.views, size=args.size, reference_gaussians=args.reference_gaussians)),
        "test_mono": (args.test_mono, dict(frames=args.test_mono_frames, views=1, size=args.test_size, reference_gaussians=args.test_reference_gaussians)),
        "test_multi": (args.test_multi, dict(frames=args.test_multi_frames, views=args.views, size=args.test_size, reference_gaussians=args.test_reference_gaussians)),
    }
    tasks = []
    for name, (count, fields) in groups.items():
        folder, offset = GROUPS[name]
        prefix = "m" if "mono" in name else "v"
        for i in range(count):
            out = args.out / folder / f"{prefix}{i:04d}"
            if (out / "subject.json").is_file():
                continue
            tasks.append((str(out), dict(fields, seed=offset + i, looks=args.looks and has_looks(i, args.looks_share))))
    return tasks


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def estimate(args: argparse.Namespace) -> dict:
    """Time one identity of each group on this machine (in this process)."""
    import tempfile

    device = resolve_device(args.device)
    _init_worker(args.flame, device, args.threads)
    args_one = argparse.Namespace(**(vars(args) | {"mono": 1, "multi": 1, "test_mono": 1, "test_multi": 1}))
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        args_one.out = Path(tmp) / "warm-up"
        _make(plan(args_one)[0])  # imports, kernels, the cached layout
        args_one.out = Path(tmp) / "timed"
        for task in plan(args_one):
            name = next(n for n, (folder, _) in GROUPS.items() if f"/{folder}/" in task[0])
            timings[name] = round(_make(task)[1], 2)
    counts = {"train_mono": args.mono, "train_multi": args.multi, "test_mono": args.test_mono, "test_multi": args.test_multi}
    serial = sum(timings[k] * counts[k] for k in counts)
    return {"device": device, "seconds_per_identity": timings, "serial_seconds": round(serial, 1), "with_workers_seconds": round(serial / max(args.workers, 1), 1), "workers": args.workers}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mono", type=int, default=160, help="training monocular identities")
    ap.add_argument("--multi", type=int, default=64, help="training multi-view identities")
    ap.add_argument("--test-mono", type=int, default=8)
    ap.add_argument("--test-multi", type=int, default=8)
    ap.add_argument("--size", type=int, default=256, help="training image size")
    ap.add_argument("--test-size", type=int, default=512, help="evaluation image size")
    ap.add_argument("--mono-frames", type=int, default=16)
    ap.add_argument("--multi-frames", type=int, default=4)
    ap.add_argument("--test-mono-frames", type=int, default=20, help="the last 20%% are the test split")
    ap.add_argument("--test-multi-frames", type=int, default=3)
    ap.add_argument("--views", type=int, default=8, help="cameras of the multi-view ring (>= 5 for phase 2)")
    ap.add_argument("--reference-gaussians", type=int, default=100_000, help="density of the ground-truth heads (training)")
    ap.add_argument("--test-reference-gaussians", type=int, default=200_000)
    ap.add_argument("--workers", type=int, default=max(1, min(12, (mp.cpu_count() or 2) - 2)))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--flame", help="FLAME model (default: the built-in head)")
    ap.add_argument("--looks", action="store_true", help="identities with hair and facial-hair volumes, glasses, skin texture and a key light (backend/data/looks.py)")
    ap.add_argument("--looks-share", type=float, default=1.0, metavar="FRACTION", help="with --looks: the share of each group's identities that get them (the rest are bare heads)")
    ap.add_argument("--estimate", action="store_true", help="time one identity per group and project the full run; write nothing")
    args = ap.parse_args(argv)
    if not 0.0 <= args.looks_share <= 1.0:
        ap.error(f"--looks-share {args.looks_share}: a share must be in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    if args.estimate:
        print(json.dumps(estimate(args), indent=1))
        return 0
    device = resolve_device(args.device)
    tasks = plan(args)
    t0 = time.perf_counter()
    print(f"{len(tasks)} subjects to write into {args.out} with {args.workers} workers on {device}", file=sys.stderr, flush=True)
    from tqdm import tqdm

    ctx = mp.get_context("spawn")
    per_subject = []
    with ctx.Pool(args.workers, initializer=_init_worker, initargs=(args.flame, device, args.threads)) as pool:
        for _, seconds in tqdm(pool.imap_unordered(_make, tasks), total=len(tasks), unit="subject", file=sys.stderr):
            per_subject.append(seconds)
    summary = {
        "out": str(args.out),
        "device": device,
        "workers": args.workers,
        "written": len(tasks),
        "seconds": round(time.perf_counter() - t0, 1),
        "mean_seconds_per_subject_per_worker": round(sum(per_subject) / max(len(per_subject), 1), 2),
        "counts": {name: len([p for p in (args.out / GROUPS[name][0]).glob("*") if (p / "subject.json").is_file()]) for name in GROUPS},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "corpus.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
