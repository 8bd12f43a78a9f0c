"""Tables (Markdown) and figures from every result the clip and photo stages left.

Figures go to ``--figures DIR``: per clip, the held-out frames (ground truth, then each
method, a row each) and the turntables; per photo identity, its sheet. They show real
people from unlicensed media, so they stay in the ignored data folder, never in git.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import get_args

import numpy as np
from PIL import Image, ImageDraw

from backend.generate.model import PoolMode
from tests.benchmarks.real.data import Layout, Sources
from tests.benchmarks.real.protocol import GENERATOR_LEVER_PREFIX, LEVER_PREFIX, LEVERS, METHOD_LABELS, METHODS

LABEL_WIDTH = 200


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def clip_results(layout: Layout, sources: Sources) -> dict[str, dict]:
    """Every clip's scores.json in the data folder: listed clips first, in list order."""
    order = {c.name: i for i, c in enumerate(sources.clips)}
    paths = sorted(layout.results.glob("*/scores.json"), key=lambda p: (order.get(p.parent.name, len(order)), p.parent.name))
    return {p.parent.name: json.loads(p.read_text()) for p in paths}


def clip_tables(results: dict[str, dict]) -> str:
    lines = ["### Held-out frames, PSNR full / person mask / face (dB)", ""]
    present = [m for m in METHODS if any(m in r["methods"] for r in results.values())]
    lines.append("| clip | frames (train + test) | " + " | ".join(METHOD_LABELS[m] for m in present) + " |")
    lines.append("|---|---|" + "---|" * len(present))
    for name, r in results.items():
        cells = []
        for m in present:
            e = r["methods"].get(m)
            cells.append("not run" if e is None else f"{_fmt(e['psnr'])} / {_fmt(e['psnr_mask'])} / {_fmt(e['psnr_face'])}")
        lines.append(f"| {name} | {r['subject']['train']} + {r['subject']['test']} | " + " | ".join(cells) + " |")
    lines += ["", "### Mean over the clips each method ran on", ""]
    keys = [("psnr", 2), ("psnr_mask", 2), ("psnr_face", 2), ("ssim", 3), ("ssim_mask", 3), ("ssim_face", 3), ("lpips", 3), ("train_psnr", 2), ("orbit_holes", 4), ("spike_share", 4), ("wall_seconds", 1)]
    lines.append("| method | clips | " + " | ".join(k for k, _ in keys) + " |")
    lines.append("|---|---|" + "---|" * len(keys))
    for m in present:
        entries = [r["methods"][m] for r in results.values() if m in r["methods"]]
        lines.append(f"| {METHOD_LABELS[m]} | {len(entries)} | " + " | ".join(_fmt(_mean([e.get(k) for e in entries]), d) for k, d in keys) + " |")
        shared = max(e.get("concurrent_runs", 1) for e in entries)
        if shared > 1:
            lines.append(f"| (its wall time: {shared} runs shared the GPU at once, not comparable) |")
    return "\n".join(lines + lever_table(results))


def lever_table(results: dict[str, dict]) -> list[str]:
    """Each lever against its base on the clips both ran on: mean differences (dB; SSIM in
    the mask), and the lever's own spike share and wall time. The base of ``ours-surface+X``
    is ours from the surface; that of ``ours-generator+X`` is ``ours-surface+X``."""
    rows = [(LEVER_PREFIX + n, "ours-surface", n, LEVERS[n].about) for n in LEVERS]
    rows += [(GENERATOR_LEVER_PREFIX + n, LEVER_PREFIX + n, f"from the generator: {n}", f"{LEVERS[n].about}, starting from the generator") for n in LEVERS]
    present = [r for r in rows if any(r[0] in c["methods"] for c in results.values())]
    if not present:
        return []
    deltas = [("psnr", 2), ("psnr_mask", 2), ("psnr_face", 2), ("ssim_mask", 3), ("train_psnr", 2)]
    lines = ["", "### Levers: difference from their base on the same clips", ""]
    lines.append("| lever | what it changes | base | clips | " + " | ".join(f"d {k}" for k, _ in deltas) + " | spike_share | wall_seconds |")
    lines.append("|---|---|---|---|" + "---|" * (len(deltas) + 2))
    for method, base, name, about in present:
        both = {n: r["methods"] for n, r in results.items() if method in r["methods"] and base in r["methods"]}
        pairs = [(m[method], m[base]) for m in both.values()]
        cells = [_fmt(_mean([a[k] - b[k] for a, b in pairs]), d) for k, d in deltas]
        own = [_fmt(_mean([a.get(k) for a, _ in pairs]), d) for k, d in (("spike_share", 4), ("wall_seconds", 1))]
        lines.append(f"| {name} | {about} | {base} | {', '.join(both)} | " + " | ".join(cells + own) + " |")
    return lines


