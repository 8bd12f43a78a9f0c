"""Operations that start long jobs: synthesize, initialize, refine, track and generate.

Each checks its request, queues a job and answers at once with the job's record; the client
follows it with ``watch`` (a stream of progress events) or ``get``, and may ``cancel`` it.
track and generate decode every portrait completely, and probe a video (container, stream,
first frame, length, resolution), before anything is kept; the uploads are then stored with
the job, so a resumed job finds them, and removed once no run of it can use them (jobs.py).
"""

from __future__ import annotations

import json

from backend.gaussians.layout import MAX_GAUSSIANS, MIN_GAUSSIANS
from backend.server.args import Args
from backend.server.media import blob, image_suffix, video_suffix
from backend.server.ops import OpContext, Part
from backend.server.store import check_id
from backend.wire.errors import InputError
from backend.wire.protocol import ErrorCode, Request, WireError

MAX_PORTRAITS = 4
MAX_TRACKED_IMAGES = 64


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
    params = {
        "frames": a.int("frames", 30, lo=1, hi=600),
        "views": a.int("views", 1, lo=1, hi=16),
        "size": a.int("size", 256, lo=32, hi=2048),
        "seed": a.int("seed", 0, lo=0, hi=2**31 - 1),
        "reference_gaussians": a.int(
            "reference_gaussians", 200_000, lo=MIN_GAUSSIANS, hi=min(MAX_GAUSSIANS, ctx.config.requests.max_gaussians)
        ),
    }
    a.done()
    return _queue(ctx, req, "synthesize", params, "sb", "subject")


def op_initialize(ctx: OpContext, req: Request) -> Part:
    """A new avatar laid on a stored subject's surface, then scored on every frame of it."""
    a = Args(req)
    subject = check_id(a.str("subject"), "sb", "subject")
    info = json.loads((ctx.store.subject_dir(subject) / "subject.json").read_text())
    params = {
        "subject": subject,
        "gaussians": a.int("gaussians", 100_000, lo=MIN_GAUSSIANS, hi=min(MAX_GAUSSIANS, ctx.config.requests.max_gaussians)),
        # Checked against the subject here, so a bad reference view never becomes a job.
        "frame": a.int("frame", 0, lo=0, hi=int(info["num_frames"]) - 1),
        "camera": a.int("camera", 0, lo=0, hi=int(info["num_cameras"]) - 1),
        "name": a.str("name", None),
    }
    a.done()
    return _queue(ctx, req, "initialize", params, "av", "avatar")


def op_refine(ctx: OpContext, req: Request) -> Part:
    """Stage 2 on a stored subject; the refined avatar is a new one, the source stays as it was."""
    a = Args(req)
    avatar = check_id(a.str("avatar"), "av", "avatar")
    subject = check_id(a.str("subject"), "sb", "subject")
    params = {
        "avatar": avatar,
        "subject": subject,
        "preset": a.str("preset", "ours", choices=("ours", "no-antispike")),
        "iterations": a.int("iterations", None, lo=1, hi=1_000_000),
        "checkpoint_every": a.int("checkpoint_every", None, lo=1, hi=1_000_000),
        "max_scale": a.float("max_scale", None, lo=1e-3, hi=1e3),
        "name": a.str("name", None),
    }
    a.done()
    ctx.store.avatar_info(avatar)
    ctx.store.subject_dir(subject)
    return _queue(ctx, req, "refine", params, "av", "avatar")


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
    if images != [f"image{i}" for i in range(len(images))] or len(images) > MAX_TRACKED_IMAGES:
        raise a.error(f"name portraits image0, image1, ... (at most {MAX_TRACKED_IMAGES})")
    video = a.array("video", ("<u1",), [(None,)], required=False)
    if bool(images) == (video is not None):
        raise a.error("send either portraits (buffers image0, image1, ...) or one 'video' buffer")
    files = _uploads(a, images, lim.max_upload_bytes, lim.max_image_pixels)
    if video is not None:
        data = blob(video, "video", lim.max_upload_bytes)
        files.append((video_suffix(data, "video", lim), data))
    params = {"size": a.int("size", 512, lo=64, hi=2048), "max_frames": a.int("max_frames", None, lo=1, hi=100_000)}
    a.done()
    if not ctx.hello["capabilities"]["track"]["available"]:
        raise unavailable(ctx, "track")
    return _queue(ctx, req, "track", params, "sb", "subject", files)


def op_generate(ctx: OpContext, req: Request) -> Part:
    """1-4 portraits (``portrait0`` ...), or views of a stored ``subject`` -> an avatar."""
    a = Args(req)
    lim = ctx.config.requests
    names = a.names("portrait")
    subject = a.str("subject", None)
    frames = a.str("frames", None)
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
    elif not 1 <= len(names) <= MAX_PORTRAITS or names != [f"portrait{i}" for i in range(len(names))]:
        raise a.error(f"send 1 to {MAX_PORTRAITS} portraits as buffers portrait0, portrait1, ... (got {len(names)}), or a 'subject'")
    files = _uploads(a, names, lim.max_upload_bytes, lim.max_image_pixels)
    params = {"subject": subject, "frames": frames, "name": a.str("name", None)}
    a.done()
    if not ctx.hello["capabilities"]["generate"]["available"]:
        raise unavailable(ctx, "generate")
    if files and not ctx.hello["capabilities"]["track"]["available"]:
        raise unavailable(ctx, "track")
    return _queue(ctx, req, "generate", params, "av", "avatar", files)
