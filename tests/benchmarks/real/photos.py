"""The photo stage: leave-one-out generation on several photos of one person.

The photos are tracked together (one identity). The last photo is held out; the generator
makes the head from the first K of the others, K = 1 .. min(4, n - 1), and the held-out
photo is scored at its own tracked pose and expression. Writes ``results/<identity>/
photos.json`` and ``photos.png`` (``photos_POOL.*`` for another pool than the mean,
``photos[_POOL]_matched.*`` with the sources' colours matched first,
``photos[...]_personalized.*`` with each head personalized on its own K sources as
``generate`` does, for K = 1 and the largest K only): the sources, then for K = 1 and the
largest K the held-out view and the head at -30, 0 and +30 degrees.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import numpy as np
import torch

from backend.generate.model import MAX_SOURCES, PoolMode
from backend.refine.evaluate import evaluate
from tests.benchmarks.real.clips import Log, ground_truth_row, heldout_tiles, open_subject, save_grid, turntable_tiles
from tests.benchmarks.real.data import Layout, PhotoSet
from tests.benchmarks.real.protocol import Protocol

PHOTO_YAW_DEG = 30.0


def photos_stem(pool: PoolMode, match_colours: bool = False, personalized: bool = False) -> str:
    """The result files' name for a pool: ``photos`` for the model's mean, as generate runs."""
    return "photos" + ("" if pool == "mean" else f"_{pool}") + ("_matched" if match_colours else "") + ("_personalized" if personalized else "")


def run_photos(
    photos: PhotoSet, layout: Layout, protocol: Protocol, log: Log, pool: PoolMode = "mean", match_colours: bool = False, personalized: bool = False
) -> dict:
    from backend.generate.checkpoint import load_generator
    from backend.generate.generate import generate_avatar
    from backend.generate.personalize import Personalization, personalize
    from backend.head.registry import load_head_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head = load_head_model(layout.head).to(device)
    subject = open_subject(photos.name, layout)
    n = subject.num_frames
    if n < 3:
        raise SystemExit(f"{photos.name}: {n} photos tracked; leave-one-out needs at least 3")
    held = n - 1
    model, _ = load_generator(None, head)
    model = model.to(device)
    out = layout.results / photos.name
    out.mkdir(parents=True, exist_ok=True)
    rows: list[list[np.ndarray]] = [ground_truth_row(subject, list(range(n)))]
    report: dict = {"identity": photos.name, "photos": n, "held_out": held, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"), "pool": pool, "match_colours": match_colours, "k": {}}
    ks = list(range(1, min(MAX_SOURCES, n - 1) + 1))
    schedule = Personalization.for_device(device.type) if personalized else None
    if schedule is not None:  # a personalization per K is slow on the CPU: the two ends only
        ks = [ks[0], ks[-1]]
        report["personalization"] = asdict(schedule)
    for k in ks:
        views = [(t, 0) for t in range(k)]
        avatar = generate_avatar(model, head, subject, views, pool=pool, match_colours=match_colours)
        if schedule is not None:
            avatar = personalize(avatar, head, subject, views, schedule)
        s = evaluate(avatar, head, subject, frames=[held])
        report["k"][str(k)] = {key: s[key] for key in ("psnr", "psnr_mask", "psnr_face", "ssim", "ssim_mask", "ssim_face")} | {"generate_ms": avatar.meta["generate_ms"]}
        log(f"  K = {k}: held-out photo PSNR {s['psnr']:.2f} / mask {s['psnr_mask']:.2f} / face {s['psnr_face']:.2f} dB")
        if k in (ks[0], ks[-1]):
            rows.append(heldout_tiles(avatar, head, subject, [held]) + turntable_tiles(avatar, head, subject.params.index([held]), PHOTO_YAW_DEG, views=3))
    stem = photos_stem(pool, match_colours, personalized)
    save_grid(rows, out / f"{stem}.png")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    return report
