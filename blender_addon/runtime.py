"""The add-on's running state, in one object (``RUNTIME``), and the one timer that pumps it.

``RUNTIME`` holds everything the add-on keeps while Blender runs and never saves in the
.blend: the backend's status the panel shows, the ``Session`` to the service, the background
tasks, the live preview and the overlay, the final render in progress and the last one's
timings, and the panel's portrait thumbnails. One ``bpy.app.timers`` timer that never waits
pumps the session, the preview and the overlay.

The timer runs while anything is awaited and stops itself afterwards. A frame change
(``frame_change_post``) marks the avatar objects for a new pose and starts the timer after a
short debounce, so scrubbing sends the newest frame instead of every one.

When a request gets no reply (``lost``), the same timer keeps a heartbeat: every
``TimerConfig.heartbeat_s`` it reads the last ``hello``'s answer and sends a new one on a
fresh socket, never waiting, until the backend answers (``found``); tasks whose job was lost
then look at it again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import bpy
import bpy.utils.previews
from bpy.app.handlers import persistent

from . import avatars, connection, overlay, preferences, preview, scene_props, tasks

ops = connection.wire_operations

if TYPE_CHECKING:
    from .compositing_job import FrameStats, RenderJob


@dataclass(frozen=True)
class TimerConfig:
    interval_s: float = 0.005  # polling period while replies are awaited (a poll costs microseconds)
    debounce_s: float = 0.01  # wait after a frame change before asking for the pose
    heartbeat_s: float = 3.0  # between two hellos while the backend is lost


TIMER = TimerConfig()


class Runtime:
    """The add-on's running state, the one place it is kept (not saved with the .blend)."""

    def __init__(self) -> None:
        # What the panel shows of the backend; filled by the operators and the heartbeat.
        self.status: dict[str, Any] = {"text": "Not connected", "ok": False, "info": None, "avatars": []}
        self.session: connection.Session | None = None
        self.retired: list[connection.Session] = []  # sessions of older preferences, pumped until their replies are in
        self.tasks: list[tasks.Task] = []
        self.preview = preview.Preview()
        self.overlay = overlay.Overlay()
        self.looking = False  # the backend is lost: the heartbeat runs
        self._probe: connection.Session | None = None  # the heartbeat's latest hello, on a socket of its own
        self._next_beat = 0.0  # time.monotonic() of the next hello
        self.render_job: RenderJob | None = None  # the final render in progress (render_init to its end)
        self.render_stats: list[FrameStats] = []  # the last finished render's per-frame times (benchmarks read them)
        self.thumbnails: bpy.utils.previews.ImagePreviewCollection | None = None  # the panel's portrait previews, while registered

    def session_for(self, settings: connection.Settings) -> connection.Session:
        """The session for the current preferences. When they changed, new requests go to the
        new address while the old session finishes what it awaits."""
        if self.session is not None and self.session.settings != settings:
            self.retired.append(self.session)
            self.session = None
        if self.session is None:
            self.session = connection.Session(settings, on_unreachable=lost)
        return self.session

    def _sessions(self) -> list[connection.Session]:
        return [*self.retired, *([self.session] if self.session is not None else [])]

    def start(self, task: tasks.Task, settings: connection.Settings) -> None:
        self.tasks.append(task)
        task.start(self.session_for(settings))
        ensure_timer()

    @property
    def busy(self) -> bool:
        return any(s.busy for s in self._sessions()) or bool(self.preview.dirty) or self.overlay.wanted

    def tick(self) -> float | None:
        """Deliver what arrived, send what is due; the next interval, or None when idle."""
        for s in self._sessions():
            s.pump()
        for s in [s for s in self.retired if not s.busy]:
            s.close()
            self.retired.remove(s)
        if self.preview.dirty or self.overlay.wanted:
            session = self.session_for(preferences.settings())
            self.preview.send(session.submit)
            self._send_overlay(bpy.context.scene, session)
        self._beat()
        redraw()
        if self.busy:
            return TIMER.interval_s
        return max(TIMER.interval_s, self._next_beat - time.monotonic()) if self.looking else None

    def look_for_backend(self) -> None:
        """Start the heartbeat (its first hello after one interval: the failure was just now)."""
        if not self.looking:
            self.looking, self._next_beat = True, time.monotonic() + TIMER.heartbeat_s
        ensure_timer()

    def backend_found(self) -> None:
        """Stop the heartbeat; tasks that lost their job follow it again on the current session."""
        self.looking = False
        self._drop_probe()
        lost_tasks = [t for t in self.tasks if t.progress.state == tasks.LOST]
        if lost_tasks:
            session = self.session_for(preferences.settings())
            for t in lost_tasks:
                t.follow_again(session)
            ensure_timer()

    def _beat(self) -> None:
        if self._probe is not None:
            self._probe.pump()  # an answer calls found(), which stops the heartbeat
        if not self.looking or time.monotonic() < self._next_beat:
            return
        # A fresh socket each time: the last one may be stuck on the backend that went away.
        self._drop_probe()
        self._next_beat = time.monotonic() + TIMER.heartbeat_s
        settings = preferences.settings()
        if preferences.blocked(settings):
            return
        try:
            self._probe = connection.Session(settings)
            self._probe.submit(ops.Hello.op, on_reply=_on_hello)
        except connection.UserError:  # e.g. the key folder is unreadable now; the next beat tries again
            self._drop_probe()

    def _drop_probe(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None

    def _send_overlay(self, scene: bpy.types.Scene, session: connection.Session) -> None:
        if not self.overlay.wanted or self.overlay.in_flight:
            return
        self.overlay.wanted = False
        obj = overlay_target(scene)
        if obj is None:
            self.overlay.message = "No avatar object in the scene"
            return
        try:
            args, arrays = overlay.render_request(scene, obj, scene_props.get(scene).overlay_scale)
            if self.status["info"] is not None and connection.wire_client.can_share(self.status["info"]):
                args |= ops.Render.args(shared_memory=True)  # a backend on this machine: the frame skips the socket
            session.submit(ops.Render.op, args, arrays, on_reply=self._on_render, timeout_s=overlay.CONFIG.render_timeout_s)
        except (overlay.OverlayError, connection.UserError) as e:
            self.overlay.message = str(e)
            return
        self.overlay.in_flight = True

    def _on_render(self, reply: connection.Reply) -> None:
        self.overlay.in_flight = False
        if reply.error is not None:
            self.overlay.message = reply.error.message
            return
        self.overlay.take(reply.arrays["rgba"])
        self.overlay.message = ""

    def close(self) -> None:
        """Drop the connection; jobs already queued keep running on the service (their avatars
        appear in its list)."""
        self.tasks.clear()
        for s in self._sessions():
            s.close()
        self.session, self.retired = None, []
        self.looking = False
        self._drop_probe()
        self.preview.reset()


RUNTIME = Runtime()
status = RUNTIME.status  # the same dict, under the name the operators import


def lost(message: str) -> None:
    """A request got no reply after all its retries: the status says so until the backend answers."""
    RUNTIME.status.update(text=f"No backend: {message}", ok=False, info=None)
    RUNTIME.look_for_backend()


def found(info: dict[str, Any]) -> None:
    """The backend answered ``hello`` (the heartbeat's or Test Connection's)."""
    RUNTIME.status.update(text=connection.describe(info), ok=True, info=info)
    RUNTIME.backend_found()


def _on_hello(reply: connection.Reply) -> None:
    if reply.error is None:
        found(reply.result)


def overlay_target(scene: bpy.types.Scene) -> bpy.types.Object | None:
    """The active object when it shows an avatar, else the scene's first avatar object."""
    active = bpy.context.view_layer.objects.active if bpy.context.view_layer else None
    if active is not None and avatars.avatar_id(active) and active.name in scene.objects:
        return active
    found = avatars.scene_avatars(scene)
    return found[0] if found else None


def _timer() -> float | None:
    return RUNTIME.tick()


def ensure_timer(first_interval: float = 0.0) -> None:
    if not bpy.app.timers.is_registered(_timer):
        bpy.app.timers.register(_timer, first_interval=first_interval, persistent=True)


def redraw() -> None:
    wm = bpy.context.window_manager
    for window in wm.windows if wm else ():
        for area in window.screen.areas if window.screen else ():
            if area.type == "VIEW_3D":
                area.tag_redraw()


def preview_switched(scene: bpy.types.Scene, on: bool) -> None:
    if on:
        RUNTIME.preview.mark(scene)
        ensure_timer(TIMER.debounce_s)
    else:
        RUNTIME.preview.dirty.clear()


def overlay_switched(scene: bpy.types.Scene, on: bool) -> None:
    overlay.show(RUNTIME.overlay, on)
    RUNTIME.overlay.wanted = on
    if on:
        ensure_timer()


@persistent
def on_frame_change(scene: bpy.types.Scene, depsgraph: bpy.types.Depsgraph | None = None) -> None:
    props = scene_props.get(scene)
    if props.live_preview:
        RUNTIME.preview.mark(scene)
    if props.overlay:
        RUNTIME.overlay.wanted = True
    if props.live_preview or props.overlay:
        ensure_timer(TIMER.debounce_s)


@persistent
def on_load(*_args: object) -> None:
    """A new file: forget the old file's objects; draw the overlay if the new one wants it."""
    RUNTIME.preview.reset()
    overlay.show(RUNTIME.overlay, False)  # before the old overlay, which holds the draw handler, is dropped
    RUNTIME.overlay = overlay.Overlay()
    scene = bpy.context.scene
    if scene is not None and scene_props.get(scene).overlay:
        overlay_switched(scene, True)


def register() -> None:
    bpy.app.handlers.frame_change_post.append(on_frame_change)
    bpy.app.handlers.load_post.append(on_load)


def unregister() -> None:
    for handlers, fn in ((bpy.app.handlers.frame_change_post, on_frame_change), (bpy.app.handlers.load_post, on_load)):
        if fn in handlers:
            handlers.remove(fn)
    if bpy.app.timers.is_registered(_timer):
        bpy.app.timers.unregister(_timer)
    overlay.show(RUNTIME.overlay, False)
    RUNTIME.close()
