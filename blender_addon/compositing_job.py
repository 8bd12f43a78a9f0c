"""One final render's work with the service, from ``render_init`` to its end: one client, each
frame's replies waited for (with a timeout), and in an animation the next frames kept in
flight (prefetch), so the service renders them while Blender renders this one.

Requests are keyed by frame and a fingerprint of the request; a reply whose request no longer
matches what the frame evaluates to is forgotten, never used. Where F-curves cannot predict
a frame (``compositing_requests.unpredictable``), each frame is requested when it is reached.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import bpy
import numpy as np

from . import avatars, compositing_avatars, connection, preferences
from . import compositing_frames as frames
from . import compositing_nodes as nodes
from .compositing_requests import CompositeError, frame_requests, predicted_requests, unpredictable

try:
    from .wire.environment import ANIMATION_ENV, ENDPOINT_ENV
except ImportError:  # a development checkout: the same module, from the backend package
    from backend.wire.environment import ANIMATION_ENV, ENDPOINT_ENV

ops = connection.wire_operations


@dataclass(frozen=True)
class CompositeConfig:
    """How long a frame may take and what a failed frame looks like."""

    frame_timeout_s: float = 300.0  # a CPU backend may need minutes for a 4K frame
    retries: int = 0  # a resent render would only start the same work again
    error_rgba: tuple[float, float, float, float] = (1.0, 0.0, 1.0, 1.0)
    # Frames of an animation render requested at once, the one being composited included
    # (1 or less: each frame when it is reached). Each holds one reply per avatar until it is
    # used: about 40 MB at 1920x1080 (float32 RGBA and depth).
    prefetch_frames: int = 4
    wait_poll_ms: int = 50  # a frame waiting for its replies wakes at least this often to check its deadline


CONFIG = CompositeConfig()


@dataclass
class FrameStats:
    """Where one frame's time went (seconds): the handler's wall time, its wait for the
    replies, the service's own render; and whether every reply was requested ahead."""

    frame: int
    handler_s: float
    request_s: float
    service_s: float
    prefetched: bool = False


def render_settings() -> connection.Settings:
    """The preferences' connection settings (defaults when the add-on is registered without
    preferences, as in a development checkout), with ``$SPATIALAVATAR_ENDPOINT`` on top."""
    addon = bpy.context.preferences.addons.get(__package__)
    s = preferences.settings() if addon is not None and addon.preferences is not None else connection.Settings()
    endpoint = os.environ.get(ENDPOINT_ENV, "").strip()
    return connection.Settings(endpoint or s.endpoint, CONFIG.frame_timeout_s, CONFIG.retries, s.key_dir)


def animation_render() -> bool:
    """Whether this process is known to render an animation: Blender started in background mode
    with ``-a`` / ``--render-anim``, or ``ANIMATION_ENV`` set to "1". Blender tells a
    ``render_init`` handler nothing more, so an animation started from the UI is recognised at
    its second frame."""
    if os.environ.get(ANIMATION_ENV) == "1":
        return True
    return bpy.app.background and any(arg in ("-a", "--render-anim") for arg in sys.argv)


