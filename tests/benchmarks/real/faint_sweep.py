"""The faint-colour rules (``RefineConfig.faint``) on real clips, each applied to the same
refinement: photometric tracking, the dense generator start, 10K iterations with the pass
off, then every rule's colours set back on that one result and scored. Comparing rules on
one run leaves out the run-to-run spread (about 0.2 dB in the mask) that separate runs carry.
Writes ``results/<clip>/faint_sweep.json`` and, per rule, ``heldout_faint_<rule>.png`` and
``turntable_faint_<rule>.png`` (the rule's label: ``rule_label``).

    python tests/benchmarks/real/faint_sweep.py --clips st_hill lp_d3 --rules off min_known_px=0.1 min_known_px=0.1,min_facing=0.3   # GPU
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.benchmarks.real.clips import (
    _photometric,
    _refine,
    _start_key,
    _starts,
    _track_photometric,
    heldout_tiles,
    open_subject,
    picture_frames,
    refine_config,
    save_row,
    score,
    turntable_tiles,
)
from tests.benchmarks.real.data import Layout, clip_script_parser
from tests.benchmarks.real.protocol import Protocol

METHOD = "ours-generator+dense+no-faint+photo-lr3+tuned"  # the refinement every rule settles


def parse_rule(text: str) -> dict[str, float] | None:
    """``off`` -> None; ``NAME=VALUE,...`` -> FaintColours fields (the others zero)."""
    from backend.refine.config import FaintColours

    if text == "off":
        return None
    names = {f.name for f in fields(FaintColours)} - {"enabled"}
    rule = dict.fromkeys(sorted(names), 0.0)
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            if name not in names:
                raise ValueError(name)
            rule[name] = float(value)
        except ValueError:
            raise SystemExit(f"bad rule {text!r}: expected off or NAME=VALUE,... with NAME in {sorted(names)}") from None
    return rule


def rule_label(text: str) -> str:
    """A file-name-safe label of a rule: ``min_known_px=0.1,min_facing=0.3`` -> ``known_px0.1_facing0.3``."""
    return text.replace("min_", "").replace("=", "").replace(",", "_")


def sweep(name: str, layout: Layout, protocol: Protocol, rules: list[str]) -> dict:
    from backend.head.registry import load_head_model
    from backend.refine.config import FaintColours
    from backend.refine.faint import coverage, faint_rows, restore_colours

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head = load_head_model(layout.head).to(device)
    subject, _, _ = _track_photometric(head, open_subject(name, layout), _photometric(METHOD) or {}, print)
    start, _ = _starts([METHOD], head, subject, protocol, print)[_start_key(METHOD, protocol)]
    result, seconds = _refine(start, head, subject, refine_config(METHOD, protocol))
    refined, tuned = result.avatar, result.train_params  # type: ignore[attr-defined]
    verts = head(refined.params_for(tuned).to(device), check=False).vertices
    seen = coverage(
        verts, head.faces, refined.binding.to(device), refined.local.map(lambda t: t.to(device)), subject, subject.split["train"]
    )
    report: dict = {
        "clip": name,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "refine_seconds": seconds,
        "rules": {},
    }
    out = layout.results / name
    out.mkdir(parents=True, exist_ok=True)
    frames, pose = picture_frames(subject), subject.params.index([subject.split["test"][0]])
    for text in rules:
        rule = parse_rule(text)
        rows = torch.zeros(refined.count, dtype=torch.bool) if rule is None else faint_rows(seen, FaintColours(**rule)).cpu()
        avatar = replace(refined, local=restore_colours(refined.local, start.local, rows))
        entry = score(avatar, start, head, subject, protocol, tuned)
        report["rules"][text] = entry | {
            "faint_share": float(rows.float().mean()),
            "known_px_share": float(seen.known.cpu()[rows].sum() / seen.known.sum().cpu()),
        }
        save_row(heldout_tiles(avatar, head, subject, frames), out / f"heldout_faint_{rule_label(text)}.png")
        save_row(turntable_tiles(avatar, head, pose, protocol.turntable_deg), out / f"turntable_faint_{rule_label(text)}.png")
        print(
            f"  {text}: {entry['psnr']:.2f} / {entry['psnr_mask']:.2f} / {entry['psnr_face']:.2f} dB, train {entry['train_psnr']:.2f}, faint {report['rules'][text]['faint_share']:.3f}",
            flush=True,
        )
    (out / "faint_sweep.json").write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    ap = clip_script_parser(__doc__)
    ap.add_argument(
        "--rules",
        nargs="+",
        default=["off", "min_known_share=0.5", "min_known_share=0.5,min_known_px=0.1"],
        help="off, or FaintColours fields NAME=VALUE joined by commas (unnamed ones 0)",
    )
    args = ap.parse_args()
    for text in args.rules:
        parse_rule(text)
    layout = Layout(args.data, None)
    for name in args.clips:
        sweep(name, layout, Protocol(), args.rules)


if __name__ == "__main__":
    main()
