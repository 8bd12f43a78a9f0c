"""Evaluation of the generator on held-out subjects.

- Novel views (multi-view subjects): at each evaluated frame, sources are the first K
  cameras of a fixed nested order (the most frontal camera, then each next camera farthest
  in yaw from those chosen); targets are the cameras that are never a source for any K, so
  every K is scored on the same views.
- Novel expressions (monocular subjects): sources are K training frames of a fixed nested
  choice; targets are the test split (the last 20% of frames: other expressions and poses).
- Ablations: any number of named checkpoints on the same protocol, and "best single source
  per Gaussian" pooling instead of the mean.
- Stage 1 -> Stage 2: test PSNR against refinement iterations, starting from the generator's
  avatar and from the plain surface initialization; the iterations the generator's start
  needs to reach the surface start's final PSNR.
- Timing: one generation (K sources -> local Gaussians) on the device and on the CPU.
- The astronaut portrait (scikit-image's sample image), K = 1: the rendered source view's
  PSNR inside the face (the hull of the 68 projected landmarks), and pictures of the source
  view and of +-30 degree yaw views.

``python tests/benchmarks/generator_eval.py --help`` runs any of them and writes results.json
and generator_eval.md into --out; ``--model-card`` also writes the model card of the
checkpoint with the merged results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backend.data.subject import Subject  # noqa: E402
from backend.gaussians.avatar import Avatar, deform_local  # noqa: E402
from backend.generate.checkpoint import load_generator  # noqa: E402
from backend.generate.data import find_subjects  # noqa: E402
from backend.generate.generate import generate_avatar  # noqa: E402
from backend.generate.model import MAX_SOURCES, Generator, PoolMode  # noqa: E402
from backend.head.model import HeadModel  # noqa: E402
from backend.refine.losses import psnr, ssim  # noqa: E402
from backend.render.camera import Cameras  # noqa: E402
from backend.render.rasterize import render  # noqa: E402

Log = Callable[[str], None]
METRICS = ("psnr", "psnr_mask", "ssim", "ssim_mask")


def camera_yaws(subject: Subject, frame: int = 0) -> np.ndarray:
    """Yaw of every camera's centre about the head (degrees, 0 = in front of the face)."""
    centres = subject.cameras(frame).centers
    return np.degrees(np.arctan2(centres[:, 0].numpy(), centres[:, 2].numpy()))


def nested_camera_order(yaws: np.ndarray, count: int = MAX_SOURCES) -> list[int]:
    """The most frontal camera, then repeatedly the camera farthest in yaw from those chosen."""
    order = [int(np.argmin(np.abs(yaws)))]
    while len(order) < min(count, len(yaws)):
        dist = np.min(np.abs(yaws[:, None] - yaws[order][None]), axis=1)
        dist[order] = -1
        order.append(int(np.argmax(dist)))
    return order


def nested_frames(frames: Sequence[int], count: int = MAX_SOURCES) -> list[int]:
    """A fixed nested choice of ``count`` source frames: first, last, middle, quarter."""
    n = len(frames)
    picks: list[int] = []
    for f in (0.0, 1.0, 0.5, 0.25, 0.75):
        i = frames[min(n - 1, int(round(f * (n - 1))))]
        if i not in picks:
            picks.append(i)
        if len(picks) == count:
            break
    return picks


@torch.no_grad()
def render_frames(avatar: Avatar, head: HeadModel, subject: Subject, views: Sequence[tuple[int, int]]) -> torch.Tensor:
    """[len(views), H, W, 3] renders of ``avatar`` at the given (frame, camera) views."""
    device = head.v_template.device
    frames = [t for t, _ in views]
    params = replace(subject.params.index(frames), shape=avatar.shape, static_offset=avatar.static_offset).to(device)
    verts = head(params).vertices
    av = avatar.to(device)
    splats = deform_local(verts, head.faces, av.binding, av.local)
    cams = subject.cameras(frames)
    idx = torch.arange(len(views))
    cam_ids = torch.tensor([c for _, c in views])
    rig = Cameras(cams.K[idx, cam_ids][:, None], cams.world_to_cam[idx, cam_ids][:, None], cams.width, cams.height).to(device)
    return render(splats, rig, subject.background().to(device)).rgb[:, 0].cpu()


