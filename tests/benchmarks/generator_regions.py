"""Where generated heads miss the person: zero-shot held-out PSNR of generators (K = 1 from
the first frame, as bench_real.py's "generator" method) split into four parts of the person
mask: the face (the tracked landmarks' hull), above it (hair), below it (neck, collar) and
beside it (side hair, ears).

    python tests/benchmarks/generator_regions.py --clips lp_d18 vr_1 --generator looks=RUN/generator.pt

The shipped weights are always the first column. Prints one markdown row per clip and part,
PSNR pooled over the held-out frames' pixels of that part (dB); runs on the CPU in about a
minute per clip and generator.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from backend.data.subject import Subject
from backend.gaussians.avatar import Avatar
from backend.generate.checkpoint import load_generator
from backend.generate.generate import generate_avatar
from backend.head.model import HeadModel
from backend.head.registry import load_head_model
from backend.refine.evaluate import render_frame
from tests.benchmarks.real.clips import open_subject
from tests.benchmarks.real.data import Layout, clip_script_parser

PARTS = ("face", "above", "below", "beside")


def part_errors(avatar: Avatar, head: HeadModel, subject: Subject) -> dict[str, tuple[float, int]]:
    """Summed squared error (mean over RGB) and pixel count of each part over the held-out
    frames (frames whose face hull is empty are left out)."""
    bg = subject.background()
    acc = {part: (0.0, 0) for part in PARTS}
    for t in subject.split["test"]:
        hull = subject.face_mask(t)
        if hull is None:
            raise SystemExit(f"{subject.root}: no tracked landmarks, so no face region (track the clip with bench_real.py track)")
        face = hull[..., 0] > 0.5
        rows = torch.nonzero(face.any(1))[:, 0]
        if len(rows) == 0:
            continue
        rgb = render_frame(avatar, head, subject.params.index([t]), subject.cameras(t), bg).rgb[0]
        m = subject.mask(t)
        target = subject.image(t) * m + bg * (1 - m)
        err = ((rgb - target) ** 2).mean(-1)
        person = m[..., 0] > 0.5
        row = torch.arange(person.shape[0])[:, None].expand_as(person)
        rest = person & ~face
        parts = {"face": face & person, "above": rest & (row < rows.min()), "below": rest & (row > rows.max())}
        parts["beside"] = rest & ~parts["above"] & ~parts["below"]
        for part, where in parts.items():
            total, count = acc[part]
            acc[part] = (total + float(err[where].sum()), count + int(where.sum()))
    return acc


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, str | None]]:
    """The arguments, and the generators to compare by name (the shipped weights first, None)."""
    ap = clip_script_parser(__doc__)
    ap.add_argument("--generator", action="append", default=[], metavar="NAME=PATH", help="another generator file to compare (repeatable)")
    args = ap.parse_args(argv)
    generators: dict[str, str | None] = {"shipped": None}
    for item in args.generator:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file() or name in generators:
            ap.error(f"--generator {item!r}: give NAME=PATH of a generator file, one name each ({', '.join(generators)} taken)")
        generators[name] = path
    return args, generators


def main(argv: list[str] | None = None) -> None:
    args, generators = parse_args(argv)
    head = load_head_model()
    models = {name: load_generator(path, head)[0] for name, path in generators.items()}
    print("| clip | part | share of the mask | " + " | ".join(generators) + " |")
    print("|---|---|---|" + "---|" * len(generators))
    for clip in args.clips:
        subject = open_subject(clip, Layout(args.data))
        errors = {name: part_errors(generate_avatar(model, head, subject, [(0, 0)]), head, subject) for name, model in models.items()}
        pixels = sum(count for _, count in errors["shipped"].values())
        for part in PARTS:
            count = errors["shipped"][part][1]
            psnrs = [10 * np.log10(count / max(errors[name][part][0], 1e-12)) for name in generators]
            print(f"| {clip} | {part} | {count / pixels:.0%} | " + " | ".join(f"{p:.2f}" for p in psnrs) + " |", flush=True)


if __name__ == "__main__":
    main()
