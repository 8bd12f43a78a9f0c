"""The ``spatialavatar`` command line: a thin shell over the backend's rooms.

Every command takes ``--json`` for a machine-readable summary on stdout; progress bars go
to stderr. Errors print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence, get_args

import torch

from backend import __version__
from backend.data.synthetic import SynthConfig
from backend.demo.pipeline import DemoConfig
from backend.generate.model import PoolMode
from backend.generate.outline import OutlineFit
from backend.generate.personalize import Personalization, personalize
from backend.head.registry import SHIPPED_HEADS
from backend.refine.config import RefineConfig
from backend.refine.initialize import InitConfig
from backend.server.config import ServiceConfig
from backend.tracking.crop import CropConfig
from backend.tracking.video import FrameRange
from backend.wire.environment import DEFAULT_ENDPOINT
from backend.wire.errors import SpatialAvatarError
from backend.wire.operations import REFINE_PRESETS, Generate


def _progress(desc: str, enabled: bool, unit: str = "frame") -> Callable[[int, int], None]:
    """A tqdm bar on stderr driven by (done, total) callbacks."""
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if not enabled:
            return
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=desc, file=sys.stderr, unit=unit, leave=False)
        bar["bar"].update(done - bar["bar"].n)
        if done >= total:
            bar.pop("bar").close()

    return update


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SpatialAvatarError("--device cuda was asked for, but no CUDA device is available; use --device cpu")
    return name


def _head(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from backend.head.registry import load_head_model

    return load_head_model(args.flame)


def cmd_info(args: argparse.Namespace) -> dict:
    from backend.head.registry import fingerprint, resolve_flame_path
    from backend.render.gsplat_backend import gsplat_available

    head = _head(args)
    return {
        "version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "rasterizer": "gsplat (CUDA)" if gsplat_available() else "pure-torch reference (CPU)",
        "head_model": {
            "name": head.name,
            "source": resolve_flame_path(args.flame),
            "fingerprint": fingerprint(head.data),
            "vertices": head.num_vertices,
            "faces": head.num_faces,
            "shape_components": head.n_shape,
            "expression_components": head.n_expr,
            "expression_names": list(head.expr_names),
            "sizes_m": {k: round(v, 4) for k, v in head.sizes().items()},
        },
    }


def _flags(args: argparse.Namespace, fields: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Config overrides from the flags that set them (field -> flag, e.g. "frames" -> "--frames"),
    and the flag names a failed check speaks of."""
    return {field: getattr(args, flag.removeprefix("--").replace("-", "_")) for field, flag in fields.items()}, fields


def cmd_synth(args: argparse.Namespace) -> dict:
    from backend.data.synthetic import synthesize

    config = SynthConfig().with_overrides(
        *_flags(args, {"frames": "--frames", "views": "--views", "size": "--size", "seed": "--seed", "reference_gaussians": "--reference-gaussians", "looks": "--looks"})
    )
    t0 = time.perf_counter()
    root = synthesize(_head(args).to(_device(args.device)), args.out, config, progress=_progress("synth", not args.json))
    return {"subject": str(root), "frames": config.frames, "views": config.views, "size": config.size, "seconds": round(time.perf_counter() - t0, 2)}


def cmd_init(args: argparse.Namespace) -> dict:
    from backend.data.subject import Subject
    from backend.gaussians.files import save_avatar
    from backend.head.registry import check_fits
    from backend.refine.initialize import initialize_on_subject

    subject = Subject.load(args.subject)
    head = _head(args)
    if subject.info.head_model != head.name:
        raise SpatialAvatarError(f"subject {args.subject} was tracked with head model '{subject.info.head_model}', the loaded one is '{head.name}'")
    config = InitConfig().with_overrides(*_flags(args, {"gaussians": "--gaussians", "frame": "--frame", "camera": "--camera"}))
    avatar = initialize_on_subject(head, subject, config)
    check_fits(head.data, avatar.head_name, avatar.head_fingerprint)
    save_avatar(avatar, args.out)
    return {"avatar": str(args.out), "gaussians": avatar.count, "visible_share": avatar.meta["visible_share"]}


def _load_avatar(args: argparse.Namespace, device: str):  # type: ignore[no-untyped-def]
    head = _head(args)
    return _avatar_for(args.avatar, head).to(device), head.to(device)


def _avatar_for(path: Path, head):  # type: ignore[no-untyped-def]
    """The avatar file at ``path``, refused unless it was made for ``head``."""
    from backend.gaussians.files import check_fits_head, load_avatar

    avatar = load_avatar(path)
    check_fits_head(avatar, head.data, str(path))
    return avatar