def score_views(avatar: Avatar, head: HeadModel, subject: Subject, views: Sequence[tuple[int, int]], chunk: int = 8) -> list[dict]:
    out = []
    bg = subject.background()
    for i in range(0, len(views), chunk):
        part = list(views[i : i + chunk])
        rgb = render_frames(avatar, head, subject, part)
        for j, (t, c) in enumerate(part):
            m = subject.mask(t, c)
            target = subject.image(t, c) * m + bg * (1 - m)
            out.append({"psnr": psnr(rgb[j], target), "psnr_mask": psnr(rgb[j], target, m), "ssim": float(ssim(rgb[j], target)), "ssim_mask": float(ssim(rgb[j], target, m))})
    return out


def _mean(rows: list[dict]) -> dict:
    return {k: round(float(np.mean([r[k] for r in rows])), 3) for k in METRICS} | {"views": len(rows)}


def novel_views(model: Generator, head: HeadModel, subjects: Sequence[Subject], ks: Sequence[int] = (1, 2, 3, 4), frames_per_subject: int = 2, pool: PoolMode = "mean") -> dict:
    """Scores per K on the cameras no K uses as a source (see the module doc)."""
    rows: dict[int, list[dict]] = {k: [] for k in ks}
    for subject in subjects:
        order = nested_camera_order(camera_yaws(subject), max(ks))
        targets = [c for c in range(subject.num_cameras) if c not in order]
        if not targets:
            continue
        frames = subject.split["test"][:frames_per_subject] or [0]
        for t in frames:
            for k in ks:
                avatar = generate_avatar(model, head, subject, [(t, c) for c in order[:k]], pool=pool)
                rows[k] += score_views(avatar, head, subject, [(t, c) for c in targets])
    return {str(k): _mean(v) for k, v in rows.items() if v}


