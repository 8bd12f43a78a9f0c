"""Tracking accuracy: synthetic subjects with known parameters, and the astronaut portrait.

For each seed: synthesize a monocular subject on the built-in head, run the tracker on its
rendered images only (mediapipe landmarks -> fit; the subject's parameters and cameras are
never shown to it), and compare with the truth (``backend.tracking.evaluate``). The same
fit is also run on ideal detections (the true model landmarks projected by the true camera)
to separate the fitter's error from the detector's. Finally the scikit-image astronaut is
tracked and its landmark reprojection error (against mediapipe) reported.

    python tests/benchmarks/bench_tracking.py --out DIR [--seeds 0 1 2] [--frames 8]
        [--size 384] [--reference-gaussians 80000] [--json]

With ``--refine SUBJECT`` it instead refines an avatar on a tracked subject (made from one
portrait, which is also the training frame) and reports the PSNR within the face (the
convex hull of the tracked landmarks, ``Subject.face_mask``) and within the subject mask; this is the GPU check
that the refinement reproduces the portrait at 512 x 512:

    python tests/benchmarks/bench_tracking.py --refine SUBJECT --out DIR [--iters 10000]
        [--gaussians 100000] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend.data.subject import Subject
from backend.head.registry import load_head_model

KEYS = ("detector_iod_percent", "landmark_px", "landmark_iod_percent", "head_rotation_deg", "jaw_deg", "gaze_deg", "expression_mm", "expression_coeff_rmse")


def synthetic_case(head, root: Path, seed: int, args: argparse.Namespace, config) -> dict:  # type: ignore[no-untyped-def]
    from backend.data.synthetic import SynthConfig, synthesize
    from backend.tracking import track
    from backend.tracking.evaluate import compare_params, exact_fit_input
    from backend.tracking.fit import LandmarkFitter

    t0 = time.perf_counter()
    sub_dir = synthesize(head, root / f"synth_{seed}", SynthConfig(frames=args.frames, size=args.size, seed=seed, reference_gaussians=args.reference_gaussians))
    truth = Subject.load(sub_dir)
    t1 = time.perf_counter()
    result = track([sub_dir / "images"], root / f"tracked_{seed}", head, config)
    t2 = time.perf_counter()
    idx = [f.index for f in result.frames]
    tracked = compare_params(head, truth.params.index(idx), truth.cameras(idx), result.fit.params, result.fit.K, result.fit.world_to_cam)
    tracked["detected_frames"] = float(len(idx))
    tracked["detector_iod_percent"] = detector_error(head, truth, idx, result)
    tracked["vs_mediapipe_iod_percent"] = result.fit.landmark_error()["iod_percent"]
    tracked["track_seconds"] = t2 - t1
    # The fitter alone, on ideal detections.
    fitter = LandmarkFitter(head, config.fit)
    all_t = list(range(truth.num_frames))
    data = exact_fit_input(head, truth.params, truth.cameras(all_t), fitter.points)
    fit = fitter.fit(data)
    exact = compare_params(head, truth.params, truth.cameras(all_t), fit.params, fit.K, fit.world_to_cam)
    return {"seed": seed, "tracked": tracked, "exact_landmarks": exact, "synth_seconds": t1 - t0}


def detector_error(head, truth, idx: list[int], result) -> float:  # type: ignore[no-untyped-def]
    """mediapipe's iBUG targets against the true model landmarks (true camera), % of IOD: the detector alone."""
    from backend.render.camera import project
    from backend.tracking.correspondence import ibug68_from_mediapipe

    with torch.no_grad():
        uv = project(head(truth.params.index(idx)).landmarks, truth.cameras(idx))[0][:, 0].numpy()
    det = np.stack([ibug68_from_mediapipe(f.face.points[:, :2]) for f in result.frames])
    iod = np.linalg.norm(uv[:, 36] - uv[:, 45], axis=-1)
    return float((np.linalg.norm(det - uv, axis=-1) / iod[:, None]).mean() * 100.0)


def astronaut_case(head, root: Path, config) -> dict:  # type: ignore[no-untyped-def]
    import skimage.data

    from backend.tracking import track

    photo = root / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    t0 = time.perf_counter()
    result = track([photo], root / "astronaut", head, config)
    s = result.summary()
    return {
        "landmark_px": s["landmark_error_px"],
        "landmark_iod_percent": s["landmark_error_iod_percent"],
        "inner_landmark_iod_percent": s["inner_landmark_error_iod_percent"],
        "iod_px": float(result.fit.iod_px[0]),
        "seconds": time.perf_counter() - t0,
        "preview": str(result.root / s["previews"][0]),
    }


