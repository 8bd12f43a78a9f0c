"""Device operations: deform, render and export, with FLAME parameters and cameras from the wire."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from backend.head.params import POSE_FIELDS, FlameParams
from backend.render.camera import Cameras
from backend.server.args import Args
from backend.server.ops import OpContext, Part
from backend.server.store import check_id
from backend.wire import operations as ops
from backend.wire.protocol import Request

FLOATS = ("<f4", "<f2")
MAX_EXPR = 1000  # coefficients per frame; the model's own count is applied afterwards
ORTHONORMAL_TOLERANCE = 1e-3
_K_FIXED_AT = np.array([3, 6, 7, 8])  # K[1, 0], K[2, 0], K[2, 1], K[2, 2] of K flattened
_K_FIXED = np.array([0.0, 0.0, 0.0, 1.0], np.float32)
_W2C_ROW = np.array([0.0, 0.0, 0.0, 1.0], np.float32)
_EYE = np.eye(3)


def flame_from(a: Args, max_frames: int, frames: int | None = None) -> FlameParams:
    """Per-frame FLAME parameters from buffers ``expr`` [T, E] and optional ``rotation``,
    ``neck_pose``, ``jaw_pose`` [T, 3], ``eyes_pose`` [T, 6], ``translation`` [T, 3] (zero when
    absent). The identity is the avatar's, so ``shape`` is not taken. ``frames`` fixes T."""
    expr = a.array("expr", FLOATS, [(frames, None)])
    t, e = expr.shape
    if not 1 <= t <= max_frames:
        raise a.error(f"buffer 'expr' has {t} frames; send 1 to {max_frames} per request")
    if e > MAX_EXPR:
        raise a.error(f"buffer 'expr' has {e} coefficients per frame; at most {MAX_EXPR}")
    # One block for every pose field: a single tensor, viewed per field.
    pose = np.zeros((t, sum(POSE_FIELDS.values())), np.float32)
    column = 0
    for name, width in POSE_FIELDS.items():
        arr = a.array(name, FLOATS, [(t, width)], required=False)
        if arr is not None:
            pose[:, column : column + width] = arr
        column += width
    block = torch.from_numpy(pose)
    views = dict(zip(POSE_FIELDS, block.split(list(POSE_FIELDS.values()), dim=1)))
    return FlameParams(shape=torch.zeros(0), expr=torch.from_numpy(expr.astype(np.float32)), **views)


def cameras_from(a: Args, frames: int, width: int, height: int) -> Cameras:
    """[T, 1] cameras from ``intrinsics`` [3, 3] or [T, 3, 3] (pixels) and ``world_to_cam``
    [4, 4] or [T, 4, 4] (OpenCV: x right, y down, z forward; metres)."""
    K = a.array("intrinsics", FLOATS, [(3, 3), (frames, 3, 3)]).astype(np.float32).reshape(-1, 3, 3)
    w2c = a.array("world_to_cam", FLOATS, [(4, 4), (frames, 4, 4)]).astype(np.float32).reshape(-1, 4, 4)
    # Few whole-array operations, each about a microsecond on arrays this small, and no fancy
    # indexing by lists (several times that): this runs for every render request.
    k = K.reshape(-1, 9)
    if not ((k[:, 0:5:4] > 0).all() and (k[:, _K_FIXED_AT] == _K_FIXED).all()):
        raise a.error("buffer 'intrinsics' must be pinhole matrices [[fx, s, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0")
    R = w2c[:, :3, :3].astype(np.float64)
    if not (
        (w2c[:, 3] == _W2C_ROW).all()
        and np.abs(R @ R.transpose(0, 2, 1) - _EYE).max() <= ORTHONORMAL_TOLERANCE
        and (np.linalg.det(R) > 0).all()
    ):
        raise a.error("buffer 'world_to_cam' must be rigid transforms (a rotation and a translation, last row 0 0 0 1)")
    K_t, w2c_t = torch.from_numpy(K)[:, None], torch.from_numpy(w2c)[:, None]
    if K_t.shape[0] != frames:
        K_t = K_t.expand(frames, 1, 3, 3)
    if w2c_t.shape[0] != frames:
        w2c_t = w2c_t.expand(frames, 1, 4, 4)
    return Cameras(K_t, w2c_t, width, height)


