"""Operations that start long jobs: synthesize, initialize, refine, track and generate.

Each checks its request, queues a job and answers at once with the job's record; the client
follows it with ``watch`` (a stream of progress events) or ``get``, and may ``cancel`` it.
track and generate decode every portrait completely, and probe a video (container, stream,
first frame, length, resolution), before anything is kept; the uploads are then stored with
the job, so a resumed job finds them, and removed once no run of it can use them (jobs.py).
"""

from __future__ import annotations

import json

from backend.data.synthetic import SynthConfig
from backend.refine.config import preset
from backend.refine.initialize import InitConfig
from backend.server.args import Args
from backend.server.job_kinds import settings_of
from backend.server.media import blob, image_suffix, video_suffix
from backend.server.ops import OpContext, Part
from backend.server.store import check_id
from backend.wire import operations as ops
from backend.wire.errors import InputError
from backend.wire.protocol import ErrorCode, Request, WireError


def _queue(ctx: OpContext, req: Request, kind: str, params: dict, out_prefix: str, out_key: str, files: list | None = None) -> Part:
    """Queue a job making a new ``out_prefix`` id; its uploads (suffix, bytes) are kept under that id."""
    made = ctx.jobs.by_request(req.id)
    if made is not None:  # a client's retry: the job (and its uploads) exist already
        return Part({"job": made})
    out = ctx.store.new_id(out_prefix)
    if files:
        ctx.store.put_inputs(out, files)
    record = ctx.jobs.submit(kind, params | {"out": out}, req.id, result={out_key: out})
    return Part({"job": record})


def unavailable(ctx: OpContext, op: str) -> WireError:
    reason = ctx.hello["capabilities"][op].get("reason", "")
    return WireError(ErrorCode.NOT_AVAILABLE, f"{op}: {reason}")


def op_synthesize(ctx: OpContext, req: Request) -> Part:
    """A synthetic subject (random identity, animated, filmed by known cameras), made by the service."""
    a = Args(req)
    params = a.values(ops.Synthesize, hi={"reference_gaussians": ctx.config.requests.max_gaussians})
    a.done()
    settings_of(SynthConfig(), ops.Synthesize, params)
    return _queue(ctx, req, ops.Synthesize.op, params, "sb", "subject")


def op_initialize(ctx: OpContext, req: Request) -> Part:
    """A new avatar laid on a stored subject's surface, then scored on every frame of it."""
    a = Args(req)
    subject = check_id(a.str(ops.Initialize.subject), "sb", "subject")
    info = json.loads((ctx.store.subject_dir(subject) / "subject.json").read_text())
    # The reference view is checked against the subject here, so a bad one never becomes a job.
    hi = {"gaussians": ctx.config.requests.max_gaussians, "frame": int(info["num_frames"]) - 1, "camera": int(info["num_cameras"]) - 1}
    params = a.values(ops.Initialize, hi)
    a.done()
    settings_of(InitConfig(), ops.Initialize, params)
    return _queue(ctx, req, ops.Initialize.op, params, "av", "avatar")


def op_refine(ctx: OpContext, req: Request) -> Part:
    """Stage 2 on a stored subject; the refined avatar is a new one, the source stays as it was."""
    a = Args(req)
    params = a.values(ops.Refine)
    avatar = check_id(params["avatar"], "av", "avatar")
    subject = check_id(params["subject"], "sb", "subject")
    a.done()
    settings_of(preset(params["preset"]), ops.Refine, params)
    ctx.store.avatar_info(avatar)
    ctx.store.subject_dir(subject)
    return _queue(ctx, req, ops.Refine.op, params, "av", "avatar")


def _uploads(a: Args, names: list[str], lim_bytes: int, max_pixels: int) -> list[tuple[str, bytes]]:
    """(suffix, bytes) of every portrait buffer, each decoded completely first."""
    out = []
    for name in names:
        data = blob(a.array(name, ("<u1",), [(None,)]), name, lim_bytes)
        out.append((image_suffix(data, name, max_pixels), data))
    return out


