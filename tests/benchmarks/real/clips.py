"""The clip stage: every method on one tracked clip, scored on its held-out frames.

Writes ``results/<clip>/scores.json`` (one entry per method, merged with earlier runs so a
method can be rerun alone) and pictures: ``heldout_<method>.png`` (three held-out frames,
the most turned head among them) and ``turntable_<method>.png`` (+- the protocol's yaw).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from backend.data.subject import Subject
from backend.generate.personalize import Personalization, personalize
from backend.gaussians.avatar import Avatar, deform
from backend.head.model import HeadModel
from backend.head.params import FlameParams
from backend.refine.config import RefineConfig, preset
from backend.refine.evaluate import evaluate, orbit_holes, render_view
from backend.refine.initialize import InitConfig, initialize_on_subject
from backend.render.animation import to_uint8
from backend.render.camera import HeadShot
from backend.render.rasterize import render
from tests.benchmarks.real.data import Layout
from tests.benchmarks.real.protocol import Protocol, lever_of, starts_from_generator
from tests.benchmarks.real.tracking import unpack

Log = Callable[[str], None]
PICTURE_SIDE = 256  # each tile of the pictures, pixels
TURNTABLE_VIEWS = 7


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def head_turn_deg(params: FlameParams, world_to_cam: torch.Tensor) -> np.ndarray:
    """[B] angle between the face's forward axis (+z of the head, after the global and neck
    rotations) and the direction to the camera, degrees. world_to_cam: [B, 4, 4]."""
    from smplx.lbs import batch_rodrigues

    forward = batch_rodrigues(params.rotation.float()) @ batch_rodrigues(params.neck_pose.float()) @ torch.tensor([0.0, 0.0, 1.0])
    in_cam = (world_to_cam[:, :3, :3].float() @ forward[..., None])[..., 0]
    return torch.rad2deg(torch.arccos((-in_cam[:, 2]).clamp(-1, 1))).numpy()


def picture_frames(subject: Subject) -> list[int]:
    """Three held-out frames: the first, the middle and the most turned head (a distinct one)."""
    test = subject.split["test"]
    turn = head_turn_deg(subject.params.index(test), subject.world_to_cam[test, 0])
    turned = test[int(turn.argmax())]
    picks = [test[0], test[len(test) // 2]]
    return [t for t in picks if t != turned][:2] + [turned]


def _tile(rgb: torch.Tensor) -> np.ndarray:
    img = Image.fromarray(to_uint8(rgb))
    return np.asarray(img.resize((PICTURE_SIDE, PICTURE_SIDE), Image.Resampling.LANCZOS))


def ground_truth_row(subject: Subject, frames: list[int]) -> list[np.ndarray]:
    bg = subject.background()
    return [_tile(subject.image(t) * subject.mask(t) + bg * (1 - subject.mask(t))) for t in frames]


@torch.no_grad()
def heldout_tiles(avatar: Avatar, head: HeadModel, subject: Subject, frames: list[int]) -> list[np.ndarray]:
    device = head.v_template.device
    bg = subject.background().to(device)
    return [_tile(render_view(avatar, head, subject.params.index([t]).to(device), subject.cameras(t).to(device), bg)[0].cpu()) for t in frames]


@torch.no_grad()
def turntable_tiles(avatar: Avatar, head: HeadModel, params: FlameParams, yaw_deg: float, views: int = TURNTABLE_VIEWS) -> list[np.ndarray]:
    """The head of one frame's expression (global rotation, neck and translation zeroed)
    seen from ``views`` yaws spread over [-yaw_deg, yaw_deg], over white."""
    device = head.v_template.device
    p = params.to(device)
    p.rotation, p.neck_pose, p.translation = (torch.zeros_like(x) for x in (p.rotation, p.neck_pose, p.translation))
    centre = head(p, check=False).vertices[0].mean(dim=0)
    cams = HeadShot().cameras(torch.linspace(-yaw_deg, yaw_deg, views), torch.tensor(5.0), PICTURE_SIDE, tuple(centre.tolist()))
    rgb = render(deform(avatar.to(device), head, p).frame(0), cams.to(device), torch.ones(3, device=device)).rgb
    return [to_uint8(x.cpu()) for x in rgb]


def save_row(tiles: list[np.ndarray], path: Path) -> None:
    save_grid([tiles], path)


def save_grid(rows: list[list[np.ndarray]], path: Path) -> None:
    """Rows of equal-sized tiles, short rows padded with white."""
    width = max(len(r) for r in rows)
    blank = np.full_like(rows[0][0], 255)
    Image.fromarray(np.concatenate([np.concatenate(r + [blank] * (width - len(r)), axis=1) for r in rows], axis=0)).save(path)


def open_subject(name: str, layout: Layout) -> Subject:
    """The subject ``name`` of the data folder, unpacked from its pack when only that travelled."""
    folder = layout.subjects / name
    if not (folder / "subject.json").is_file():
        pack = layout.packs / f"{name}.tar"
        if not pack.is_file():
            raise SystemExit(f"no subject '{name}': neither {folder} nor {pack} exists (track and pack it first)")
        unpack(pack, folder)
    return Subject.load(folder)


def _starts(methods: list[str], head: HeadModel, subject: Subject, protocol: Protocol, log: Log) -> dict[InitConfig | str, tuple[Avatar, float]]:
    """The starting avatars the methods need (keyed by ``_start_key``), with the seconds each took."""
    from backend.generate.checkpoint import load_generator
    from backend.generate.generate import generate_avatar

    starts: dict[InitConfig | str, tuple[Avatar, float]] = {}
    device = head.v_template.device
    for method in methods:
        key = _start_key(method, protocol)
        if key in starts:
            continue
        t0 = time.perf_counter()
        if isinstance(key, str):
            model, _ = load_generator(protocol.generator, head)
            avatar = generate_avatar(model.to(device), head, subject, [(0, 0)], gaussians=_generated_count(method))
            _sync(device)
            log(f"  generated {avatar.count} Gaussians in {avatar.meta['generate_ms']:.1f} ms (network)")
        else:
            avatar = initialize_on_subject(head, subject, key)
        starts[key] = (avatar, time.perf_counter() - t0)
    return starts


def init_config(method: str, protocol: Protocol) -> InitConfig:
    """The surface start a method refines from: the protocol's, with a lever's changes."""
    config = InitConfig(gaussians=protocol.gaussians)
    lever = lever_of(method)
    if lever is None or not lever.init:
        return config
    changes = dict(lever.init)
    if "surface" in changes:
        changes["surface"] = replace(config.surface, **changes["surface"])
    return replace(config, **changes)


def _generated_count(method: str) -> int | None:
    """The Gaussian count a generator method's lever carries the generated head onto (None: the network's)."""
    lever = lever_of(method)
    return None if lever is None else lever.init.get("gaussians")


def _start_key(method: str, protocol: Protocol) -> InitConfig | str:
    if not starts_from_generator(method):
        return init_config(method, protocol)
    count = _generated_count(method)
    return "generator" if count is None else f"generator@{count}"


def _personalize(generated: Avatar, head: HeadModel, subject: Subject) -> tuple[Avatar, float]:
    """The generated avatar personalized on its source (frame 0), and the seconds it took."""
    device = head.v_template.device
    _sync(device)
    t0 = time.perf_counter()
    avatar = personalize(generated, head, subject, [(0, 0)])
    _sync(device)
    return avatar, time.perf_counter() - t0


def refine_config(method: str, protocol: Protocol) -> RefineConfig:
    """The configuration a refining method runs with: its preset at the protocol's budget,
    with a lever's changes applied."""
    lever = lever_of(method)
    name = "ours" if method.startswith("ours") else method
    config = preset(name, iterations=protocol.iterations, log_every=max(protocol.iterations // 10, 1), checkpoint_every=0)
    if lever is None:
        return config
    d = config.to_dict()
    for key, value in lever.refine.items():
        d[key] = {**(d[key] or {}), **value} if isinstance(value, dict) else value
    return RefineConfig.from_dict(d)


def _photometric(method: str) -> dict | None:
    """The PhotometricTracking fields a method's lever replaces (None: no photometric tracking)."""
    lever = lever_of(method)
    return None if lever is None else lever.photometric


def _track_photometric(head: HeadModel, subject: Subject, overrides: dict, log: Log) -> tuple[Subject, float, dict]:
    """The clip photometrically tracked, the seconds it took, and how far the parameters
    moved (mean absolute change per field, test frames apart)."""
    from backend.refine.photometric_tracking import PhotometricTracking, track_photometric

    device = head.v_template.device
    _sync(device)
    t0 = time.perf_counter()
    tracked = track_photometric(head, subject, PhotometricTracking(**overrides))
    _sync(device)
    seconds = time.perf_counter() - t0
    change = {}
    for split in ("train", "test"):
        idx = subject.split[split]
        for name in ("expr", "rotation", "jaw_pose", "translation"):
            change[f"{split}_{name}"] = float((getattr(tracked.params, name)[idx] - getattr(subject.params, name)[idx]).abs().mean())
    log(f"  photometric tracking: {seconds:.1f} s; mean change {change}")
    return tracked, seconds, change


def _refine(start: Avatar, head: HeadModel, subject: Subject, config: RefineConfig) -> tuple[object, float]:
    from backend.refine.refine import refine

    device = head.v_template.device
    _sync(device)
    t0 = time.perf_counter()
    result = refine(start, head, subject, config)
    _sync(device)
    return result, time.perf_counter() - t0


def score(
    avatar: Avatar,
    start: Avatar | None,
    head: HeadModel,
    subject: Subject,
    protocol: Protocol,
    train_params: FlameParams | None,
    worst_train_png: Path | None = None,
    train_exposure: torch.Tensor | None = None,
) -> dict:
    """Held-out scores, training-frame PSNR (every n-th training frame, under the fine-tuned
    parameters and the learnt colour gains [T, 3] when given) and turntable holes against
    the start (None: not a refinement).
    ``worst_train_png``: where the scored training view with the lowest PSNR is drawn (truth
    beside render)."""
    test = evaluate(avatar, head, subject, "test")
    train = subject.split["train"]
    picked = list(range(0, len(train), protocol.train_every))
    params = train_params.index(picked) if train_params is not None else subject.params.index([train[i] for i in picked])
    gains = None if train_exposure is None else train_exposure[picked]
    train_scores = evaluate(avatar, head, subject, frames=[train[i] for i in picked], params=params, worst_view_png=worst_train_png, exposure=gains)
    holes = None if start is None else orbit_holes(avatar, start, head, subject.params.index(subject.split["test"][:1]))
    return {
        **{k: test[k] for k in ("psnr", "psnr_mask", "psnr_face", "ssim", "ssim_mask", "ssim_face", "lpips", "lpips_note", "spike_share", "colour_out_share", "gaussians")},
        "train_psnr": train_scores["psnr"],
        "train_psnr_mask": train_scores["psnr_mask"],
        "train_psnr_face": train_scores["psnr_face"],
        "orbit_holes": holes,
    }


def run_clip(name: str, layout: Layout, protocol: Protocol, methods: list[str], log: Log, shared: int = 1, tag: str = "") -> dict:
    """Run ``methods`` on one clip; returns (and merges into) its scores.json. ``shared``:
    how many runs share the GPU at once (recorded beside the wall times); ``tag``: results
    are stored as METHOD@TAG (an experiment beside the methods' own results)."""
    from backend.head.registry import load_head_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = layout.results / name
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scores.json"
    report = json.loads(path.read_text()) if path.is_file() else {"clip": name, "methods": {}}
    head = load_head_model(layout.head).to(device)
    subject = open_subject(name, layout)
    report["subject"] = {"frames": subject.num_frames, "train": len(subject.split["train"]), "test": len(subject.split["test"]), "size": subject.info.width}
    frames = picture_frames(subject)
    report["picture_frames"] = frames
    report["picture_turn_deg"] = [float(x) for x in head_turn_deg(subject.params.index(frames), subject.world_to_cam[frames, 0])]
    save_row(ground_truth_row(subject, frames), out / "heldout_truth.png")
    starts = _starts([m for m in methods if _photometric(m) is None], head, subject, protocol, log)
    tracked: dict[str, tuple[Subject, float, dict]] = {}  # by the tracking's settings
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    for method in methods:
        on, tracking = subject, None
        overrides = _photometric(method)
        if overrides is not None:
            key = json.dumps(overrides, sort_keys=True)
            if key not in tracked:
                tracked[key] = _track_photometric(head, subject, overrides, log)
            tracking = tracked[key]
            on = tracking[0]
        if method == "generator":
            avatar, start_avatar = starts["generator"][0], None
            entry: dict = {"wall_seconds": starts["generator"][1], "iterations": 0}
            train_params, train_exposure = None, None
        elif method == "personalized":
            avatar, wall = _personalize(starts["generator"][0], head, subject)
            start_avatar, train_params, train_exposure = None, None, None
            entry = {"wall_seconds": wall, "start_seconds": starts["generator"][1], "iterations": Personalization().iterations}
        else:
            start_name = _start_key(method, protocol)
            if on is subject:
                start_avatar, start_seconds = starts[start_name]
            else:
                start_avatar, start_seconds = _starts([method], head, on, protocol, log)[start_name]
            config = refine_config(method, protocol)
            result, wall = _refine(start_avatar, head, on, config)
            avatar, train_params, train_exposure = result.avatar, result.train_params, result.exposure  # type: ignore[attr-defined]
            entry = {"wall_seconds": wall, "start_seconds": start_seconds, "iterations": config.iterations}
            if tracking is not None:
                entry["tracking_seconds"], entry["tracking_change"] = tracking[1], tracking[2]
        stored = f"{method}@{tag}" if tag else method
        entry |= score(avatar, start_avatar, head, on, protocol, train_params, out / f"train_worst_{stored}.png", train_exposure)
        entry |= {"device": device_name, "date": time.strftime("%Y-%m-%d")}
        if shared > 1:
            entry["concurrent_runs"] = shared
        if protocol.generator is not None:
            entry["generator"] = protocol.generator
        report["methods"][stored] = entry
        save_row(heldout_tiles(avatar, head, on, frames), out / f"heldout_{stored}.png")
        save_row(turntable_tiles(avatar, head, on.params.index([on.split["test"][0]]), protocol.turntable_deg), out / f"turntable_{stored}.png")
        path.write_text(json.dumps(report, indent=1))
        log(f"  {stored}: held-out PSNR {entry['psnr']:.2f} / mask {entry['psnr_mask']:.2f} / face {entry['psnr_face']:.2f} dB, train {entry['train_psnr']:.2f} dB, {entry['wall_seconds']:.1f} s")
    return report
