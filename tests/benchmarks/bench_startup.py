"""Where a fresh process's time goes, stage by stage, for `refine` and `generate` as the
commands run them (no profiler, so no profiler's overhead).

Run it as its own process; ``--since`` is the shell's clock just before (so Python's own
start and whatever its site imports are counted too):

    python tests/benchmarks/bench_startup.py --since $(date +%s.%N) refine START.npz SUBJECT OUT.npz
    python tests/benchmarks/bench_startup.py --since $(date +%s.%N) generate SUBJECT OUT.npz
    python tests/benchmarks/bench_startup.py --since $(date +%s.%N) refine START.npz SUBJECT OUT.npz --iterations 3   # a CPU's start

Each line: the stage, the seconds since ``--since`` when it ended, and its own seconds.
CUDA work is synchronized at each mark.
"""

from __future__ import annotations

import time

T_FIRST_LINE = time.time()

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class Marks:
    """Stage ends, seconds after ``since``."""

    def __init__(self, since: float) -> None:
        self.since = since
        self.ends: list[tuple[str, float]] = [("python started (its site imports included)", T_FIRST_LINE - since)]

    def __call__(self, stage: str) -> None:
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
            sys.modules["torch"].cuda.synchronize()
        self.ends.append((stage, time.time() - self.since))

    def report(self) -> str:
        lines, previous = [], 0.0
        for stage, end in self.ends:
            lines.append(f"{stage:48s} {end:7.2f} s  (+{end - previous:.2f})")
            previous = end
        lines.append(f"torch._dynamo imported: {'torch._dynamo' in sys.modules}; cv2 imported: {'cv2' in sys.modules}")
        return "\n".join(lines)


def start_torch(mark: Marks) -> str:
    """Import torch and start its device (CUDA where present); returns the device's name."""
    import torch

    mark("import torch")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.zeros(1, device=device)
    mark(f"start {device}")
    return device


def refine_stages(args: argparse.Namespace, mark: Marks) -> None:
    device = start_torch(mark)
    from backend.data.subject import Subject
    from backend.gaussians.files import load_avatar, save_avatar
    from backend.head.registry import load_head_model
    from backend.refine.config import preset
    from backend.refine.photometric_tracking import track_photometric
    from backend.refine.refine import refine

    mark("import backend")
    head = load_head_model(None).to(device)
    avatar = load_avatar(args.avatar).to(device)
    subject = Subject.load(args.subject)
    mark("load head, avatar, subject")
    if device == "cuda" and subject.info.source != "synthetic":  # where `refine` tracks photometrically
        subject = track_photometric(head, subject)
        mark("photometric tracking")
    config = preset("ours") if args.iterations is None else preset("ours", iterations=args.iterations)
    result = refine(avatar, head, subject, config)
    mark(f"refine (its loop {result.timings['wall']:.1f} s)")
    save_avatar(result.avatar, args.out)
    mark("save")


def generate_stages(args: argparse.Namespace, mark: Marks) -> None:
    device = start_torch(mark)
    from backend.data.subject import Subject
    from backend.gaussians.files import save_avatar
    from backend.generate.checkpoint import load_generator
    from backend.generate.generate import generate_avatar
    from backend.generate.personalize import Personalization, personalize
    from backend.head.registry import load_head_model

    mark("import backend")
    head = load_head_model(None)
    model, _ = load_generator(None, head)
    subject = Subject.load(args.subject)
    mark("load head, weights, subject")
    head, views = head.to(device), [(0, 0)]
    avatar = generate_avatar(model.to(device), head, subject, views)
    mark(f"generate (the network {avatar.meta['generate_ms']:.0f} ms, then the outline)")
    avatar = personalize(avatar, head, subject, views, Personalization.for_device(device))
    mark("personalize")
    save_avatar(avatar, args.out)
    mark("save")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--since", type=float, required=True, help="the shell's clock (seconds since the epoch) just before this process started")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("refine", help="refine START on SUBJECT as `spatialavatar refine` does")
    p.add_argument("avatar", type=Path)
    p.add_argument("subject", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--iterations", type=int, help="refinement steps (default: the command's)")
    p.set_defaults(fn=refine_stages)
    p = sub.add_parser("generate", help="generate from SUBJECT's first frame as `spatialavatar generate` does")
    p.add_argument("subject", type=Path)
    p.add_argument("out", type=Path)
    p.set_defaults(fn=generate_stages)
    args = ap.parse_args()
    mark = Marks(args.since)
    args.fn(args, mark)
    print(mark.report())


if __name__ == "__main__":
    main()