def op_track(ctx: OpContext, req: Request) -> Part:
    """Portraits (``image0`` ...) or one ``video`` of one person -> a subject."""
    a = Args(req)
    lim = ctx.config.requests
    images = a.names("image")
    if images != [f"image{i}" for i in range(len(images))] or len(images) > ops.Track.max_images:
        raise a.error(f"name portraits image0, image1, ... (at most {ops.Track.max_images})")
    video = a.array("video", ("<u1",), [(None,)], required=False)
    if bool(images) == (video is not None):
        raise a.error("send either portraits (buffers image0, image1, ...) or one 'video' buffer")
    files = _uploads(a, images, lim.max_upload_bytes, lim.max_image_pixels)
    if video is not None:
        data = blob(video, "video", lim.max_upload_bytes)
        files.append((video_suffix(data, "video", lim), data))
    params = a.values(ops.Track)
    a.done()
    if not ctx.hello["capabilities"][ops.Track.op]["available"]:
        raise unavailable(ctx, ops.Track.op)
    from backend.tracking.track import TrackConfig  # only where tracking can run (mediapipe is heavy)

    settings_of(TrackConfig(), ops.Track, params)
    return _queue(ctx, req, ops.Track.op, params, "sb", "subject", files)


def _personalization(ctx: OpContext, a: Args) -> dict:
    """``personalize`` (the service's default when absent, so the job record says what runs)
    and ``personalize_iterations``, checked by ``Personalization``'s own check."""
    from backend.generate.personalize import Personalization

    asked = a.bool(ops.Generate.personalize)
    iterations = a.int(ops.Generate.personalize_iterations)
    on = ops.Generate.personalize_default if asked is None else asked
    if iterations is not None and not on:
        raise a.error("'personalize_iterations' needs 'personalize' true: it is false")
    params = {"personalize": on, "personalize_iterations": iterations}
    settings_of(Personalization(), ops.Generate, params)
    return params


def op_generate(ctx: OpContext, req: Request) -> Part:
    """1-4 portraits (``portrait0`` ...), or views of a stored ``subject`` -> an avatar."""
    a = Args(req)
    lim = ctx.config.requests
    names = a.names("portrait")
    subject = a.str(ops.Generate.subject)
    frames = a.str(ops.Generate.frames)
    if subject is not None:
        from backend.data.subject import Subject
        from backend.generate.generate import parse_views

        check_id(subject, "sb", "subject")
        root = ctx.store.subject_dir(subject)
        try:
            parse_views([frames] if frames else None, Subject.load(root))
        except InputError as exc:  # its message names the folder: say the id instead
            raise a.error(str(exc).replace(str(root), subject)) from None
        if names:
            raise a.error("send portraits or a 'subject', not both")
    elif frames is not None:
        raise a.error("'frames' picks views of a 'subject'; with portraits every portrait is a source")
    elif not 1 <= len(names) <= ops.Generate.max_portraits or names != [f"portrait{i}" for i in range(len(names))]:
        raise a.error(f"send 1 to {ops.Generate.max_portraits} portraits as buffers portrait0, portrait1, ... (got {len(names)}), or a 'subject'")
    files = _uploads(a, names, lim.max_upload_bytes, lim.max_image_pixels)
    outline = a.bool(ops.Generate.outline)
    params = {"subject": subject, "frames": frames, "name": a.str(ops.Generate.name), "outline": outline is not False} | _personalization(ctx, a)
    a.done()
    if not ctx.hello["capabilities"][ops.Generate.op]["available"]:
        raise unavailable(ctx, ops.Generate.op)
    if files and not ctx.hello["capabilities"][ops.Track.op]["available"]:
        raise unavailable(ctx, ops.Track.op)
    return _queue(ctx, req, ops.Generate.op, params, "av", "avatar", files)
