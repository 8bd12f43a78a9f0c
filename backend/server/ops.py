"""Operations: the handler type, the executor that turns handlers into replies, and the store ops.

A handler takes (context, request) and returns a ``Part`` or an iterator of them; it never
sees a socket. It checks its arguments before it returns, so a bad request is answered at
once by the service thread; the returned iterator does the work (on the worker thread for
device ops) and marks its last part ``final``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from backend.server.args import Args
from backend.server.media import blob
from backend.server.store import ID, check_id
from backend.wire import operations as ops
from backend.wire.errors import SpatialAvatarError
from backend.wire.protocol import Buffer, ErrorCode, Limits, Request, WireError, encode_error, encode_reply
from backend.wire.shared_frames import SlotPool

if TYPE_CHECKING:
    from backend.server.config import ServiceConfig
    from backend.server.engine import Engine
    from backend.server.jobs import Jobs
    from backend.server.store import Store

log = logging.getLogger("spatialavatar.server")


@dataclass(frozen=True)
class Part:
    """One reply of an operation: JSON result, named arrays, whether it is the last, and
    whether the client asked for its arrays in shared memory."""

    result: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    final: bool = True
    shared: bool = False


@dataclass
class OpContext:
    """What handlers may use."""

    config: ServiceConfig
    store: Store
    jobs: Jobs
    engine: Engine
    hello: dict[str, Any]
    request_stop: Callable[[], None]
    slots: SlotPool | None = None  # shared-memory replies; only the device worker uses them


Handler = Callable[[OpContext, Request], "Part | Iterator[Part]"]


@dataclass(frozen=True)
class Op:
    """Attributes:
    fn: the handler.
    device: the work runs on the worker thread, between job steps.
    replay: not idempotent; a retried request id is answered with the first reply.
    queues_job: may queue a job, so the worker should look for one.
    """

    fn: Handler
    device: bool = False
    replay: bool = False
    queues_job: bool = False


def start(op: Op, ctx: OpContext, req: Request) -> Iterator[Part]:
    """Check the request (raises WireError / SpatialAvatarError) and return its lazy replies."""
    out = op.fn(ctx, req)
    return iter((out,)) if isinstance(out, Part) else out


def error_frames(req_id: str, op: str, exc: BaseException, seq: int = 0) -> list[Buffer]:
    """An error reply for any exception: wire errors keep their code; bugs are logged and reported as internal."""
    if isinstance(exc, WireError):
        return encode_error(req_id, op, exc.code, str(exc), seq)
    if isinstance(exc, SpatialAvatarError):
        return encode_error(req_id, op, ErrorCode.INVALID_ARGUMENT, str(exc), seq)
    log.error("%s (request %s) failed", op, req_id, exc_info=exc)
    return encode_error(req_id, op, ErrorCode.INTERNAL, f"{op} failed inside the service ({type(exc).__name__}: {exc}); see its log", seq)


def encode_parts(req: Request, parts: Iterator[Part], limits: Limits, slots: SlotPool | None = None) -> Iterator[list[Buffer]]:
    """Reply frames numbered from seq 0; an exception becomes a final error reply. ``slots``
    carry the arrays of parts that ask for shared memory, while one is free."""
    seq = 0
    try:
        for part in parts:
            shared = slots.put if slots is not None and part.shared else None
            yield encode_reply(req.id, req.op, part.result, part.arrays, seq, part.final, limits, shared)
            if part.final:
                return
            seq += 1
        raise RuntimeError("the handler ended without a final reply")
    except Exception as exc:
        yield error_frames(req.id, req.op, exc, seq)


# -- store operations ---------------------------------------------------------------------


def op_hello(ctx: OpContext, req: Request) -> Part:
    Args(req).done()
    return Part(ctx.hello)


def op_list(ctx: OpContext, req: Request) -> Part:
    a = Args(req)
    kind = a.str(ops.List.kind)
    a.done()
    if kind == "avatars":
        return Part({"avatars": [i.to_json() for i in ctx.store.avatars()]})
    if kind == "subjects":
        return Part({"subjects": ctx.store.subjects()})
    return Part({"jobs": ctx.jobs.all()})


def _any_id(a: Args, spec: ops.Text) -> str:
    value = a.str(spec)
    if not ID.fullmatch(value):
        raise a.error("'id' must be an avatar, subject or job id (av_, sb_ or jb_ followed by 16 hex digits)")
    return value


def avatar_buffers(ctx: OpContext, aid: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The Gaussian buffers of a stored avatar: what the add-on keeps inside a .blend."""
    avatar = ctx.store.load_avatar(aid)
    b, local = avatar.binding, avatar.local
    arrays = {
        "shape": avatar.shape,
        "face_idx": b.face_idx.int(),
        "bary": b.bary,
        "texel": b.texel.int(),
        "offset": local.offset,
        "rotation": local.rotation,
        "log_scale": local.log_scale,
        "opacity_logit": local.opacity_logit,
        "sh": local.sh,
    }
    if avatar.static_offset is not None:
        arrays["static_offset"] = avatar.static_offset
    return {"layout_resolution": b.resolution, "meta": avatar.meta}, {k: v.detach().cpu().numpy() for k, v in arrays.items()}


