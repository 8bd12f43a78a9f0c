"""The source-view stage: does the generated head fill the person's outline in the photo it
was made from?

For each clip, the generator makes the head from frame 0 (K = 1) and it is scored in that
same view, zero-shot and after personalization on it (the device's schedule,
``Personalization.for_device``): the silhouette's IoU with the person mask (alpha > 0.5 against
mask > 0.5) and the PSNR within the mask. Writes ``results/<clip>/silhouette.json`` and
``silhouette.png``: the source frame, then each head in that view and at -30 and +30 degrees
of yaw (generated, then personalized). Cheap enough for the CPU: one generation, one short
personalization and a few renders per clip.
"""

from __future__ import annotations

import json
import time

import torch

from tests.benchmarks.real.clips import Log, ground_truth_row, heldout_tiles, open_subject, save_grid, turntable_tiles
from tests.benchmarks.real.data import Layout

# The side views of the figure: does the hair look like hair away from the source view?
SIDE_YAW_DEG = 30.0


def run_silhouette(name: str, layout: Layout, log: Log) -> dict:
    from backend.generate.checkpoint import load_generator
    from backend.generate.generate import generate_avatar
    from backend.generate.personalize import Personalization, personalize
    from backend.head.registry import load_head_model
    from backend.refine.evaluate import evaluate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head = load_head_model(layout.head).to(device)
    subject = open_subject(name, layout)
    model, _ = load_generator(None, head)
    generated = generate_avatar(model.to(device), head, subject, [(0, 0)])
    config = Personalization.for_device(device.type)
    t0 = time.perf_counter()
    personalized = personalize(generated, head, subject, [(0, 0)], config)
    seconds = time.perf_counter() - t0
    report: dict = {"clip": name, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d")}
    rows = [ground_truth_row(subject, [0])]
    for key, avatar in (("generated", generated), ("personalized", personalized)):
        s = evaluate(avatar, head, subject, frames=[0])
        report[key] = {k: s[k] for k in ("silhouette_iou", "psnr_mask", "psnr")}
        log(f"  {key}: silhouette IoU {s['silhouette_iou']:.3f}, source-view PSNR in the mask {s['psnr_mask']:.2f} dB")
        rows.append(heldout_tiles(avatar, head, subject, [0]) + turntable_tiles(avatar, head, subject.params.index([0]), SIDE_YAW_DEG, views=2))
    report["generated"] |= {k: generated.meta[k] for k in ("outline", "outline_lift_mm", "outline_carved_share") if k in generated.meta}
    report["personalized"] |= {"iterations": config.iterations, "seconds": round(seconds, 1)}
    out = layout.results / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "silhouette.json").write_text(json.dumps(report, indent=1))
    save_grid([sum(rows, [])], out / "silhouette.png")
    return report