def cmd_render(args: argparse.Namespace) -> dict:
    from backend.head.params import FlameParams
    from backend.render.animation import ViewConfig, head_framing, render_animation, view_cameras, write_frames

    device = _device(args.device)
    avatar, head = _load_avatar(args, device)
    params = FlameParams.load(args.anim)
    params.check_head(head.name, head.expr_names, str(args.anim))
    view = ViewConfig(size=args.size, turntable_degrees=args.turntable)
    cams = view_cameras(view, params.batch_size, head_framing(head, params.to(device)))
    t0 = time.perf_counter()
    frames = render_animation(avatar, head, params, cams, torch.tensor(view.background))
    paths = write_frames(frames, Path(args.out), params.batch_size, _progress("render", not args.json))
    seconds = time.perf_counter() - t0
    return {"frames": len(paths), "out": str(args.out), "seconds": round(seconds, 2), "contact_sheet": str(Path(args.out) / "contact_sheet.png")}


LPIPS_WEIGHTS_HELP = (
    "folder holding LPIPS's weight files, looked in first: alexnet-owt-7be5be79.pth (torchvision's AlexNet; "
    "otherwise torch's hub cache) and alex.pth (the lpips package's v0.1 weights; otherwise that package)"
)


def _check_lpips_folder(folder: Path | None) -> None:
    if folder is not None and not folder.is_dir():
        raise SpatialAvatarError(f"--lpips-weights {folder}: not a folder")


def cmd_refine(args: argparse.Namespace) -> dict:
    """Stage 2 on a subject; Ctrl-C writes a checkpoint that --resume continues from."""
    import signal

    from tqdm import tqdm

    from backend.data.subject import Subject
    from backend.gaussians.files import save_avatar
    from backend.refine.config import preset
    from backend.refine.refine import RefineState, refine
    from backend.refine.regularizers import SurfaceHinge

    if args.lpips_weights is not None and args.lpips is None:
        raise SpatialAvatarError("--lpips-weights: give --lpips WEIGHT too (LPIPS is not in the loss without it)")
    _check_lpips_folder(args.lpips_weights)
    overrides, names = _flags(
        args,
        {"iterations": "--iters", "seed": "--seed", "finetune_flame": "--finetune-flame", "opacity_sparsity": "--opacity-sparsity", "lpips_weight": "--lpips", "exposure": "--exposure"},
    )
    overrides |= {
        "anti_spike.max_scale": args.max_scale,
        "surface": None if args.max_depth is None else SurfaceHinge(max_depth=args.max_depth),
        "lpips_folder": str(args.lpips_weights) if args.lpips_weights else None,
    }
    config = preset(args.preset).with_overrides(overrides, names | {"anti_spike.max_scale": "--max-scale", "surface.max_depth": "--max-depth"})
    device = _device(args.device)
    avatar, head = _load_avatar(args, device)
    subject = Subject.load(args.subject)
    # Refinement poses the head unchecked in its loop, so the subject's names are checked here.
    subject.params.check_head(head.name, head.expr_names, str(subject.root / "flame_param.npz"))
    ckpt_path = Path(str(args.out) + ".ckpt")
    resume = RefineState.load(ckpt_path) if args.resume else None
    photometric = args.photometric_tracking
    if photometric is None:  # where it was measured to help: real (not synthetic) subjects on a GPU
        photometric = device == "cuda" and subject.info.source != "synthetic" and resume is None
    if photometric:
        from backend.refine.photometric_tracking import track_photometric

        track_bar = _progress("photometric tracking", not args.json, unit="step")
        subject = track_photometric(head, subject, progress=lambda done, total, stats: track_bar(done, total))
    interrupted = {"flag": False}

    def on_sigint(signum, frame):  # type: ignore[no-untyped-def]
        interrupted["flag"] = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    bar = tqdm(total=config.iterations, initial=resume.iteration if resume else 0, desc="refine", file=sys.stderr, unit="it", disable=args.json)

    def progress(done: int, total: int, stats: dict) -> None:
        bar.update(done - bar.n)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", psnr=f"{stats['psnr']:.2f}")

    try:
        result = refine(avatar, head, subject, config, progress=progress, should_stop=lambda: interrupted["flag"], checkpoint=lambda st: st.save(ckpt_path), resume=resume)
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    for note in result.notes:
        print(f"spatialavatar refine: {note}", file=sys.stderr)
    if result.stopped_early:
        raise SpatialAvatarError(f"interrupted at iteration {result.avatar.meta['refined_iterations']}; checkpoint written to {ckpt_path}, continue with --resume")
    save_avatar(result.avatar, args.out)
    ckpt_path.unlink(missing_ok=True)
    wall = result.timings["wall"]
    return {
        "avatar": str(args.out), "iterations": config.iterations, "gaussians": result.avatar.count, "seconds": round(wall, 2), "photometric_tracking": photometric,
        "final": result.history[-1] if result.history else {}, "notes": result.notes,
    }


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from backend.data.subject import Subject
    from backend.refine.evaluate import evaluate, orbit_holes

    _check_lpips_folder(args.lpips_weights)
    avatar, head = _load_avatar(args, _device(args.device))
    reference = _avatar_for(args.against, head) if args.against is not None else None
    subject = Subject.load(args.subject)
    scores = evaluate(avatar, head, subject, split=args.split, worst_view_png=args.worst_view, lpips_folder=args.lpips_weights)
    if reference is not None:
        scores["orbit_holes"] = orbit_holes(avatar, reference, head, subject.params.index(subject.split[args.split][:1]))
    return scores