@dataclass
class RenderJob:
    """One render job (render_init to render_complete / render_cancel)."""

    client: connection.wire_client.Client | None
    endpoint: str
    shown: dict[str, str]  # object name -> backend avatar id
    error: str | None = None
    stats: list[FrameStats] = field(default_factory=list)
    # (frame, fingerprint of the request) -> request id: a reply is used only for the frame
    # and the exact request it was made from.
    in_flight: dict[tuple[int, str], str] = field(default_factory=dict)
    replies: dict[str, connection.Reply] = field(default_factory=dict)  # final replies not yet used, by request id
    unpredictable: str | None = None  # why later frames cannot be requested ahead ("": they can; None: not asked yet)
    animation: bool = False  # known at render_init to be an animation render: prefetch from its first frame
    shared: bool = False  # the service is on this machine: frames come through shared memory

    def render_frame(self, scene: bpy.types.Scene, depsgraph: bpy.types.Depsgraph) -> None:
        """Composite the frame Blender evaluated: claim or send its requests, keep the next
        frames in flight, wait for the replies and write the merged images."""
        t0 = time.perf_counter()
        frame = scene.frame_current
        requests = frame_requests(scene, depsgraph, self.shown)
        claimed = [self.in_flight.pop((frame, frames.fingerprint(req)), None) for req in requests]
        ids = [rid if rid is not None else self._submit(req) for rid, req in zip(claimed, requests)]
        # What is left for this frame (or one passed) was made from parameters that changed since.
        self._forget([key for key in self.in_flight if key[0] <= frame])
        if self.stats or self.animation:  # an animation: keep its next frames in flight
            self._prefetch(scene, frame)
        deadline = time.monotonic() + CONFIG.frame_timeout_s
        layers, request_s, service_s = [], 0.0, 0.0
        for req, rid in zip(requests, ids):
            t1 = time.perf_counter()
            layer, render_ms = self._reply(rid, req, deadline)
            request_s += time.perf_counter() - t1
            service_s += render_ms / 1e3
            layers.append(layer)
        nodes.write_images(*frames.combine_layers(layers))
        self.stats.append(FrameStats(frame, time.perf_counter() - t0, request_s, service_s, all(r is not None for r in claimed)))

    def close(self) -> list[FrameStats]:
        """Forget what is still in flight, close the client; the per-frame times."""
        if self.client is not None:
            self._forget(list(self.in_flight))
            self.client.close()
        self.replies.clear()
        return self.stats

    def _submit(self, req: frames.RenderRequest) -> str:
        # A request queued behind the window's others stays silent longer than one frame's timeout;
        # each frame's own wait is timed in ``_reply``.
        try:
            args = req.args | (ops.Render.args(shared_memory=True) if self.shared else {})
            return self.client.submit(ops.Render.op, args, req.arrays, timeout_s=CONFIG.frame_timeout_s * max(1, CONFIG.prefetch_frames))
        except connection.UserError as e:
            raise CompositeError(f"the backend at {self.endpoint} did not render avatar {req.args['avatar']}: {e}") from e

    def _forget(self, keys: list[tuple[int, str]]) -> None:
        for key in keys:
            rid = self.in_flight.pop(key)
            self.client.forget(rid)
            self.replies.pop(rid, None)

    def _prefetch(self, scene: bpy.types.Scene, frame: int) -> None:
        """Request the window's frames after ``frame`` that are not in flight yet."""
        if self.unpredictable is None:
            self.unpredictable = unpredictable(scene, self.shown) or ""
            if self.unpredictable:
                print(f"SpatialAvatar: frames are requested as they are reached: {self.unpredictable}", file=sys.stderr, flush=True)
        if self.unpredictable:
            return
        ahead = {f for f, _ in self.in_flight}
        for f in frames.window(frame, scene.frame_end, scene.frame_step, CONFIG.prefetch_frames):
            if f in ahead:
                continue
            try:
                for req in predicted_requests(scene, self.shown, f):
                    key = (f, frames.fingerprint(req))
                    if key not in self.in_flight:
                        self.in_flight[key] = self._submit(req)
            except CompositeError:
                continue  # that frame fails with its message when it is reached

    def _reply(self, rid: str, req: frames.RenderRequest, deadline: float) -> tuple[tuple[np.ndarray, np.ndarray], float]:
        """The layer (``frames.layer``) of request ``rid`` and the service's milliseconds for it,
        waiting for its final reply until ``deadline`` (``time.monotonic`` seconds)."""
        aid = req.args["avatar"]
        while rid not in self.replies:
            for r in self.client.poll(wait_ms=CONFIG.wait_poll_ms):
                if r.final:
                    self.replies[r.id] = r
            if rid in self.replies:
                break
            if time.monotonic() > deadline:
                self.client.forget(rid)
                raise CompositeError(f"the backend at {self.endpoint} did not render avatar {aid} within {CONFIG.frame_timeout_s:g} s")
        try:
            reply = self.replies.pop(rid).raise_for_error()
            return frames.layer(req, reply.arrays, reply.result), float(reply.result.get("render_ms", 0.0))
        except connection.UserError as e:
            raise CompositeError(f"the backend at {self.endpoint} did not render avatar {aid}: {e}") from e


def open_job(scene: bpy.types.Scene) -> RenderJob:
    """A job for this render: the backend answers ``hello`` and has (or now imports) every
    rendered avatar object's avatar; CompositeError otherwise."""
    s = render_settings()
    if why := preferences.blocked(s):
        raise CompositeError(why)
    client = connection.open_client(s)
    try:
        hello = client.call(ops.Hello.op, timeout_s=min(s.timeout_s, 10.0)).result
    except connection.UserError as e:
        client.close()
        raise CompositeError(f"no SpatialAvatar backend answers at {s.endpoint} ({e}); start `spatialavatar serve` first") from e
    try:
        shown = {o.name: compositing_avatars.resolve(client, o, avatars.avatar_id(o)) for o in avatars.scene_avatars(scene, rendered=True)}
    except (compositing_avatars.MissingAvatar, connection.UserError) as e:
        client.close()
        raise CompositeError(f"the backend at {s.endpoint} cannot provide every avatar: {e}") from e
    return RenderJob(client, s.endpoint, shown, animation=animation_render(), shared=connection.wire_client.can_share(hello))
