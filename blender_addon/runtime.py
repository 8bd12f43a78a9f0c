"""What runs while the artist works: the ``Session`` to the service, the background tasks,
the live preview and the overlay, all pumped by one ``bpy.app.timers`` timer that never waits.

The timer runs while anything is awaited and stops itself afterwards. A frame change
(``frame_change_post``) marks the avatar objects for a new pose and starts the timer after a
short debounce, so scrubbing sends the newest frame instead of every one.
"""

from __future__ import annotations

from dataclasses import dataclass

import bpy
from bpy.app.handlers import persistent

from . import avatars, connection, overlay, preferences, preview, scene_props, tasks


@dataclass(frozen=True)
class TimerConfig:
    interval_s: float = 0.005  # polling period while replies are awaited (a poll costs microseconds)
    debounce_s: float = 0.01  # wait after a frame change before asking for the pose


TIMER = TimerConfig()


class Runtime:
    """The add-on's running state (not saved with the .blend)."""

    def __init__(self) -> None:
        self.session: connection.Session | None = None
        self.retired: list[connection.Session] = []  # sessions of older preferences, pumped until their replies are in
        self.tasks: list[tasks.Task] = []
        self.preview = preview.Preview()
        self.overlay = overlay.Overlay()

    def session_for(self, settings: connection.Settings) -> connection.Session:
        """The session for the current preferences. When they changed, new requests go to the
        new address while the old session finishes what it awaits."""
        if self.session is not None and self.session.settings != settings:
            self.retired.append(self.session)
            self.session = None
        if self.session is None:
            self.session = connection.Session(settings)
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
        redraw()
        return TIMER.interval_s if self.busy else None

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
            session.submit("render", args, arrays, on_reply=self._on_render, timeout_s=overlay.CONFIG.render_timeout_s)
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
        self.preview.reset()


RUNTIME = Runtime()


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
    RUNTIME.overlay = overlay.Overlay()
    scene = bpy.context.scene
    overlay.show(RUNTIME.overlay, False)
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
