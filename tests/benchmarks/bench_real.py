"""The real-face benchmark: public clips and photos of real people (docs/benchmarks-real.md).

One command per stage; each is resumable (finished work is kept and skipped) and prints its
progress. DATA is an ignored folder (default data/real):

    # 1. media out of repository snapshots, with a manifest (any machine)
    python tests/benchmarks/bench_real.py prepare --snapshot KwaiVGI/LivePortrait=PATH ...
    # 2. tracking (CPU machine, mediapipe), then compact packs for the GPU machine
    python tests/benchmarks/bench_real.py track [--clips NAME ...] [--photos]
    python tests/benchmarks/bench_real.py pack [--clips NAME ...] [--photos]
    # 3. refinement and generation (GPU machine): one JSON and pictures per clip
    python tests/benchmarks/bench_real.py clips [--clips NAME ...] [--methods M ...]
    python tests/benchmarks/bench_real.py photos
    python tests/benchmarks/bench_real.py silhouettes   # cheap: the CPU is enough
    # 4. tables and figures from every result found
    python tests/benchmarks/bench_real.py report --figures docs/figures/real

Your own material: list it in a sources file of the same form (``--sources FILE``), or
track your video into DATA/subjects/NAME with ``spatialavatar track`` and run ``clips
--clips NAME`` on it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import get_args

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backend.generate.model import PoolMode  # noqa: E402
from tests.benchmarks.real.data import SOURCES, Layout, Sources, prepare  # noqa: E402
from tests.benchmarks.real.protocol import METHODS, Protocol, method_choices  # noqa: E402


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_prepare(args: argparse.Namespace, layout: Layout, sources: Sources) -> None:
    snapshots = {}
    for spec in args.snapshot:
        repo, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--snapshot {spec!r}: expected OWNER/NAME=PATH")
        snapshots[repo] = Path(path)
    manifest = prepare(snapshots, layout, sources)
    log(f"{len(manifest['files'])} files in {layout.media}, manifest {layout.manifest}")


def cmd_track(args: argparse.Namespace, layout: Layout, sources: Sources) -> None:
    from tests.benchmarks.real.tracking import track_clip, track_photos

    protocol = Protocol()
    jobs = [(c.name, lambda c=c: track_clip(c, layout, protocol, log)) for c in sources.select_clips(args.clips)]
    if args.photos is not None:
        jobs += [(p.name, lambda p=p: track_photos(p, layout, protocol, log)) for p in sources.select_photos(args.photos)]
    for i, (name, job) in enumerate(jobs):
        log(f"[{i + 1}/{len(jobs)}] tracking {name}")
        s = job()
        log(f"  {s['frames']} frames (stride {s['stride']}), landmarks {s['landmark_error_iod_percent']:.2f}% IOD, {s['wall_seconds']:.0f} s")


def cmd_pack(args: argparse.Namespace, layout: Layout, sources: Sources) -> None:
    from tests.benchmarks.real.tracking import pack

    names = [c.name for c in sources.select_clips(args.clips)] + ([p.name for p in sources.select_photos(args.photos)] if args.photos is not None else [])
    for name in names:
        dest = pack(layout.subjects / name, layout.packs / f"{name}.tar", Protocol().jpeg_quality)
        log(f"{dest}: {dest.stat().st_size / 2**20:.1f} MiB")


def cmd_clips(args: argparse.Namespace, layout: Layout, sources: Sources) -> None:
    from tests.benchmarks.real.clips import run_clip

    if (args.generator is None) != (args.tag is None):
        raise SystemExit("--generator and --tag go together: another generator's results are stored as METHOD@TAG")
    if args.generator is not None and not args.generator.is_file():
        raise SystemExit(f"--generator {args.generator}: no such file (a training run's generator.pt)")
    if args.tag is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.tag):
        raise SystemExit(f"--tag {args.tag!r}: letters, digits, '.', '_' and '-' only (it names files)")
    protocol = Protocol(iterations=args.iters, generator=None if args.generator is None else str(args.generator))
    # Any subject in the data folder (or its pack) can be named, listed or not.
    names = args.clips or [c.name for c in sources.clips]
    for i, name in enumerate(names):
        log(f"[{i + 1}/{len(names)}] {name}")
        run_clip(name, layout, protocol, args.methods, log, args.shared, args.tag or "")


def cmd_photos(args: argparse.Namespace, layout: Layout, sources: Sources) -> None:
    from tests.benchmarks.real.photos import run_photos

    chosen = sources.select_photos(args.identities)
    for i, photos in enumerate(chosen):
        log(f"[{i + 1}/{len(chosen)}] {photos.name}")
        run_photos(photos, layout, Protocol(), log, args.pool, args.match_colours, args.personalize)


def cmd_silhouettes(args: argparse.Namespace, layout: Layout, sources: Sources) -> None:
    from tests.benchmarks.real.silhouettes import run_silhouette

    names = args.clips or [c.name for c in sources.clips]
    for i, name in enumerate(names):
        log(f"[{i + 1}/{len(names)}] {name}")
        run_silhouette(name, layout, log)


def cmd_report(args: argparse.Namespace, layout: Layout, sources: Sources) -> None:
    from tests.benchmarks.real.report import write_report

    print(write_report(layout, sources, args.figures))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/real"), help="benchmark data folder (ignored by git)")
    ap.add_argument("--sources", type=Path, default=SOURCES, help="the list of clips and photos")
    ap.add_argument("--flame", help="head model for tracking and scoring ('ict', a FLAME folder; default the built-in head); its subjects and results get folders of their own")
    sub = ap.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("prepare", help="copy the media out of repository snapshots and write the manifest")
    p.add_argument("--snapshot", action="append", default=[], metavar="OWNER/NAME=PATH", help="a git directory or checkout of that repository")
    p.set_defaults(fn=cmd_prepare)
    for name, fn, text in (("track", cmd_track, "track clips (and photos) into subjects"), ("pack", cmd_pack, "compact packs of tracked subjects for the GPU machine")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--clips", nargs="*", help="clip names (default: all)")
        p.add_argument("--photos", nargs="*", metavar="NAME", help="the photo identities too (all of them, or the named ones)")
        p.set_defaults(fn=fn)
    p = sub.add_parser("clips", help="refine and score every method on each clip (GPU)")
    p.add_argument("--clips", nargs="*", help="subject names in DATA/subjects or DATA/packs (default: every listed clip)")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=method_choices(), help="methods, and levers on ours (ours-surface+NAME, tests/benchmarks/real/protocol.py)")
    p.add_argument("--iters", type=int, default=Protocol.iterations)
    p.add_argument("--shared", type=int, default=1, metavar="N", help="N runs share the GPU at once (recorded, so the report marks their wall times as not comparable)")
    p.add_argument("--generator", type=Path, metavar="PATH", help="a generator file (a training run's generator.pt) for the methods that start from it, instead of the shipped ones (needs --tag)")
    p.add_argument("--tag", metavar="NAME", help="store the results as METHOD@NAME, beside the methods' own")
    p.set_defaults(fn=cmd_clips)
    p = sub.add_parser("photos", help="leave-one-out generation on the photo identities")
    p.add_argument("--identities", nargs="*", metavar="NAME", help="photo identities (default: all)")
    p.add_argument("--pool", choices=get_args(PoolMode), default="mean", help="how the generator pools the sources (results of other pools than the mean go to photos_POOL.json)")
    p.add_argument("--match-colours", action="store_true", help="match the sources' exposure and white balance before pooling (results go to photos[_POOL]_matched.json)")
    p.add_argument("--personalize", action="store_true", help="personalize each head on its own sources, as generate does, at K = 1 and the largest K (results go to photos[...]_personalized.json)")
    p.set_defaults(fn=cmd_photos)
    p = sub.add_parser("silhouettes", help="the generated head's outline in its source view, zero-shot and personalized (CPU or GPU)")
    p.add_argument("--clips", nargs="*", help="subject names (default: every listed clip)")
    p.set_defaults(fn=cmd_silhouettes)
    p = sub.add_parser("report", help="tables (Markdown) and figures from the results")
    p.add_argument("--figures", type=Path, help="also copy the representative figures here")
    p.set_defaults(fn=cmd_report)
    args = ap.parse_args()
    args.fn(args, Layout(args.data, args.flame), Sources.load(args.sources))


if __name__ == "__main__":
    main()