def novel_expressions(model: Generator, head: HeadModel, subjects: Sequence[Subject], ks: Sequence[int] = (1, 2, 3, 4), pool: PoolMode = "mean") -> dict:
    """Scores per K on each monocular subject's test split, sources from its training frames."""
    rows: dict[int, list[dict]] = {k: [] for k in ks}
    for subject in subjects:
        picks = nested_frames(subject.split["train"], max(ks))
        targets = [(t, 0) for t in subject.split["test"]]
        for k in ks:
            avatar = generate_avatar(model, head, subject, [(t, 0) for t in picks[:k]], pool=pool)
            rows[k] += score_views(avatar, head, subject, targets)
    return {str(k): _mean(v) for k, v in rows.items() if v}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_generation(model: Generator, head: HeadModel, subject: Subject, k: int = MAX_SOURCES, runs: int = 20, warmup: int = 3) -> dict:
    """Milliseconds of one generation from K tracked sources already in memory (median, min)."""
    from backend.generate.generate import subject_sources

    order = nested_camera_order(camera_yaws(subject), k) if subject.num_cameras >= k else [0] * k
    views = [(0, c) for c in order] if subject.num_cameras >= k else [(t, 0) for t in nested_frames(list(range(subject.num_frames)), k)]
    sources = subject_sources(subject, views, head)
    model.eval()
    times = []
    for i in range(warmup + runs):
        _sync(model.device)
        t0 = time.perf_counter()
        model(sources)
        _sync(model.device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    return {"k": k, "size": [subject.info.width, subject.info.height], "device": str(model.device), "median_ms": round(float(np.median(times)), 2), "min_ms": round(float(np.min(times)), 2), "runs": runs}


def _refine_curve(avatar: Avatar, head: HeadModel, subject: Subject, iterations: int, eval_every: int) -> tuple[list[tuple[int, float]], float]:
    """Test PSNR every ``eval_every`` refinement iterations (iteration 0 included), and seconds."""
    from backend.refine.config import RefineConfig
    from backend.refine.evaluate import evaluate
    from backend.refine.refine import refine

    config = RefineConfig(iterations=iterations, checkpoint_every=eval_every, log_every=eval_every)
    curve = [(0, evaluate(avatar, head, subject, "test")["psnr"])]

    def checkpoint(state) -> None:  # type: ignore[no-untyped-def]
        curve.append((state.iteration, evaluate(state.avatar, head, subject, "test")["psnr"]))

    t0 = time.perf_counter()
    refine(avatar, head, subject, config, checkpoint=checkpoint)
    return curve, time.perf_counter() - t0


def _refine_curve_in_child(avatar_bytes: bytes, flame: str | None, subject_root: str, iterations: int, eval_every: int, device: str) -> tuple[list[tuple[int, float]], float]:
    from backend.gaussians.files import avatar_from_bytes
    from backend.head.registry import load_head_model

    head = load_head_model(flame).to(device)
    return _refine_curve(avatar_from_bytes(avatar_bytes), head, Subject.load(subject_root), iterations, eval_every)


def refinement_speedup(
    model: Generator,
    head: HeadModel,
    subject: Subject,
    iterations: int = 10_000,
    eval_every: int = 500,
    k: int = MAX_SOURCES,
    log: Log | None = None,
    parallel: bool = False,
    flame: str | None = None,
) -> dict:
    """Test PSNR against refinement iterations from the generator's avatar and from the
    surface initialization (same layout and count); see the module doc.

    ``parallel`` runs the surface start in a second process on the same device (both
    refinements are launch-bound, so this nearly halves the wall time); ``flame`` is the head
    model that process loads.
    """
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from backend.gaussians.files import avatar_to_bytes
    from backend.refine.initialize import InitConfig, initialize_on_subject

    train = subject.split["train"]
    views = [(t, 0) for t in nested_frames(train, k)]
    starts = {
        "surface": initialize_on_subject(head, subject, InitConfig(gaussians=model.config.gaussians, frame=views[0][0])),
        "generator": generate_avatar(model, head, subject, views),
    }
    curves: dict[str, list[tuple[int, float]]] = {}
    seconds: dict[str, float] = {}
    if parallel:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            device = str(head.v_template.device)
            future = pool.submit(_refine_curve_in_child, avatar_to_bytes(starts["surface"]), flame, str(subject.root), iterations, eval_every, device)
            curves["generator"], seconds["generator"] = _refine_curve(starts["generator"], head, subject, iterations, eval_every)
            curves["surface"], seconds["surface"] = future.result()
    else:
        for name, avatar in starts.items():
            curves[name], seconds[name] = _refine_curve(avatar, head, subject, iterations, eval_every)
    curves = {name: curves[name] for name in starts}
    if log:
        for name, curve in curves.items():
            log(f"refinement from {name}: PSNR {curve[0][1]:.2f} -> {curve[-1][1]:.2f} dB in {iterations} iterations ({seconds[name]:.1f} s)")
    goal = curves["surface"][-1][1]
    reached = next((it for it, p in curves["generator"] if p >= goal), None)
    return {
        "subject": subject.info.name,
        "iterations": iterations,
        "goal_psnr": round(goal, 3),
        "generator_iterations_to_goal": reached,
        "fraction": None if reached is None else round(reached / iterations, 3),
        "curves": {k: [[i, round(p, 3)] for i, p in v] for k, v in curves.items()},
        "seconds_with_evaluation": {k: round(v, 1) for k, v in seconds.items()},
        "parallel": parallel,
    }


def yaw_camera(cams: Cameras, index: int, degrees: float, centre: torch.Tensor) -> Cameras:
    """Camera ``index`` of ``cams`` orbited by ``degrees`` of yaw about the vertical axis
    through ``centre``, with the same intrinsics (the framing at 0 degrees is unchanged)."""
    a = math.radians(-degrees)  # orbiting the camera by +a turns the world by -a
    rot = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]], dtype=cams.world_to_cam.dtype)
    turn = torch.eye(4, dtype=rot.dtype)
    turn[:3, :3] = rot
    turn[:3, 3] = centre.to(rot) - rot @ centre.to(rot)
    w2c = cams.world_to_cam[index] @ turn
    return Cameras(cams.K[index : index + 1], w2c[None], cams.width, cams.height)