def op_get(ctx: OpContext, req: Request) -> Part:
    a = Args(req)
    thing = _any_id(a, ops.Get.id)
    buffers = a.bool(ops.Get.buffers)
    a.done()
    if thing.startswith("jb_"):
        return Part({"job": ctx.jobs.get(thing)})
    if thing.startswith("sb_"):
        ctx.store.subject_dir(thing)
        return Part({"subject": next(s for s in ctx.store.subjects() if s["id"] == thing)})
    info = ctx.store.avatar_info(thing).to_json()
    if not buffers:
        return Part({"avatar": info})
    extra, arrays = avatar_buffers(ctx, thing)
    return Part({"avatar": info | extra}, arrays)


def op_delete(ctx: OpContext, req: Request) -> Part:
    a = Args(req)
    thing = _any_id(a, ops.Delete.id)
    a.done()
    user = ctx.jobs.uses(thing)
    if user is not None:
        raise WireError(ErrorCode.CONFLICT, f"delete: {thing} is in use by job {user}; cancel it first")
    if thing.startswith("av_"):
        ctx.store.delete_avatar(thing)
    elif thing.startswith("sb_"):
        ctx.store.delete_subject(thing)
    else:
        ctx.jobs.forget(thing)
    return Part({"deleted": thing})


def op_import(ctx: OpContext, req: Request) -> Iterator[Part]:
    """An avatar .npz sent as bytes (e.g. kept in a .blend) becomes a stored avatar.

    The arguments are checked here; reading and validating the file runs on the worker
    (a device op), so a large upload never holds up the thread that answers ``hello``."""
    a = Args(req)
    data = blob(a.array("file", ("<u1",), [(None,)]), "file", ctx.config.requests.max_upload_bytes)
    name = a.str(ops.Import.name)
    a.done()
    return _import(ctx, data, name)


def _import(ctx: OpContext, data: bytes, name: str | None) -> Iterator[Part]:
    from backend.gaussians.files import FileLimits, avatar_from_bytes, check_fits_head

    source = "the uploaded file"
    avatar = avatar_from_bytes(data, source, FileLimits(max_gaussians=ctx.config.requests.max_gaussians))
    ctx.engine.check_fits(avatar)
    check_fits_head(avatar, ctx.engine.head.data, source)
    info = ctx.store.put_avatar(ctx.store.new_id("av"), avatar, name=name, source="import")
    yield Part({"avatar": info.to_json()})


def op_cancel(ctx: OpContext, req: Request) -> Part:
    a = Args(req)
    jid = check_id(a.str(ops.Cancel.job), "jb", "job")
    a.done()
    return Part({"job": ctx.jobs.cancel(jid)})


def op_resume(ctx: OpContext, req: Request) -> Part:
    a = Args(req)
    jid = check_id(a.str(ops.Resume.job), "jb", "job")
    a.done()
    return Part({"job": ctx.jobs.resume(jid)})


def op_shutdown(ctx: OpContext, req: Request) -> Part:
    Args(req).done()
    ctx.request_stop()
    return Part({"stopping": True})
