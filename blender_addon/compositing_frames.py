"""One composited frame's data, without bpy: the scene camera as the shared camera conversion
takes it, the service's render request of an avatar object (for final renders and the viewport
overlay alike), and the merge of several avatars' layers into the two images Blender's
compositor reads.

Images from the service are [H, W, ...] with row 0 at the top, RGB premultiplied by alpha
(linear), depth planar camera-space z in metres (0 where empty). Blender's image buffers
start at the bottom row, and its render's depth is in Blender units with a far value where
nothing is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    from .wire import blender_camera_math as bcm
    from .wire import operations as ops
    from .wire import windows
except ImportError:  # a development checkout: the same modules, from the backend package
    from backend.wire import blender_camera_math as bcm
    from backend.wire import operations as ops
    from backend.wire import windows

FAR_DEPTH = 1.0e10  # what Blender's renders put in the depth pass where nothing is


@dataclass(frozen=True)
class RenderRequest:
    """The service's ``render`` of one avatar object at one frame, and how to read its depth."""

    args: dict[str, Any]
    arrays: dict[str, np.ndarray]
    depth_scale: float  # service metres -> Blender units (the object's uniform scale)


def blender_camera(camera: Any, render: Any, scale: float = 1.0) -> bcm.BlenderCamera:
    """What the conversion needs of the scene's camera object (``scene.camera``, evaluated or
    not) and ``scene.render``, at ``scale`` times the render size (as a resolution percentage
    would). ValueError when there is no camera or it is not perspective."""
    if camera is None or camera.type != "CAMERA":
        raise ValueError("the scene has no camera")
    cam = camera.data
    if cam.type != "PERSP":
        kind = {"ORTHO": "orthographic", "PANO": "panoramic"}.get(cam.type, cam.type.lower())
        raise ValueError(f"camera '{camera.name}' is {kind}; the backend renders through perspective cameras only")
    return bcm.BlenderCamera(
        cam.lens, cam.sensor_width, cam.sensor_height, cam.sensor_fit, cam.shift_x, cam.shift_y,
        render.resolution_x, render.resolution_y, max(1, round(render.resolution_percentage * scale)),
        render.pixel_aspect_x, render.pixel_aspect_y,
    )


def render_request(
    avatar_id: str,
    camera: bcm.BlenderCamera,
    camera_matrix_world: bcm.Matrix4,
    avatar_matrix_world: bcm.Matrix4,
    flame: Mapping[str, np.ndarray],
    crop: bool = False,
) -> RenderRequest:
    """The request that renders ``avatar_id`` as Blender would see its object through ``camera``;
    ``crop``: the service sends only the window the avatar covers (``layer`` restores the frame)."""
    width, height = camera.size
    world_to_cam, scale = bcm.avatar_world_to_cam(camera_matrix_world, avatar_matrix_world)
    arrays = {"intrinsics": camera.K().astype(np.float32), "world_to_cam": world_to_cam.astype(np.float32), **flame}
    args = ops.Render.args(avatar=avatar_id, width=width, height=height, rgba="<f4", depth="<f4") | (ops.Render.args(crop=True) if crop else {})
    return RenderRequest(args, arrays, scale)


def layer(req: RenderRequest, arrays: Mapping[str, np.ndarray], result: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The reply to ``req`` as one of ``combine_layers``' layers: whole-frame rgba [H, W, 4] and
    depth [H, W] in Blender units. Raises the wire's error for a window that does not fit."""
    full = windows.full_frame(arrays, result, req.args["width"], req.args["height"])
    return full["rgba"], full["depth"] * req.depth_scale


def fingerprint(req: RenderRequest) -> str:
    """A digest of everything a request's image depends on: equal digests, equal images."""
    h = hashlib.sha256(json.dumps(req.args, sort_keys=True).encode())
    h.update(repr(float(req.depth_scale)).encode())
    for name in sorted(req.arrays):
        a = np.ascontiguousarray(req.arrays[name])
        h.update(f"{name} {a.dtype.str} {a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def window(frame: int, last: int, step: int, size: int) -> range:
    """The frames an animation render reaches after ``frame`` (every ``step`` up to ``last``)
    that belong in flight with it: ``size`` frames in flight, ``frame`` included."""
    return range(frame + step, last + 1, max(1, step))[: max(0, size - 1)]


def combine_layers(layers: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Several avatars' premultiplied layers merged per pixel, nearest first.

    Args:
        layers: (rgba [H, W, 4] premultiplied, depth [H, W] Blender units, 0 where empty).

    Returns:
        rgba [H, W, 4] premultiplied, and depth [H, W] of the nearest covered layer
        (``FAR_DEPTH`` where no layer covers the pixel).
    """
    rgba = np.stack([np.asarray(c, np.float32) for c, _ in layers])  # [L, H, W, 4]
    depth = np.stack([np.where((np.asarray(d) > 0) & (c[..., 3] > 0), d, np.inf) for c, d in layers]).astype(np.float32)
    order = np.argsort(depth, axis=0, kind="stable")
    rgba = np.take_along_axis(rgba, order[..., None], axis=0)
    depth = np.take_along_axis(depth, order, axis=0)
    out = np.zeros(rgba.shape[1:], np.float32)
    for layer in rgba:  # front to back: each layer shows through what is in front of it
        out += layer * (1.0 - out[..., 3:4])
    nearest = depth[0]
    return out, np.where(np.isfinite(nearest), nearest, FAR_DEPTH).astype(np.float32)


def bottom_up(image: np.ndarray) -> np.ndarray:
    """An [H, W, C] image, top row first (the service's order) -> the flat float32 buffer that
    Blender images and GPU textures take, bottom row first."""
    return np.ascontiguousarray(image[::-1], np.float32).ravel()


def blender_pixels(rgba: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat float32 buffers for ``Image.pixels.foreach_set``: the colour image, and a depth
    image holding the depth in every channel (alpha 1); both bottom row first."""
    h, w = depth.shape
    depth_px = np.empty((h, w, 4), np.float32)
    depth_px[..., :3] = depth[..., None]
    depth_px[..., 3] = 1.0
    return bottom_up(rgba), bottom_up(depth_px)