@torch.no_grad()
def face_mask(head: HeadModel, subject: Subject, avatar: Avatar, t: int = 0, c: int = 0) -> torch.Tensor:
    """[H, W, 1] mask of the convex hull of the 68 projected landmarks (the face)."""
    from backend.render.camera import project

    params = replace(subject.params.index([t]), shape=avatar.shape).to(head.v_template.device)
    lmk = head(params).landmarks[0].cpu()
    cams = subject.cameras(t)
    xy, _ = project(lmk, Cameras(cams.K[c : c + 1], cams.world_to_cam[c : c + 1], cams.width, cams.height))
    pts = xy[0].numpy()
    hull = _convex_hull(pts)
    im = Image.new("L", (cams.width, cams.height), 0)
    ImageDraw.Draw(im).polygon([tuple(map(float, p)) for p in hull], fill=255)
    return torch.from_numpy(np.asarray(im, np.float32) / 255.0)[..., None]


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Monotone-chain convex hull of [P, 2] points, counter-clockwise."""
    pts = sorted(map(tuple, points.tolist()))

    def cross(o, a, b):  # type: ignore[no-untyped-def]
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])


def _png(rgb: torch.Tensor, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgb.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)).save(path)
    return str(path)


@torch.no_grad()
def portrait_views(model: Generator, head: HeadModel, subject: Subject, figures: Path, name: str = "astronaut", yaws: Sequence[float] = (-30.0, 30.0)) -> dict:
    """K = 1 from frame 0 of ``subject``: face-mask PSNR of the source view, and PNGs of the
    source view (ground truth | render) and of yawed views."""
    avatar = generate_avatar(model, head, subject, [(0, 0)])
    device = head.v_template.device
    params = replace(subject.params.index([0]), shape=avatar.shape).to(device)
    verts = head(params).vertices
    av = avatar.to(device)
    splats = deform_local(verts, head.faces, av.binding, av.local)
    cams = subject.cameras(0)
    bg = subject.background()
    src = render(splats, Cameras(cams.K[:1], cams.world_to_cam[:1], cams.width, cams.height).to(device), bg.to(device)).rgb[0, 0].cpu()
    m = subject.mask(0, 0)
    target = subject.image(0, 0) * m + bg * (1 - m)
    face = face_mask(head, subject, avatar)
    result = {
        "face_psnr": round(psnr(src, target, face), 3),
        "mask_psnr": round(psnr(src, target, m), 3),
        "seen_share": round(avatar.meta["seen_share"], 3),
        "pictures": {"source": _png(torch.cat([target, src], 1), figures / f"{name}_source.png")},
    }
    centre = verts[0].mean(0).cpu()
    for yaw in yaws:
        cam = yaw_camera(cams, 0, yaw, centre).to(device)
        rgb = render(splats, cam, bg.to(device)).rgb[0, 0].cpu()
        result["pictures"][f"yaw{yaw:+.0f}"] = _png(rgb, figures / f"{name}_yaw{yaw:+.0f}.png")
    return result


def astronaut_subject(out: Path, head: HeadModel) -> Subject:
    """Track scikit-image's astronaut portrait (shipped with scikit-image) into a subject."""
    from backend.generate.generate import track_portraits

    try:
        from skimage import data
    except ImportError as exc:
        raise RuntimeError("the astronaut portrait needs scikit-image") from exc
    out.mkdir(parents=True, exist_ok=True)
    path = out / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return track_portraits([path], out / "astronaut_subject", head)


