"""The long jobs the service runs, as ``JobFn`` callables (see jobs.py).

- synthesize: a synthetic subject written into the store (resume starts it again; it is
  deterministic in its seed).
- initialize: an avatar laid on a subject's surface and saved at once, then rendered on
  every frame of the subject and scored (PSNR) frame by frame; resume picks up at the
  first frame not yet scored.
- refine: stage 2 (backend.refine.refine) of a stored avatar on a stored subject into a new
  avatar, written at every refinement checkpoint; resume continues from the last one.
- track: uploaded portraits or a video, kept in the store until the job ends, tracked into
  a subject (resume tracks again).
- generate: stage 1 from uploaded portraits (tracked first into a subject of their own) or
  from views of a stored subject, then, when asked, personalization on those sources (its
  steps reported and cancellable like a refinement's); resume skips the tracking when it
  was done.

backend.tracking and backend.generate are imported when such a job runs: the service
starts without them (mediapipe is heavy) and hello says whether they can run.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from backend.configs import Config
from backend.data.subject import Subject
from backend.data.synthetic import SynthConfig, synthesize
from backend.gaussians.avatar import Avatar, deform
from backend.refine.config import preset
from backend.refine.initialize import InitConfig, initialize_on_subject
from backend.refine.losses import psnr
from backend.refine.refine import RefineState, refine
from backend.render.camera import Cameras
from backend.render.rasterize import render
from backend.server.engine import Engine
from backend.server.jobs import JobArgs, JobCancelled, JobKind, Progress, ShouldCancel
from backend.server.store import Store
from backend.wire import operations as ops
from backend.wire.protocol import ErrorCode, WireError

if TYPE_CHECKING:
    from backend.tracking import TrackConfig

MAX_PSNR = 100.0


def settings_of(base: Config, operation: type[ops.Operation], params: dict[str, Any]) -> Any:
    """``base`` with the job arguments in ``params`` that override its fields, checked; a
    failed check names the argument. The handlers call it to refuse a request before it
    becomes a job, and the jobs to build their configuration."""
    return base.with_overrides(operation.settings(params), operation.setting_names())


def run_synthesize(engine: Engine, store: Store, args: JobArgs, progress: Progress, should_cancel: ShouldCancel) -> dict:
    p = args.params
    config = settings_of(SynthConfig(), ops.Synthesize, p)
    staged = store.scratch("-subject")
    try:
        synthesize(engine.head, staged, config, lambda done, total: progress(done, total, f"frame {done} of {total}"))
        store.commit_subject(p["out"], staged)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return {"subject": p["out"]}


def run_initialize(engine: Engine, store: Store, args: JobArgs, progress: Progress, should_cancel: ShouldCancel) -> dict:
    p = args.params
    aid = p["out"]
    subject = Subject.load(store.subject_dir(p["subject"]))
    total = subject.num_frames + 1
    resume = args.resume or {}
    config = settings_of(InitConfig(), ops.Initialize, p)
    if resume.get("stage") == "score" and any(a.id == aid for a in store.avatars()):
        avatar, scores = store.load_avatar(aid), list(resume["psnr"])
    else:
        avatar = initialize_on_subject(engine.head, subject, config)
        store.put_avatar(aid, avatar, name=p.get("name"), source=f"initialize on {p['subject']}")
        scores = []
        progress(1, total, "initialized", checkpoint={"stage": "score", "psnr": []})
    on_device = avatar.to(engine.device)
    camera = config.camera
    background = subject.background().to(engine.device)
    for t in range(len(scores), subject.num_frames):
        with torch.no_grad():
            splats = deform(on_device, engine.head, on_device.params_for(engine.conform(subject.params.index([t])))).frame(0)
            cams = subject.cameras(t)
            view = Cameras(cams.K[camera : camera + 1], cams.world_to_cam[camera : camera + 1], cams.width, cams.height)
            out = render(splats, view, background)
        # Capped: a perfect match is infinite, and job records are strict JSON.
        scores.append(round(min(psnr(out.rgb[0].cpu(), subject.image(t, camera)), MAX_PSNR), 3))
        message = f"frame {t + 1} of {subject.num_frames}: PSNR {scores[-1]:.2f} dB"
        progress(t + 2, total, message, checkpoint={"stage": "score", "psnr": list(scores)})
    mean = round(sum(scores) / len(scores), 3)
    avatar.meta["fit"] = {"subject": p["subject"], "camera": camera, "psnr_mean": mean, "psnr": scores}
    store.put_avatar(aid, avatar)
    return {"avatar": aid, "psnr_mean": mean}


def run_refine(engine: Engine, store: Store, args: JobArgs, progress: Progress, should_cancel: ShouldCancel) -> dict:
    p = args.params
    ckpt = store.job_checkpoint(args.job_id)
    resume = RefineState.load(ckpt) if args.resume is not None and ckpt.is_file() else None
    source = store.load_avatar(p["avatar"])
    engine.check_fits(source)
    subject = Subject.load(store.subject_dir(p["subject"]))
    config = settings_of(preset(p["preset"]), ops.Refine, p)
    name = p.get("name") or f"{store.avatar_info(p['avatar']).name} refined"
    where = f"refine of {p['avatar']} on {p['subject']}"

    def on_checkpoint(state: RefineState) -> None:
        state.save(ckpt)
        store.put_avatar(p["out"], state.avatar, name=name, source=where)
        progress(
            state.iteration, config.iterations, f"checkpoint at iteration {state.iteration}", checkpoint={"iteration": state.iteration}
        )

    def on_progress(done: int, total: int, stats: dict) -> None:
        progress(done, total, f"iteration {done}: loss {stats['loss']:.4f}, PSNR {stats['psnr']:.2f} dB")

    result = refine(
        source, engine.head, subject, config, progress=on_progress, should_stop=should_cancel, checkpoint=on_checkpoint, resume=resume
    )
    if result.stopped_early:
        raise JobCancelled
    store.put_avatar(p["out"], result.avatar, name=name, source=where)
    ckpt.unlink(missing_ok=True)
    final = result.history[-1] if result.history else {}
    return {"avatar": p["out"], "iterations": config.iterations, "psnr": final.get("psnr")}


def _track_into_store(engine: Engine, store: Store, key: str, sid: str, config: TrackConfig | None, progress: Progress) -> list[str]:
    """Track the uploads kept under ``key`` into subject ``sid``; returns the tracker's warnings
    (which name the uploads relative to the store)."""
    from backend.tracking import TrackConfig, track

    warnings: list[str] = []
    staged = store.scratch("-subject")
    try:
        track(
            [str(p) for p in store.inputs(key)],
            staged,
            engine.head,
            config or TrackConfig(),
            progress=lambda stage: lambda done, total: progress(done, total, f"{stage}: {done} of {total}"),
            warn=warnings.append,
        )
        store.commit_subject(sid, staged)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return [store.relative(w) for w in warnings]


def run_track(engine: Engine, store: Store, args: JobArgs, progress: Progress, should_cancel: ShouldCancel) -> dict:
    from backend.tracking import TrackConfig

    p = args.params
    warnings = _track_into_store(engine, store, p["out"], p["out"], settings_of(TrackConfig(), ops.Track, p), progress)
    subject = Subject.load(store.subject_dir(p["out"]))
    return {"subject": p["out"], "frames": subject.num_frames, "warnings": warnings}


def run_generate(
    engine: Engine, store: Store, checkpoint: Path | None, args: JobArgs, progress: Progress, should_cancel: ShouldCancel
) -> dict:
    from backend.generate.generate import generate_avatar, parse_views
    from backend.generate.outline import OutlineFit

    p = args.params
    aid = p["out"]
    sid = p.get("subject")
    warnings: list[str] = []
    if sid is None:  # portraits: track them into a subject of their own first
        sid = (args.resume or {}).get("subject") or store.new_id("sb")
        if not any(s["id"] == sid for s in store.subjects()):
            warnings = _track_into_store(engine, store, aid, sid, None, progress)
        progress(1, 2, "portraits tracked", checkpoint={"subject": sid})
    subject = Subject.load(store.subject_dir(sid))
    if subject.num_frames < 1:
        raise WireError(ErrorCode.INVALID_ARGUMENT, "generate: no face was found in the portraits")
    views = (
        parse_views([p["frames"]] if p.get("frames") else None, subject)
        if p.get("subject")
        else [(t, 0) for t in range(subject.num_frames)]
    )
    outline = OutlineFit(enabled=p.get("outline", True))
    avatar = generate_avatar(engine.generator(checkpoint), engine.head, subject, views, outline=outline)
    if p.get("personalize"):
        avatar = _personalize(engine, avatar, subject, views, p, progress, should_cancel)
    avatar.meta["subject"] = sid  # generate_avatar records the folder; clients know subjects by id
    store.put_avatar(aid, avatar, name=p.get("name"), source=f"generate from {sid}")
    result = {"avatar": aid, "subject": sid, "sources": len(views), "generate_ms": avatar.meta["generate_ms"], "warnings": warnings}
    return result | {"outline": outline.enabled, "personalized": "personalized" in avatar.meta}


def _personalize(
    engine: Engine, avatar: Avatar, subject: Subject, views: list[tuple[int, int]], p: dict, progress: Progress, should_cancel: ShouldCancel
) -> Avatar:
    """Generate's last step: the avatar refined briefly on its sources, reported as steps of
    its own. A cancel stops it at the next step; nothing is stored then. A resumed job
    generates and personalizes again (both are short)."""
    from backend.generate.personalize import Personalization, personalize

    config = settings_of(Personalization.for_device(engine.device), ops.Generate, p)
    progress(0, config.iterations, "personalize: refining on the sources")

    def on_progress(done: int, total: int, stats: dict) -> None:
        progress(done, total, f"personalize: step {done} of {total}, PSNR {stats['psnr']:.2f} dB")

    out = personalize(avatar, engine.head, subject, views, config, progress=on_progress, should_stop=should_cancel)
    if should_cancel():  # it stopped early: a partly personalized avatar is not kept
        raise JobCancelled
    return out


def job_kinds(engine: Engine, store: Store, generator: Path | None) -> dict[str, JobKind]:
    return {
        "synthesize": JobKind(partial(run_synthesize, engine, store)),
        "initialize": JobKind(partial(run_initialize, engine, store)),
        "refine": JobKind(partial(run_refine, engine, store)),
        "track": JobKind(partial(run_track, engine, store)),
        "generate": JobKind(partial(run_generate, engine, store, generator)),
    }