def refine_case(head, subject_dir: Path, out: Path, args: argparse.Namespace) -> dict:  # type: ignore[no-untyped-def]
    """Initialize and refine on the subject's frame 0; PSNR of that frame within the face and the mask."""
    from backend.refine.config import RefineConfig
    from backend.refine.evaluate import render_view
    from backend.refine.initialize import InitConfig, initialize_on_subject
    from backend.refine.losses import psnr
    from backend.refine.refine import refine

    device = args.device
    subject = Subject.load(subject_dir)
    face = subject.face_mask(0)
    head = head.to(device)
    m = subject.mask(0)
    target = (subject.image(0) * m + subject.background() * (1 - m)).to(device)
    face, m = face.to(device), m.to(device)
    t0 = time.perf_counter()
    avatar = initialize_on_subject(head, subject, InitConfig(gaussians=args.gaussians)).to(device)

    def score(av, params) -> tuple[float, float, torch.Tensor]:  # type: ignore[no-untyped-def]
        img = render_view(av, head, params.to(device), subject.cameras(0).to(device), subject.background().to(device))[0]
        return psnr(img, target, face), psnr(img, target, m), img

    before = score(avatar, subject.params.index([0]))
    t1 = time.perf_counter()
    result = refine(avatar, head, subject, RefineConfig(iterations=args.iters))  # the defaults a user gets
    seconds = time.perf_counter() - t1
    # The portrait is a training frame: the avatar was fitted under its fine-tuned parameters.
    after = score(result.avatar, result.train_params.index([subject.split["train"].index(0)]))
    pic = torch.cat([target, after[2], (after[2] - target).abs() * 4], dim=1).clamp(0, 1)
    Image.fromarray((pic.cpu().numpy() * 255 + 0.5).astype(np.uint8)).save(out / "refined_portrait.png")
    return {
        "size": subject.info.width,
        "gaussians": args.gaussians,
        "iterations": args.iters,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "face_psnr_init": before[0],
        "face_psnr": after[0],
        "mask_psnr_init": before[1],
        "mask_psnr": after[1],
        "refine_seconds": seconds,
        "init_seconds": t1 - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--reference-gaussians", type=int, default=80_000)
    ap.add_argument("--flame", default=None, help="FLAME model (default: the built-in head)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--refine", type=Path, metavar="SUBJECT", help="refine on this tracked subject instead (see above)")
    ap.add_argument("--iters", type=int, default=10_000)
    ap.add_argument("--gaussians", type=int, default=100_000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    head = load_head_model(args.flame)
    if args.refine:
        report = refine_case(head, args.refine, args.out, args)
        (args.out / "bench_tracking_refine.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
        return
    from backend.tracking import TrackConfig
    from backend.tracking.evaluate import mean_of

    config = TrackConfig()
    cases = []
    for seed in args.seeds:
        cases.append(synthetic_case(head, args.out, seed, args, config))
        print(f"seed {seed}: " + ", ".join(f"{k} {cases[-1]['tracked'][k]:.3g}" for k in KEYS), file=sys.stderr)
    report = {
        "head_model": head.name,
        "synthetic": {
            "frames_per_subject": args.frames,
            "size": args.size,
            "cases": cases,
            "tracked_mean": mean_of([c["tracked"] for c in cases]),
            "exact_landmarks_mean": mean_of([c["exact_landmarks"] for c in cases]),
        },
        "astronaut": astronaut_case(head, args.out, config),
    }
    (args.out / "bench_tracking.json").write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report))
        return
    print(f"head model: {head.name}; synthetic {len(cases)} subjects x {args.frames} frames at {args.size}px")
    print(f"{'metric':28s} {'tracked (images)':>18s} {'exact landmarks':>18s}")
    for k in KEYS:
        exact = report["synthetic"]["exact_landmarks_mean"].get(k, float("nan"))
        print(f"{k:28s} {report['synthetic']['tracked_mean'][k]:18.3f} {exact:18.3f}")
    a = report["astronaut"]
    print(f"astronaut: {a['landmark_px']:.2f} px = {a['landmark_iod_percent']:.2f}% IOD (inner 51: {a['inner_landmark_iod_percent']:.2f}%), IOD {a['iod_px']:.1f} px, {a['seconds']:.1f} s")


if __name__ == "__main__":
    main()