def _table(title: str, rows: dict[str, dict], key_name: str) -> list[str]:
    lines = [f"### {title}", "", f"| {key_name} | PSNR | PSNR (mask) | SSIM | SSIM (mask) | views |", "|---|---|---|---|---|---|"]
    for key, r in rows.items():
        lines.append(f"| {key} | {r['psnr']:.2f} | {r['psnr_mask']:.2f} | {r['ssim']:.4f} | {r['ssim_mask']:.4f} | {r['views']} |")
    return lines + [""]


def markdown(results: dict) -> str:
    """The BENCHMARKS.md section for ``results``."""
    lines = ["## Stage 1 generator", ""]
    if "checkpoint_info" in results:
        info = results["checkpoint_info"]
        lines += [f"Checkpoint: phase {info.get('phase')}, {info.get('steps_done')} steps, {info.get('seconds')} s on {info.get('device')}.", ""]
    if "novel_views" in results:
        lines += _table("Novel views (held-out multi-view identities)", results["novel_views"], "K")
    if "novel_expressions" in results:
        lines += _table("Novel expressions (held-out monocular identities, test split)", results["novel_expressions"], "K")
    nv = results.get("novel_views", {})
    if "1" in nv and "4" in nv:
        gain = nv["4"]["psnr"] - nv["1"]["psnr"]
        lines += [f"K = 4 vs K = 1 on novel views: {gain:+.2f} dB (target >= +1 dB).", ""]
    for name, abl in results.get("ablations", {}).items():
        if "novel_views" in abl:
            lines += _table(f"Ablation {name}: novel views", abl["novel_views"], "K")
        if "novel_expressions" in abl:
            lines += _table(f"Ablation {name}: novel expressions", abl["novel_expressions"], "K")
    if "refinement" in results:
        r = results["refinement"]
        lines += [
            "### Stage 1 -> Stage 2",
            "",
            f"Subject {r['subject']}: the surface initialization reaches {r['goal_psnr']:.2f} dB after {r['iterations']} iterations; "
            f"from the generator's avatar refinement reaches it after {r['generator_iterations_to_goal']} iterations "
            f"(fraction {r['fraction']}; target <= 1/3).",
            "",
            "| iteration | " + " | ".join(r["curves"]) + " |",
            "|---|" + "---|" * len(r["curves"]),
        ]
        its = [i for i, _ in r["curves"]["surface"]]
        for j, it in enumerate(its):
            lines.append(f"| {it} | " + " | ".join(f"{v[j][1]:.2f}" if j < len(v) else "" for v in r["curves"].values()) + " |")
        lines.append("")
    for t in results.get("timing", []):
        lines.append(f"Generation, K = {t['k']} at {t['size'][0]}x{t['size'][1]} on {t['device']}: median {t['median_ms']} ms (min {t['min_ms']} ms, {t['runs']} runs).")
    if results.get("timing"):
        lines.append("")
    if "portrait" in results:
        p = results["portrait"]
        lines += [f"Astronaut portrait, K = 1: source-view face PSNR {p['face_psnr']:.2f} dB (target >= 22 dB), person-mask PSNR {p['mask_psnr']:.2f} dB.", ""]
    return "\n".join(lines) + "\n"