def _index(count: int, wanted: int | None) -> np.ndarray | None:
    """Evenly spread Gaussians: the layout orders them over the UV grid, so every k-th covers the head."""
    if wanted is None or wanted >= count:
        return None
    return np.round(np.linspace(0, count - 1, wanted)).astype(np.int64)


def op_deform(ctx: OpContext, req: Request) -> Iterator[Part]:
    a = Args(req)
    aid = check_id(a.str(ops.Deform.avatar), "av", "avatar")
    info = ctx.store.avatar_info(aid)
    wanted = a.int(ops.Deform.max_gaussians, hi=info.gaussians)
    statics = a.bool(ops.Deform.statics)
    params = flame_from(a, ctx.config.requests.max_frames)
    a.done()
    index = _index(info.gaussians, wanted)

    def parts() -> Iterator[Part]:
        total = params.batch_size
        for t, (arrays, ms) in enumerate(ctx.engine.deform(aid, params, index)):
            if t == 0:
                if index is not None:
                    arrays["index"] = index.astype(np.int32)
                if statics:
                    arrays.update(ctx.engine.statics(aid, index))
            yield Part(
                {"frame": t, "frames": total, "gaussians": len(arrays["positions"]), "deform_ms": round(ms, 3)}, arrays, t == total - 1
            )

    return parts()


def op_render(ctx: OpContext, req: Request) -> Iterator[Part]:
    a = Args(req)
    lim = ctx.config.requests
    aid = check_id(a.str(ops.Render.avatar), "av", "avatar")
    ctx.store.avatar_info(aid)
    width = a.int(ops.Render.width, hi=lim.max_image_side)
    height = a.int(ops.Render.height, hi=lim.max_image_side)
    rgba = a.str(ops.Render.rgba)
    depth = a.str(ops.Render.depth)
    background = a.floats(ops.Render.background)
    crop = a.bool(ops.Render.crop)
    shared = a.bool(ops.Render.shared_memory)
    if crop and background is not None:
        raise a.error("'crop' needs a transparent frame: leave out 'background'")
    params = flame_from(a, lim.max_frames)
    cameras = cameras_from(a, params.batch_size, width, height)
    a.done()

    def parts() -> Iterator[Part]:
        total = params.batch_size
        # Frames asked for in shared memory are copied off the device straight into a slot.
        lend = ctx.slots.reserve if shared and ctx.slots is not None else None
        frames = ctx.engine.render(aid, params, cameras, rgba, None if depth == "none" else depth, background, crop, lend=lend)
        for t, (arrays, window, ms) in enumerate(frames):
            result = {"frame": t, "frames": total, "render_ms": round(ms, 3)} | ({"window": list(window)} if crop else {})
            yield Part(result, arrays, t == total - 1, shared)

    return parts()


def op_export(ctx: OpContext, req: Request) -> Iterator[Part]:
    a = Args(req)
    aid = check_id(a.str(ops.Export.avatar), "av", "avatar")
    info = ctx.store.avatar_info(aid)
    fmt = a.str(ops.Export.format)
    params = flame_from(a, 1, frames=1) if fmt == "ply" and "expr" in req.arrays else None
    a.done()

    def parts() -> Iterator[Part]:
        if fmt == "npz":
            data = ctx.store.avatar_bytes(aid)
        else:
            data = ctx.engine.ply(aid, params if params is not None else FlameParams.neutral(1, 0, 0))
        yield Part({"format": fmt, "bytes": len(data), "gaussians": info.gaussians}, {"file": np.frombuffer(data, np.uint8)})

    return parts()