def cmd_convert(args: argparse.Namespace) -> dict:
    from backend.data.imavatar import convert_imavatar

    root = convert_imavatar(args.folder, args.out, test_frames=args.test_frames, progress=_progress("convert", not args.json))
    return {"subject": str(root)}


def cmd_convert_nersemble(args: argparse.Namespace) -> dict:
    """A NeRSemble sequence (the dataset's or benchmark's release, or a GaussianAvatars / VHAP export) -> a subject."""
    from backend.tracking.nersemble import NersembleConfig, convert_nersemble

    fields = ("size", "cameras", "test_cameras", "stride", "max_frames", "test_fraction", "crop_scale")
    config = NersembleConfig().with_overrides({f: getattr(args, f) for f in fields}, names={f: "--" + f.replace("_", "-") for f in fields})
    result = convert_nersemble(args.sequence, args.out, _head(args), config, calibration=args.calibration, progress=_progress("convert", not args.json))
    for note in result.notes:
        print(f"spatialavatar convert-nersemble: note: {note}", file=sys.stderr)
    return result.summary()


def _is_live_link_csv(path: Path) -> bool:
    """A ``.csv``, or a file of another name that starts with Live Link Face's first column."""
    if path.suffix.lower() == ".csv":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(16).removeprefix(b"\xef\xbb\xbf").startswith(b"Timecode")
    except OSError:
        return False  # a folder or a missing file: the video reader names the problem


def cmd_arkit(args: argparse.Namespace) -> dict:
    """ARKit curves -> flame_param.npz for the head model, resampled: from a Live Link Face CSV,
    or measured on a driving video or folder of frames by mediapipe's face landmarker."""
    from backend.head.arkit_curves import to_flame_params
    from backend.wire.arkit_csv import SOURCE_FPS, expression_columns, read_live_link_csv, resample, write_live_link_csv

    head = _head(args).data
    summary: dict[str, Any] = {}
    if _is_live_link_csv(args.input):
        curves = read_live_link_csv(args.input, SOURCE_FPS if args.source_fps is None else args.source_fps)
    else:
        from backend.tracking.blendshapes import ARKIT_NAMES, BlendshapeConfig, video_curves
        from backend.tracking.video import FrameRange

        # Refuse a head without ARKit names before minutes of video, not after.
        expression_columns(ARKIT_NAMES, head.expr_names, head.n_expr, f"head model '{head.name}'")
        frames = FrameRange() if args.source_fps is None else FrameRange(fps=args.source_fps)
        measured = video_curves(args.input, BlendshapeConfig(frames=frames), progress=_progress("arkit", not args.json))
        if measured.faceless:
            print(f"spatialavatar arkit: warning: no face in {measured.faceless} of {len(measured.curves.seconds)} frames; their values are interpolated from the frames around them", file=sys.stderr)
        curves, summary = measured.curves, measured.summary()
    params, missing = to_flame_params(resample(curves, args.fps), head)
    for path in (args.out, args.csv):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if args.csv is not None:
        # At the source's own rate: Import ARKit Curves resamples to the scene's.
        write_live_link_csv(curves, args.csv)
        summary["csv"] = str(args.csv)
    params.save(args.out)
    return {"out": str(args.out), "frames": params.batch_size, "fps": args.fps, "channels_not_in_head": missing, **summary}


def _track_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from backend.tracking import TrackConfig

    frames = {f"frames.{k}": getattr(args, k) for k in ("stride", "start", "end", "max_frames")}
    return TrackConfig().with_overrides({"crop.size": args.size, **frames})