def photo_tables(layout: Layout, sources: Sources) -> str:
    from tests.benchmarks.real.photos import photos_stem

    tables = []
    for pool, matched, personalized in itertools.product(get_args(PoolMode), (False, True), (False, True)):
        rows, per_k = [], {}
        for photos in sources.photos:
            path = layout.results / photos.name / f"{photos_stem(pool, matched, personalized)}.json"
            if not path.is_file():
                continue
            r = json.loads(path.read_text())
            cells = []
            for k, s in r["k"].items():
                per_k.setdefault(k, []).append(s)
                cells.append(f"K={k}: {_fmt(s['psnr_face'])} / {_fmt(s['psnr_mask'])}")
            rows.append(f"| {photos.name} | {r['photos']} | " + "; ".join(cells) + " |")
        if not rows:
            continue
        pooled = ("" if pool == "mean" else f", {pool} pool") + (", sources' colours matched" if matched else "") + (", personalized" if personalized else "")
        lines = [f"### Photos, leave one out{pooled}: held-out photo PSNR face / person mask (dB)", "", "| identity | photos | per K |", "|---|---|---|", *rows, ""]
        lines.append("| K | identities | face PSNR | mask PSNR | face SSIM |")
        lines.append("|---|---|---|---|---|")
        for k in sorted(per_k, key=int):
            s = per_k[k]
            lines.append(f"| {k} | {len(s)} | {_fmt(_mean([x['psnr_face'] for x in s]))} | {_fmt(_mean([x['psnr_mask'] for x in s]))} | {_fmt(_mean([x['ssim_face'] for x in s]), 3)} |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def silhouette_table(layout: Layout, sources: Sources) -> str:
    rows, both = [], []
    for clip in sources.clips:
        path = layout.results / clip.name / "silhouette.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        g, p = r["generated"], r["personalized"]
        both.append((g, p))
        rows.append(f"| {clip.name} | {g['silhouette_iou']:.3f} / {_fmt(g['psnr_mask'])} | {p['silhouette_iou']:.3f} / {_fmt(p['psnr_mask'])} | {p['iterations']} in {p['seconds']:.0f} s ({r['device']}) |")
    if not rows:
        return ""
    mean = lambda key, i: _mean([pair[i][key] for pair in both])  # noqa: E731
    rows.append(f"| **mean** | {mean('silhouette_iou', 0):.3f} / {_fmt(mean('psnr_mask', 0))} | {mean('silhouette_iou', 1):.3f} / {_fmt(mean('psnr_mask', 1))} | |")
    head = ["### Source view, K = 1 from frame 0: silhouette IoU with the person mask / PSNR in the mask (dB)", "", "| clip | generated | personalized | personalization |", "|---|---|---|---|"]
    return "\n".join(head + rows)


def _labelled(rows: list[tuple[str, np.ndarray]]) -> Image.Image:
    """Rows of pictures with a text label to the left of each."""
    width = LABEL_WIDTH + max(a.shape[1] for _, a in rows)
    height = sum(a.shape[0] for _, a in rows)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for label, a in rows:
        sheet.paste(Image.fromarray(a), (LABEL_WIDTH, y))
        draw.text((8, y + a.shape[0] // 2), label, fill="black")
        y += a.shape[0]
    return sheet


def clip_figures(name: str, layout: Layout, dest: Path) -> list[Path]:
    folder = layout.results / name
    written = []
    for kind, first in (("heldout", [("ground truth", folder / "heldout_truth.png")]), ("turntable", [])):
        labelled = [(METHOD_LABELS[m], m) for m in METHODS] + [(f"ours + {n}", LEVER_PREFIX + n) for n in LEVERS]
        labelled += [(f"ours from the generator + {n}", GENERATOR_LEVER_PREFIX + n) for n in LEVERS]
        rows = first + [(label, folder / f"{kind}_{m}.png") for label, m in labelled if (folder / f"{kind}_{m}.png").is_file()]
        sheet = _labelled([(label, np.asarray(Image.open(p).convert("RGB"))) for label, p in rows])
        path = dest / f"{name}_{kind}.png"
        sheet.save(path)
        written.append(path)
    return written


def write_report(layout: Layout, sources: Sources, figures: Path | None) -> str:
    results = clip_results(layout, sources)
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        for name in results:
            clip_figures(name, layout, figures)
        for photos in sources.photos:
            sheet = layout.results / photos.name / "photos.png"
            if sheet.is_file():
                shutil.copy(sheet, figures / f"{photos.name}_photos.png")
    return "\n\n".join(t for t in (clip_tables(results), photo_tables(layout, sources), silhouette_table(layout, sources)) if t)