def model_card(data: dict, results: dict, file_bytes: int | None = None) -> str:
    """MODEL_CARD.md for a generator file's dict (``read_generator_file``) and evaluation results."""
    info = json.loads(data.get("info", "{}") or "{}")
    config = json.loads(data["config"])
    runs = [r for r in (info.get("init"), info) if r]

    def data_line(r: dict) -> str:
        kind = "monocular" if r.get("phase") == 1 else "multi-view"
        frames = "/".join(str(x) for x in r.get("frames_per_subject", [])) or "?"
        cams = "/".join(str(x) for x in r.get("cameras_per_subject", [])) or "?"
        w, h = r.get("image_size", ["?", "?"])
        return f"- phase {r.get('phase')}: {r.get('subjects')} synthetic {kind} identities, {frames} frames x {cams} cameras each, {w}x{h} px"

    def train_line(r: dict) -> str:
        t = r.get("train_config", {})
        extra = f", L2-SP {t.get('l2sp')}, cross-time {t.get('cross_time')}" if r.get("phase") == 2 else ""
        return (
            f"- phase {r.get('phase')}: {r.get('steps_done')} steps of batch {t.get('batch')} x {t.get('targets')} targets "
            f"(x {r.get('world_size', 1)} processes), lr {t.get('lr')}{extra}, {r.get('seconds')} s on {r.get('device')}"
        )

    size = f", file {file_bytes / 1e6:.1f} MB" if file_bytes else ""
    lines = [
        "# Model card: SpatialAvatar Stage 1 generator",
        "",
        f"- Network: {config['gaussians']} Gaussians, {info.get('parameters', '?')} parameters, encoder input {config['image_size']} px, "
        f"backbone {config['backbone']} (trained from scratch unless named), fp16 weights{size}.",
        f"- Head model: {data['head_name']} ({data['head_fingerprint']}); the generator refuses any other.",
        "- Inputs: 1 to 4 portraits with tracked FLAME parameters and cameras; output: an avatar .npz (the start of refinement).",
        "",
        "## Data",
        "",
        *[data_line(r) for r in runs],
        "- Procedural identities of the built-in head (backend/data/synthetic.py): no real people; held-out identities for evaluation.",
        "",
        "## Training",
        "",
        *[train_line(r) for r in runs],
        "- Loss: 0.8 L1 + 0.2 D-SSIM on rendered target views, anti-spike hinges; K uniform in 1..4.",
        "",
        "## Evaluation",
        "",
        markdown(results).replace("## Stage 1 generator\n\n", ""),
        "## Limits",
        "",
        "- Trained on synthetic heads only: on photos the colours come from the sources (the appearance path) and the geometry from",
        "  the tracked head; hair and shoulders beyond the head mesh are not modelled; SH degree 0 (no view-dependent colour).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tests/benchmarks/generator_eval.py", description="Evaluate a Stage 1 generator (see the module doc).")
    ap.add_argument("--checkpoint", type=Path, help="generator file or run folder (default: the shipped weights)")
    ap.add_argument("--flame", help="FLAME model (default: $SPATIALAVATAR_FLAME, else the built-in head)")
    ap.add_argument("--mv", nargs="*", type=Path, default=[], help="held-out multi-view subjects (novel views)")
    ap.add_argument("--mono", nargs="*", type=Path, default=[], help="held-out monocular subjects (novel expressions)")
    ap.add_argument("--max-subjects", type=int, default=8)
    ap.add_argument("--frames-per-subject", type=int, default=2)
    ap.add_argument("--ablation", action="append", default=[], metavar="NAME=PATH", help="another checkpoint on the same protocol")
    ap.add_argument("--best-pool", action="store_true", help="also score 'best single source per Gaussian' pooling")
    ap.add_argument("--refine-subject", type=Path, help="a held-out monocular subject for the Stage 1 -> Stage 2 comparison")
    ap.add_argument("--refine-iters", type=int, default=10_000)
    ap.add_argument("--refine-every", type=int, default=500)
    ap.add_argument("--refine-parallel", action="store_true", help="run the two refinements in two processes at once")
    ap.add_argument("--timing", action="store_true", help="time K = 4 generation on the device and on the CPU")
    ap.add_argument("--cpu-runs", type=int, default=3)
    ap.add_argument("--astronaut", action="store_true", help="track scikit-image's astronaut and render K = 1 views (needs the tracker)")
    ap.add_argument("--results", nargs="*", type=Path, default=[], help="results.json files of earlier evaluations to merge in")
    ap.add_argument("--model-card", type=Path, metavar="MD", help="write the model card of --checkpoint with the merged results")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from backend.head.registry import load_head_model

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device == "cuda" else "cpu")
    head_cpu = load_head_model(args.flame)
    head = HeadModel(head_cpu.data).to(device)

    def load(path: Path | None) -> tuple[Generator, dict]:
        if path is not None and path.is_dir():
            path = path / "generator.pt"
        model, info = load_generator(path, head_cpu)
        return model.to(device).eval(), info

    model, info = load(args.checkpoint)
    results: dict = {"checkpoint": str(args.checkpoint), "checkpoint_info": {k: info.get(k) for k in ("phase", "steps_done", "seconds", "device", "subjects")}}
    mv = [Subject.load(p) for p in find_subjects(args.mv)[: args.max_subjects]] if args.mv else []
    mono = [Subject.load(p) for p in find_subjects(args.mono)[: args.max_subjects]] if args.mono else []
    args.out.mkdir(parents=True, exist_ok=True)

    def protocol(m: Generator, pool: PoolMode = "mean") -> dict:
        r: dict = {}
        if mv:
            r["novel_views"] = novel_views(m, head, mv, frames_per_subject=args.frames_per_subject, pool=pool)
        if mono:
            r["novel_expressions"] = novel_expressions(m, head, mono, pool=pool)
        return r

    # Timing first, while nothing else this command starts competes for the device.
    if args.timing:
        subject = (mv or mono or [None])[0]
        if subject is not None:
            results["timing"] = [time_generation(model, head, subject)]
            if device.type == "cuda":
                cpu_model, _ = load_generator(args.checkpoint if args.checkpoint is None or args.checkpoint.is_file() else args.checkpoint / "generator.pt", head_cpu)
                results["timing"].append(time_generation(cpu_model, head_cpu, subject, runs=args.cpu_runs, warmup=1))
            log(f"timing: {results['timing']}")
    t0 = time.perf_counter()
    results |= protocol(model)
    log(f"main checkpoint scored in {time.perf_counter() - t0:.1f} s: {json.dumps({k: results[k] for k in ('novel_views', 'novel_expressions') if k in results})}")
    results["ablations"] = {}
    if args.best_pool:
        results["ablations"]["best single source per Gaussian"] = protocol(model, "best")
    for item in args.ablation:
        name, _, path = item.partition("=")
        if not path:
            ap.error(f"--ablation needs NAME=PATH, got {item!r}")
        m, _ = load(Path(path))
        results["ablations"][name] = protocol(m)
        log(f"ablation {name} scored")
    if args.refine_subject:
        results["refinement"] = refinement_speedup(
            model, head, Subject.load(args.refine_subject), args.refine_iters, args.refine_every, log=log, parallel=args.refine_parallel, flame=args.flame
        )
    if args.astronaut:
        subject = astronaut_subject(args.out / "astronaut", head_cpu)
        results["portrait"] = portrait_views(model, head, subject, args.out / "figures")
        log(f"astronaut: {results['portrait']}")
    for path in args.results:
        earlier = json.loads(path.read_text())
        ablations = earlier.get("ablations", {}) | results.get("ablations", {})
        results = earlier | {k: v for k, v in results.items() if v not in ({}, None, [])}
        results["ablations"] = ablations
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if args.model_card:
        from backend.generate.checkpoint import DEFAULT_CHECKPOINT, read_generator_file

        ckpt = args.checkpoint or DEFAULT_CHECKPOINT
        ckpt = ckpt / "generator.pt" if ckpt.is_dir() else ckpt
        args.model_card.parent.mkdir(parents=True, exist_ok=True)
        args.model_card.write_text(model_card(read_generator_file(ckpt), results, ckpt.stat().st_size))
        log(f"wrote {args.model_card}")
    (args.out / "generator_eval.md").write_text(markdown(results))
    log(f"wrote {args.out / 'results.json'} and {args.out / 'generator_eval.md'}")
    return 0


def _main_with_clear_errors() -> int:
    from backend.wire.errors import SpatialAvatarError

    try:
        return main()
    except SpatialAvatarError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_main_with_clear_errors())