def cmd_track_batch(args: argparse.Namespace) -> dict:
    """Many clips (videos, folders of frames) -> one subject each, in parallel over cores."""
    from backend.head.registry import resolve_flame_path
    from backend.tracking.batch import BatchConfig, find_clips, track_batch

    config = BatchConfig(track=_track_config(args), **({"workers": args.workers} if args.workers is not None else {}))
    config.check()
    clips = find_clips(args.inputs)
    print(f"spatialavatar track-batch: {len(clips)} clips, {config.workers} at once", file=sys.stderr)
    result = track_batch(clips, args.out, resolve_flame_path(args.flame), config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    return result.summary()


def cmd_track(args: argparse.Namespace) -> dict:
    """Photos / a video / a folder of frames of one person -> a subject folder (offline)."""
    from backend.tracking import track

    config = _track_config(args)

    def warn(message: str) -> None:
        print(f"spatialavatar track: warning: {message}", file=sys.stderr)

    result = track(args.inputs, args.out, _head(args), config, progress=lambda desc: _progress(desc, not args.json), warn=warn)
    return result.summary()


def cmd_train(args: argparse.Namespace) -> dict:
    """Stage 1 training (phase 1 or 2); run again to resume; under torchrun, one process per GPU."""
    from backend.generate.model import preset as model_preset
    from backend.generate.train import phase_defaults, teardown_distributed, train, with_overrides

    config = with_overrides(
        phase_defaults(args.phase),
        steps=args.steps,
        batch=args.batch,
        targets=args.targets,
        lr=args.lr,
        l2sp=args.l2sp,
        cross_time=args.cross_time,
        lpips_weight=args.lpips,
        max_minutes=args.max_minutes,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
    )
    overrides = {"gaussians": args.gaussians} if args.gaussians else {}
    model_config = model_preset(args.preset, **overrides)
    try:
        result = train(config, model_config, args.data, args.out, _head(args), init=args.init, device=args.device, show_progress=not args.json, log=lambda m: print(m, file=sys.stderr))
    finally:
        teardown_distributed()
    # Under torchrun every process gets here; rank 0 speaks for the run (the others' "last" is their own shard's).
    return result if int(os.environ.get("RANK", "0")) == 0 else {}


def cmd_generate(args: argparse.Namespace) -> dict:
    """1 to 4 portraits (tracked on the fly) or a subject folder's chosen views -> avatar .npz."""
    from backend.data.subject import Subject
    from backend.gaussians.files import save_avatar
    from backend.generate.checkpoint import DEFAULT_CHECKPOINT, load_generator, read_generator_file
    from backend.gaussians.layout import MAX_GAUSSIANS, MIN_GAUSSIANS
    from backend.generate.generate import generate_avatar, parse_views, split_inputs, track_portraits

    subject_dir, images = split_inputs(args.inputs)
    if images and args.frames:
        raise SpatialAvatarError("--frames picks views of a subject folder; with portrait files every portrait is a source")
    device = _device(args.device)
    config = _personalization(args, device)  # a bad setting fails before any tracking
    read_generator_file(args.checkpoint or DEFAULT_CHECKPOINT)  # a missing checkpoint fails before any tracking
    if args.gaussians is not None and not MIN_GAUSSIANS <= args.gaussians <= MAX_GAUSSIANS:
        raise SpatialAvatarError(f"--gaussians {args.gaussians}: a layout holds {MIN_GAUSSIANS} to {MAX_GAUSSIANS} Gaussians")
    head = _head(args)
    model, info = load_generator(args.checkpoint, head)
    if images:
        tracked = args.subject_out or args.out.with_name(args.out.stem + "_subject")
        subject = track_portraits(images, tracked, head)
        views = [(t, 0) for t in range(subject.num_frames)]
    else:
        subject = Subject.load(subject_dir)
        views = parse_views(args.frames, subject)
    head = head.to(device)  # tracking is done: it fits on the CPU
    checkpoint_info = {k: info.get(k) for k in ("phase", "steps_done")}
    outline = OutlineFit(enabled=args.outline)
    avatar = generate_avatar(
        model.to(device), head, subject, views, pool=args.pool, meta={"checkpoint_info": checkpoint_info}, outline=outline, gaussians=args.gaussians
    )
    summary: dict[str, Any] = {"outline": outline.enabled, "personalized": config is not None}
    if config is not None:
        t0 = time.perf_counter()
        bar = _progress("personalize", not args.json, unit="step")
        bar(0, config.iterations)  # shown from the start: the first report comes a tenth of the way in
        avatar = personalize(avatar, head, subject, views, config, progress=lambda done, total, stats: bar(done, total))
        summary["personalize_s"] = round(time.perf_counter() - t0, 2)
    save_avatar(avatar, args.out)
    return {
        "avatar": str(args.out), "subject": str(subject.root), "sources": len(views), "gaussians": avatar.count,
        "generate_ms": avatar.meta["generate_ms"], "seen_share": round(avatar.meta["seen_share"], 3),
    } | summary


def _personalization(args: argparse.Namespace, device: str) -> Personalization | None:
    """The Personalization that ``generate`` runs (``device``'s schedule), or None with
    --no-personalize (the service decides the same way)."""
    on = Generate.personalize_default if args.personalize is None else args.personalize
    if not on:
        if args.personalize_iterations is not None:
            raise SpatialAvatarError(f"--personalize-iterations {args.personalize_iterations}: personalization does not run (--no-personalize was given)")
        return None
    return Personalization.for_device(device).with_overrides(*_flags(args, {"iterations": "--personalize-iterations"}))


def cmd_export_ply(args: argparse.Namespace) -> dict:
    from backend.gaussians.avatar import deform
    from backend.gaussians.files import export_ply
    from backend.head.params import FlameParams

    avatar, head = _load_avatar(args, "cpu")
    params = head.neutral_params(1)
    if args.anim:
        anim = FlameParams.load(args.anim)
        anim.check_head(head.name, head.expr_names, str(args.anim))
        if not 0 <= args.frame < anim.batch_size:
            raise SpatialAvatarError(f"--frame {args.frame} is outside the animation's {anim.batch_size} frames")
        params = anim.index([args.frame])
    with torch.no_grad():
        splats = deform(avatar, head, params).frame(0)
    export_ply(splats, avatar.local.sh, args.out)
    return {"ply": str(args.out), "gaussians": avatar.count}


def cmd_demo(args: argparse.Namespace) -> dict:
    """The main job: portrait -> tracking -> Stage 1 -> Stage 2 -> animated .blend -> composited frames, GIF, MP4."""
    from backend.demo.pipeline import run_demo

    overrides, names = _flags(args, {"out": "--out", "portrait": "--portrait", "frames": "--frames", "size": "--size", "cpu_iters": "--cpu-iters"})
    config = DemoConfig().with_overrides(overrides | {"device": _device(args.device), "flame": args.flame}, names)
    return run_demo(config, log=(lambda line: None) if args.json else lambda line: print(line, file=sys.stderr, flush=True)).summary()


def cmd_serve(args: argparse.Namespace) -> dict:
    """Run the ZeroMQ service until Ctrl-C, SIGTERM or a shutdown request."""
    import logging
    import signal

    from backend.server.config import default_store
    from backend.server.service import Service

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.shared_slots < 0:
        raise SpatialAvatarError(f"--shared-slots {args.shared_slots}: give 0 (off) or more")
    config = ServiceConfig(
        bind=args.bind, store=args.store or default_store(), device=args.device, flame=args.flame, generator=args.generator, keys=args.keys, shared_slots=args.shared_slots, compile_player=args.compile_player
    )
    service = Service(config)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: service.request_stop())
    d = service.engine.describe()
    secure = "CurveZMQ" if args.keys else "no encryption (loopback only)"
    shared = f"frames for local clients through {service.slots.folder}" if service.slots is not None else "frames through the socket"
    print(f"spatialavatar serve: listening on {service.endpoint} (device {d['device']}, {d['rasterizer']}; {secure}; {shared}; store {config.store})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    service.serve_forever()
    return {"endpoint": service.endpoint, "requests": service.requests, "seconds": round(time.perf_counter() - t0, 1)}


def cmd_keys(args: argparse.Namespace) -> dict:
    from backend.wire.security import generate_keys

    written = generate_keys(args.dir, args.client)
    return written | {"serve": f"spatialavatar serve --bind tcp://0.0.0.0:5555 --keys {args.dir}"}


def cmd_blender_render(args: argparse.Namespace) -> dict:
    from backend.batch.blender_render import BlenderRenderJob, parse_frames, render

    job = BlenderRenderJob(
        blend=args.blend,
        frames=parse_frames(args.frames) if args.frames else None,
        out=args.out,
        blender=args.blender,
        endpoint=args.endpoint,
        store=args.store,
        device=args.device,
        flame=args.flame,
    )
    result = render(job, echo=not args.json)
    return {
        "blend": str(args.blend),
        "frames": len(result.written),
        "written": [str(p) for p in result.written],
        "runner": result.runner,
        "backend": "started and stopped" if result.started_backend else f"already running at {args.endpoint}",
        "seconds": round(result.seconds, 1),
    }


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    head = common.add_mutually_exclusive_group()
    head.add_argument("--head", choices=SHIPPED_HEADS, help="a shipped head model: builtin (procedural) or ict (ICT-FaceKit, scanned, ARKit expression names)")
    head.add_argument(
        "--flame",
        metavar="PATH",
        help="head model: a FLAME folder or file (or a shipped head's name); default: $SPATIALAVATAR_FLAME, else builtin",
    )
    common.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    common.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to compute (default: CUDA when present)")

    parser = argparse.ArgumentParser(prog="spatialavatar", description="SpatialAvatar backend: FLAME-bound 3D Gaussian heads.")
    parser.add_argument("--version", action="version", version=f"spatialavatar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", parents=[common], help="versions, device and the head model in use")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("synth", parents=[common], help="write a synthetic subject")
    p.add_argument("out", type=Path)
    p.add_argument("--frames", type=int, default=SynthConfig.frames)
    p.add_argument("--views", type=int, default=SynthConfig.views, help="1 = monocular video; more = a ring of cameras")
    p.add_argument("--size", type=int, default=SynthConfig.size)
    p.add_argument("--seed", type=int, default=SynthConfig.seed)
    p.add_argument("--reference-gaussians", type=int, default=SynthConfig.reference_gaussians, help="density of the ground-truth reference head")
    p.add_argument("--looks", action="store_true", help="give the identity hair and facial-hair volumes, glasses, skin texture and a key light")
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("init", parents=[common], help="initialize an avatar on a subject (Gaussians on the surface)")
    p.add_argument("subject", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--gaussians", type=int, default=InitConfig.gaussians)
    p.add_argument("--frame", type=int, default=InitConfig.frame, help="reference frame colours are taken from")
    p.add_argument("--camera", type=int, default=InitConfig.camera)
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser("render", parents=[common], help="render an avatar over a flame_param.npz animation to PNG frames")
    p.add_argument("avatar", type=Path)
    p.add_argument("--anim", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--turntable", type=float, default=0.0, metavar="DEGREES", help="yaw swept by the camera over the animation")
    p.set_defaults(fn=cmd_render)

    p = sub.add_parser("refine", parents=[common], help="refine an avatar on a subject (layout and count frozen)")
    p.add_argument("avatar", type=Path)
    p.add_argument("subject", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--iters", type=int, default=RefineConfig.iterations)
    p.add_argument("--preset", choices=REFINE_PRESETS, default=REFINE_PRESETS[0], help="ours, or a baseline: no-antispike (b), densify (a)")
    p.add_argument(
        "--finetune-flame",
        action=argparse.BooleanOptionalAction,
        help="also fine-tune the training frames' FLAME parameters (default: off for ours, on for the baselines; on real clips it helps the training frames, not the held-out ones)",
    )
    p.add_argument(
        "--photometric-tracking",
        action=argparse.BooleanOptionalAction,
        help="first align every frame's FLAME parameters to its image with a short throwaway refinement (default: on for real, not synthetic, subjects on a GPU, about 10-20 s; docs/refinement.md)",
    )
    p.add_argument(
        "--exposure",
        action=argparse.BooleanOptionalAction,
        help="learn a colour gain per training frame (a camera's auto-exposure and white balance) instead of baking each frame's into the colours (default: off)",
    )
    p.add_argument("--max-scale", type=float, help="anti-spike scale threshold in triangle sizes (default 0.6, which tracked real subjects multiply by 2.5 like the offset threshold; raise it for coarse layouts)")
    p.add_argument("--max-depth", type=float, help="turn the depth hinge on with this threshold: how far past its triangle's plane a Gaussian may reach, in triangle sizes (default: 0.1 on synthetic subjects, off on tracked ones, whose hair stands off the mesh)")
    p.add_argument("--opacity-sparsity", type=float, metavar="W", help="fade faint coverage past the outline in the captured views (off; 1e-3 is the tested weight; may open holes in views the video did not cover, see docs/refinement.md)")
    p.add_argument("--lpips", type=float, metavar="WEIGHT", help="add LPIPS to the loss with this weight (off; only where its weights are on this machine, never downloaded: see --lpips-weights)")
    p.add_argument("--lpips-weights", type=Path, metavar="DIR", help=LPIPS_WEIGHTS_HELP)
    p.add_argument("--seed", type=int, default=RefineConfig.seed)
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt, written when a run is interrupted")
    p.set_defaults(fn=cmd_refine)

    p = sub.add_parser("evaluate", parents=[common], help="PSNR/SSIM (LPIPS where its weights are on this machine) on a subject's split, spike statistics")
    p.add_argument("avatar", type=Path)
    p.add_argument("subject", type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--worst-view", type=Path, metavar="PNG", help="write the worst view (ground truth | render)")
    p.add_argument("--lpips-weights", type=Path, metavar="DIR", help=LPIPS_WEIGHTS_HELP)
    p.add_argument("--against", type=Path, metavar="AVATAR", help="also report orbit_holes: the share of what AVATAR (e.g. the one a refinement started from) covers on a turntable around the head that this avatar leaves open")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("convert", parents=[common], help="convert a benchmark dataset layout into a subject")
    p.add_argument("folder", type=Path)
    p.add_argument("--from", dest="layout", choices=("imavatar",), required=True, help="the layout of FOLDER (IMavatar / SplattingAvatar)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--test-frames", type=int, default=350, help="the benchmark tests on the last 350 frames")
    p.set_defaults(fn=cmd_convert)

    serials = lambda text: tuple(s for s in text.split(",") if s)  # a comma-separated list of camera serials
    p = sub.add_parser("convert-nersemble", parents=[common], help="convert a NeRSemble sequence (calibrated cameras, tracked FLAME) into a subject")
    p.add_argument("sequence", type=Path, metavar="SEQUENCE", help="<participant>/sequences/<name> of the dataset or benchmark, or a GaussianAvatars / VHAP export (transforms.json)")
    p.add_argument("--out", type=Path, required=True, metavar="SUBJECT", help="the subject to write; held-out cameras go to SUBJECT/heldout")
    p.add_argument("--calibration", type=Path, metavar="JSON", help="camera_params.json, when not at <participant>/calibration/")
    p.add_argument("--size", type=int, help="width and height of the square crops (default 512)")
    p.add_argument("--cameras", type=serials, metavar="SERIAL,...", help="cameras for the subject, in this order (default: all not held out)")
    p.add_argument("--test-cameras", type=serials, metavar="SERIAL,...", help="cameras held out into SUBJECT/heldout (novel views)")
    p.add_argument("--stride", type=int, help="keep every N-th frame")
    p.add_argument("--max-frames", type=int, metavar="N", help="keep at most N frames")
    p.add_argument("--test-fraction", type=float, metavar="F", help="the last F of the kept frames are the test split (default 0.2)")
    p.add_argument("--crop-scale", type=float, help="crop side in face sizes (the largest distance between two tracked landmarks; default 2.7)")
    p.set_defaults(fn=cmd_convert_nersemble)

    p = sub.add_parser(
        "arkit", parents=[common], help="ARKit face curves (a Live Link Face CSV, or measured on a driving video) -> flame_param.npz for a head named after ARKit (--head ict)"
    )
    p.add_argument("input", type=Path, metavar="INPUT", help="a Live Link Face CSV (.csv, or any file starting with its Timecode column), a video file, or a folder of frames")
    p.add_argument("--out", type=Path, required=True, help="flame_param.npz to write")
    p.add_argument("--csv", type=Path, metavar="OUT.csv", help="also write the curves as a Live Link Face CSV, at the input's own rate (Import ARKit Curves in Blender keys it)")
    p.add_argument("--fps", type=float, default=30.0, help="frames per second of the output")
    p.add_argument(
        "--source-fps", type=float, help="the input's frame rate: a CSV's timecode counts frames at it (default 60), a folder of frames plays at it (default 25); a video's own is read from the file"
    )
    p.set_defaults(fn=cmd_arkit)

    tracking = argparse.ArgumentParser(add_help=False)
    tracking.add_argument("--size", type=int, default=CropConfig.size, help="width and height of the square crops")
    tracking.add_argument("--stride", type=int, default=FrameRange.stride, help="video / folder: keep every N-th frame")
    tracking.add_argument("--start", type=float, metavar="SECONDS", help="video / folder: first time to use")
    tracking.add_argument("--end", type=float, metavar="SECONDS", help="video / folder: time to stop at")
    tracking.add_argument("--max-frames", type=int, metavar="N", help="video / folder: at most N frames")
    p = sub.add_parser("track", parents=[common, tracking], help="track portrait photos, a video or a folder of frames of one person into a subject")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="1 to N photos of one person, a video file, or a folder of frames")
    p.add_argument("--out", type=Path, required=True, metavar="SUBJECT")
    p.set_defaults(fn=cmd_track)
    p = sub.add_parser("track-batch", parents=[common, tracking], help="track many clips (videos, folders of frames), one subject each, in parallel over CPU cores")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="video files, folders of clips (videos or sub-folders of frames), or a folder of frames")
    p.add_argument("--out", type=Path, required=True, metavar="FOLDER", help="one subject per clip, named after it; clips already there are skipped")
    p.add_argument("--workers", type=int, help="clips tracked at once (default: one per two cores)")
    p.set_defaults(fn=cmd_track_batch)

    p = sub.add_parser("train", parents=[common], help="train the Stage 1 generator (phase 1 or 2); run again to resume")
    p.add_argument("--phase", type=int, choices=(1, 2), required=True, help="1: monocular-temporal; 2: multi-view-spatial (needs --init)")
    p.add_argument("--data", nargs="+", type=Path, required=True, metavar="DIR", help="subject folders, or folders holding them")
    # Not --run: torchrun would read it as an abbreviation of its own --run-path.
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="run folder: checkpoint.pt, generator.pt, log.jsonl, summary.json")
    p.add_argument("--init", type=Path, metavar="PATH", help="phase 2: the phase-1 run folder or generator file (also the L2-SP anchor); phase 1: weights to warm-start from")
    p.add_argument("--preset", choices=("default", "small", "tiny"), default="default", help="architecture of a new phase-1 network")
    p.add_argument("--gaussians", type=int, help="override the preset's Gaussian count")
    p.add_argument("--steps", type=int, help="total steps of the run (phase 1: 6000, phase 2: 3000)")
    p.add_argument("--batch", type=int, help="samples per step per process (default 8)")
    p.add_argument("--targets", type=int, help="target views per sample (default 2)")
    p.add_argument("--lr", type=float, help="peak learning rate (phase 1: 4e-4, phase 2: 2e-4)")
    p.add_argument("--l2sp", type=float, help="L2-SP weight toward the phase-1 weights (phase 2 default 1e-3; 0 = off)")
    p.add_argument("--cross-time", type=float, help="phase 2 share of samples with targets from another time (default 0.25)")
    p.add_argument("--lpips", type=float, metavar="WEIGHT", help="add LPIPS (only where its weight files are on this machine: torch's hub cache and the lpips package; never downloaded)")
    p.add_argument("--max-minutes", type=float, help="stop cleanly after this many minutes; the same command continues")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 500)")
    p.add_argument("--log-every", type=int, help="steps between log.jsonl lines (default 25)")
    p.add_argument("--seed", type=int)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("generate", parents=[common], help="generate an avatar from 1 to 4 portraits or a subject's views")
    p.add_argument("inputs", nargs="*", type=Path, metavar="INPUT", help="1 to 4 portrait files, or one subject folder")
    p.add_argument("--out", type=Path, required=True, metavar="AVATAR.npz")
    p.add_argument("--frames", nargs="+", metavar="T[:C]", help="subject views to use as sources, e.g. 0 12 or 0:0,0:3 (default: 0)")
    p.add_argument("--checkpoint", type=Path, help="generator weights (default: the shipped backend/generate/weights/generator.pt)")
    p.add_argument("--pool", choices=get_args(PoolMode), default="mean", help="mean over sources (the model), the best source per Gaussian (ablation), or consensus: the mean with disagreeing sources turned down")
    p.add_argument("--subject-out", type=Path, metavar="DIR", help="where tracked portraits are written (default: next to --out)")
    p.add_argument(
        "--gaussians",
        type=int,
        metavar="N",
        help="carry the generated head onto a layout of N Gaussians, interpolated in UV space (more room for detail in a "
        "later refinement, which keeps that layout); default: the network's own layout",
    )
    p.add_argument(
        "--outline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fit the hair volume and the outline to the sources' person masks after the network: scalp Gaussians "
        "lift to the top of the hair, and nothing shows where a mask says no person is (default: on)",
    )
    p.add_argument(
        "--personalize",
        action=argparse.BooleanOptionalAction,
        help="refine the generated avatar briefly on its own sources, so it takes in the person's hair, skin and lighting "
        "(layout unchanged). Default: on; it takes about a second with CUDA and, with its "
        f"{Personalization.cpu_iterations} steps, under a minute on two CPU cores",
    )
    p.add_argument(
        "--personalize-iterations",
        type=int,
        metavar="N",
        help=f"personalization steps (default {Personalization.iterations} with CUDA, {Personalization.cpu_iterations} on the CPU); only with personalization on",
    )
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("export-ply", parents=[common], help="export a standard 3DGS .ply at a pose")
    p.add_argument("avatar", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--anim", type=Path, help="flame_param.npz to take the pose from (default: neutral)")
    p.add_argument("--frame", type=int, default=0)
    p.set_defaults(fn=cmd_export_ply)

    p = sub.add_parser("demo", parents=[common], help="the main job: a portrait -> avatar -> animated, composited Blender render")
    p.add_argument("--portrait", type=Path, metavar="IMAGE", help="the photo (default: scikit-image's public-domain astronaut)")
    p.add_argument("--out", type=Path, default=DemoConfig.out)
    p.add_argument("--frames", type=int, default=DemoConfig.frames, help=f"animation length in frames ({DemoConfig.fps} fps)")
    p.add_argument("--size", type=int, default=DemoConfig.size, help="rendered frame width and height, pixels")
    p.add_argument("--cpu-iters", type=int, default=DemoConfig.cpu_iters, help=f"refinement iterations without CUDA (CUDA runs the full {DemoConfig.gpu_iters:,})")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("serve", parents=[common], help="run the ZeroMQ service the Blender add-on talks to")
    p.add_argument("--bind", default=DEFAULT_ENDPOINT, help="endpoint; anything but loopback needs --keys (default: %(default)s)")
    p.add_argument("--store", type=Path, help="folder of avatars, subjects and jobs (default: $SPATIALAVATAR_STORE, else the user data folder)")
    p.add_argument("--keys", type=Path, metavar="DIR", help="CurveZMQ key folder made by `spatialavatar keys`")
    p.add_argument("--generator", type=Path, metavar="FILE", help="stage-1 generator checkpoint (default: the one `spatialavatar generate` uses)")
    p.add_argument("--compile-player", action="store_true", help="fuse posing with torch.compile (CUDA): renders about a quarter faster after a first render of each batch size that compiles for about 10 s")
    p.add_argument("--shared-slots", type=int, default=ServiceConfig.shared_slots, metavar="N", help="shared-memory slots for render frames to clients on this machine; 0: frames always go through the socket (default: %(default)s)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("blender-render", parents=[common], help="render a .blend with its avatars composited (starts a backend if none answers)")
    p.add_argument("blend", type=Path)
    p.add_argument("--frames", metavar="A..B", help="scene frames to render, inclusive (default: the file's range)")
    p.add_argument("--out", type=Path, metavar="DIR", help="folder for the frames (default: the file's output path)")
    p.add_argument("--blender", type=Path, metavar="PATH", help="Blender executable (default: blender on PATH, else the bpy module)")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="the backend's address; one is started there if none answers (default: %(default)s)")
    p.add_argument("--store", type=Path, help="store of a backend started here (default: as `serve`)")
    p.set_defaults(fn=cmd_blender_render)

    p = sub.add_parser("keys", parents=[common], help="make CurveZMQ keys for the service and one client")
    p.add_argument("dir", type=Path)
    p.add_argument("--client", default="blender", help="name of the client key pair (default: %(default)s)")
    p.set_defaults(fn=cmd_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Warnings meant for the user (e.g. a head whose UV map leaves triangles bare) as one line, like errors.
    warnings.showwarning = lambda message, *_: print(f"spatialavatar {args.command}: warning: {message}", file=sys.stderr)
    if getattr(args, "head", None):
        args.flame = args.head  # one head argument downstream: a shipped name or a FLAME path
    try:
        result = args.fn(args)
    except SpatialAvatarError as exc:
        print(f"spatialavatar {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spatialavatar {args.command}: interrupted", file=sys.stderr)
        return 130
    if not result:
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
