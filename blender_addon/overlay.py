"""The backend's own splat rendering over the camera view of the 3D viewport.

A ``render`` of the avatar object at the scene camera (the request that compositing_frames
builds for final renders, at a fraction of the render size) comes back as premultiplied RGBA;
the pixels become a ``gpu`` texture that a ``SpaceView3D`` draw handler lays over the camera
frame while the viewport looks through the camera. The request and the pixel buffer are plain
numpy; only ``draw`` needs the ``gpu`` module, which background Blender does not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import bpy
import numpy as np

from . import avatars, compositing_frames, flame_data


@dataclass(frozen=True)
class OverlayConfig:
    render_timeout_s: float = 300.0  # a CPU backend may need minutes for a large frame; a resend would start it again


CONFIG = OverlayConfig()


class OverlayError(ValueError):
    """The scene cannot be rendered by the backend as it is (no camera, a scaled avatar, ...)."""


def render_request(scene: bpy.types.Scene, obj: bpy.types.Object, scale: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``render`` arguments and buffers: ``obj``'s avatar at the current frame, seen by the scene
    camera at ``scale`` times the render size (as Blender's own resolution percentage would)."""
    camera = scene.camera
    flame = getattr(obj, flame_data.PROP_GROUP).buffers()
    try:
        view = compositing_frames.blender_camera(camera, scene.render, scale)
        req = compositing_frames.render_request(avatars.avatar_id(obj), view, np.array(camera.matrix_world), np.array(obj.matrix_world), flame)
    except ValueError as e:  # no perspective camera, a scaled or sheared object, an empty render size
        raise OverlayError(str(e)) from None
    return req.args | {"depth": "none"}, req.arrays


def texture_pixels(rgba: np.ndarray) -> np.ndarray:
    """[H, W, 4] premultiplied RGBA, top row first (the service's order) -> the flat float32
    buffer a GPU texture takes, bottom row first (OpenGL's order)."""
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"rgba must have shape [H, W, 4], got {list(rgba.shape)}")
    return compositing_frames.bottom_up(rgba)


@dataclass
class Overlay:
    """The latest rendered frame and whether a new one is wanted."""

    pixels: np.ndarray | None = None  # texture_pixels of the last render
    width: int = 0
    height: int = 0
    version: int = 0  # bumped per new frame; the drawn texture is rebuilt when it changes
    wanted: bool = False
    in_flight: bool = False
    message: str = ""
    # What is drawn: the SpaceView3D draw handler while it is added, and the GPU texture
    # made from the frame of ``drawn_version``.
    handler: Any = None
    texture: Any = None
    drawn_version: int = -1

    def take(self, rgba: np.ndarray) -> None:
        self.pixels = texture_pixels(rgba)
        self.height, self.width = rgba.shape[:2]
        self.version += 1


def _camera_frame_in_region(context: bpy.types.Context) -> tuple[float, float, float, float] | None:
    """(x, y, width, height) of the camera frame in region pixels, or None when not looking through it."""
    from bpy_extras import view3d_utils

    rv3d, region, scene = context.region_data, context.region, context.scene
    if rv3d is None or rv3d.view_perspective != "CAMERA" or scene.camera is None:
        return None
    corners = [scene.camera.matrix_world @ v for v in scene.camera.data.view_frame(scene=scene)]
    pts = [view3d_utils.location_3d_to_region_2d(region, rv3d, c) for c in corners]
    if any(p is None for p in pts):
        return None
    xs, ys = [p.x for p in pts], [p.y for p in pts]
    return min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)


def draw(state: Overlay) -> None:
    """The draw handler (POST_PIXEL): the last frame as a premultiplied texture over the camera frame."""
    import gpu
    from gpu_extras.presets import draw_texture_2d

    if state.pixels is None:
        return
    rect = _camera_frame_in_region(bpy.context)
    if rect is None:
        return
    if state.drawn_version != state.version:
        buf = gpu.types.Buffer("FLOAT", state.pixels.size, state.pixels)
        state.texture = gpu.types.GPUTexture((state.width, state.height), format="RGBA32F", data=buf)
        state.drawn_version = state.version
    gpu.state.blend_set("ALPHA_PREMULT")
    draw_texture_2d(state.texture, rect[:2], rect[2], rect[3])
    gpu.state.blend_set("NONE")


def show(state: Overlay, on: bool) -> None:
    """Add or remove the draw handler of ``state``."""
    if on and state.handler is None:
        state.handler = bpy.types.SpaceView3D.draw_handler_add(draw, (state,), "WINDOW", "POST_PIXEL")
    elif not on and state.handler is not None:
        bpy.types.SpaceView3D.draw_handler_remove(state.handler, "WINDOW")
        state.handler, state.texture, state.drawn_version = None, None, -1
