"""Personalization's hold on real clips: the generated head (K = 1, the clip's first frame)
personalized with each hold, scored zero-shot on the held-out frames and on its source frame.
Writes ``results/<clip>/personalize_sweep.json`` and ``heldout_personalized_hold<H>.png``
(the held-out picture frames, as the clip stage draws them).

    python tests/benchmarks/real/personalize_sweep.py --clips st_hill r3d_may --holds 0 1e-5 1e-4   # GPU
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.benchmarks.real.clips import _sync, heldout_tiles, open_subject, picture_frames, save_row  # noqa: E402
from tests.benchmarks.real.data import Layout, clip_script_parser  # noqa: E402

SCORES = ("psnr", "psnr_mask", "psnr_face")


def sweep(name: str, layout: Layout, holds: list[float], iterations: int | None = None) -> dict:
    from backend.generate.checkpoint import load_generator
    from backend.generate.generate import generate_avatar
    from backend.generate.personalize import Personalization, personalize
    from backend.head.registry import load_head_model
    from backend.refine.evaluate import evaluate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head = load_head_model(layout.head).to(device)
    model, _ = load_generator(None, head)
    subject = open_subject(name, layout)
    generated = generate_avatar(model.to(device), head, subject, [(0, 0)])
    test = evaluate(generated, head, subject, "test")
    report: dict = {"clip": name, "device": str(torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"), "date": time.strftime("%Y-%m-%d")}
    report["generated"] = {k: test[k] for k in SCORES}
    out = layout.results / name
    out.mkdir(parents=True, exist_ok=True)
    for hold in holds:
        _sync(device)
        t0 = time.perf_counter()
        avatar = personalize(generated, head, subject, [(0, 0)], Personalization().with_overrides({"hold": hold, "iterations": iterations}))
        _sync(device)
        seconds = time.perf_counter() - t0
        test, source = evaluate(avatar, head, subject, "test"), evaluate(avatar, head, subject, frames=[0])
        report[f"hold {hold:g}"] = {k: test[k] for k in SCORES} | {"source_psnr_mask": source["psnr_mask"], "seconds": seconds}
        save_row(heldout_tiles(avatar, head, subject, picture_frames(subject)), out / f"heldout_personalized_hold{hold:g}.png")
    (out / "personalize_sweep.json").write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    ap = clip_script_parser(__doc__)
    ap.add_argument("--holds", nargs="+", type=float, default=[0.0, 1e-5, 1e-4], help="RefineConfig.hold values to compare")
    ap.add_argument("--iterations", type=int, help="personalization steps (default: Personalization's)")
    args = ap.parse_args()
    layout = Layout(args.data, None)
    for name in args.clips:
        print(json.dumps(sweep(name, layout, args.holds, args.iterations)), flush=True)


if __name__ == "__main__":
    main()
