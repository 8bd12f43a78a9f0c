"""Composited final renders: the service renders every avatar object at the scene camera, and
Blender's compositor Z-combines that over its own render.

How a render goes (F12, Ctrl-F12 and ``blender -b shot.blend -a`` alike; timers never run):

* ``render_init`` opens one job (``compositing_job``): one client, ``hello``, and every avatar
  found on the backend (importing the file a .blend carries when the backend lacks it, see
  ``compositing_avatars``).
* ``frame_change_post`` fires once per rendered frame, after Blender evaluated the frame's
  depsgraph and before its render engine and compositor run. The job reads the evaluated
  camera, each avatar object's ``matrix_world`` and animated FLAME properties
  (``compositing_requests``), takes the reply already requested for exactly that request or
  asks the service now, waits for it (with a timeout) and writes the merged RGBA and depth
  into the two images the compositor graph reads (``compositing_nodes``).
* Prefetch: in an animation render the job also keeps ``CompositeConfig.prefetch_frames``
  frames in flight, requesting the next ones from their F-curves, so the service renders them
  while Blender renders this one. It starts at the first frame when the render is known to be
  an animation (``blender -b ... -a`` or the batch wrapper, see ``animation_render``), and at
  the second otherwise (F12 and Ctrl-F12 look alike at their first frame).
* ``render_complete`` / ``render_cancel`` close the job and keep its per-frame times in
  ``runtime.RUNTIME.render_stats``.

A failure (no backend, an avatar the backend lacks, a non-perspective camera) never passes
as a frame without the head: in background mode the handler ends Blender with status 1
before the frame is written; in the UI it raises (the message lands in the console and the
Info log) and the frame shows the error colour.

Scripts call ``setup_compositing(scene)`` (and ``is_set_up``) from here; ``render_settings``
says where renders go.
"""

from __future__ import annotations

import sys

import bpy
import numpy as np
from bpy.app.handlers import persistent

from . import avatars, compositing_job, runtime
from . import compositing_frames as frames
from .compositing_job import RenderJob, open_job, render_settings  # noqa: F401  (render_settings: the operators' entry point)
from .compositing_nodes import is_set_up, render_size, setup_compositing, write_images  # noqa: F401  (the scripts' entry points)
from .compositing_requests import CompositeError


def _fail(job: RenderJob, message: str) -> None:
    """Stop a frame that would lack its avatars: exit in background mode, raise in the UI."""
    job.error = message
    print(f"SpatialAvatar: {message}", file=sys.stderr, flush=True)
    if bpy.app.background:
        # Blender turns SystemExit from a handler into its own exit (status 1) before the frame is written.
        raise SystemExit(f"SpatialAvatar: render stopped: {message}")
    raise CompositeError(message)


def _finish() -> None:
    state = runtime.RUNTIME
    if state.render_job is not None:
        state.render_stats = state.render_job.close()
    state.render_job = None


@persistent
def _on_render_init(scene: bpy.types.Scene, _depsgraph: object = None) -> None:
    _finish()
    if not is_set_up(scene):
        return
    w, h = render_size(scene)
    write_images(np.zeros((h, w, 4), np.float32), np.full((h, w), frames.FAR_DEPTH, np.float32))  # no stale head
    if not avatars.scene_avatars(scene, rendered=True):
        return
    try:
        runtime.RUNTIME.render_job = open_job(scene)
    except CompositeError as e:
        runtime.RUNTIME.render_job = job = RenderJob(None, "", {})
        _fail(job, str(e))


@persistent
def _on_frame_change_post(scene: bpy.types.Scene, depsgraph: bpy.types.Depsgraph | None = None) -> None:
    job = runtime.RUNTIME.render_job
    if job is None or depsgraph is None:
        return
    if job.error is None:
        try:
            job.render_frame(scene, depsgraph)
            return
        except CompositeError as e:
            job.error = str(e)
    w, h = render_size(scene)
    write_images(np.broadcast_to(np.float32(compositing_job.CONFIG.error_rgba), (h, w, 4)), np.zeros((h, w), np.float32))
    _fail(job, job.error)


@persistent
def _on_render_end(_scene: bpy.types.Scene, _depsgraph: object = None) -> None:
    _finish()


_HANDLERS = (
    ("render_init", _on_render_init),
    ("frame_change_post", _on_frame_change_post),
    ("render_complete", _on_render_end),
    ("render_cancel", _on_render_end),
)


def register() -> None:
    for name, fn in _HANDLERS:
        getattr(bpy.app.handlers, name).append(fn)


def unregister() -> None:
    _finish()
    for name, fn in _HANDLERS:
        handlers = getattr(bpy.app.handlers, name)
        if fn in handlers:
            handlers.remove(fn)
