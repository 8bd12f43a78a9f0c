"""Blender camera <-> backend camera: the one place for these conversions (numpy only, no torch).

It lives in ``backend/wire`` so that the Blender add-on and the backend use the same code
(the extension carries the folder as its ``wire/``).

Frames:
    * Backend world: FLAME's, +y up, +z toward where the face looks (metres).
    * Blender world: +z up. ``BLENDER_FROM_WORLD`` maps backend (x, y, z) to Blender
      (x, -z, y): a +90 degree turn about x, so the face looks along Blender's -Y, i.e.
      toward a camera in Blender's "Front" view. An avatar object in Blender holds the
      backend-world points in its local frame, so its ``matrix_world`` is its own
      ``blender_from_world``.
    * Blender camera object: looks down its local -Z with +Y up and +X right.
      OpenCV camera = Blender camera with y and z negated.

Intrinsics follow Blender's ``BKE_camera_params_compute_viewplane`` (what EEVEE, Workbench
and Cycles agree on). With the render size W = res_x * res_percent // 100,
H = res_y * res_percent // 100 (Blender's integer rule), pixel aspect (ax, ay) and
ycor = ay / ax:

    fit     = sensor_fit, where AUTO -> HORIZONTAL if ax * W >= ay * H else VERTICAL
    sensor  = sensor_height if sensor_fit == VERTICAL else sensor_width
              (AUTO always uses sensor_width, applied to the fitted dimension)
    viewfac = W if fit == HORIZONTAL else ycor * H   (the fitted extent, in x-pixel units)
    fx = lens * viewfac / sensor
    fy = fx / ycor
    cx = W / 2 - shift_x * viewfac
    cy = H / 2 + shift_y * viewfac / ycor

So a shift of s moves the principal point by s times the fitted dimension (the larger one
under AUTO with square pixels): left for +shift_x, up for +shift_y. Blender's view plane
spans the image's pixel edges, which matches the backend's convention that pixel (0, 0)'s
centre is at (0.5, 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

SensorFit = Literal["AUTO", "HORIZONTAL", "VERTICAL"]
Matrix4 = np.ndarray | Sequence[Sequence[float]]
UNIFORM_SCALE_TOLERANCE = 1e-4  # relative spread of an object's axis lengths still called uniform

# Backend world (x, y, z) -> Blender world (x, -z, y).
BLENDER_FROM_WORLD = np.array(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, -1.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)

# Blender camera axes (x right, y up, looking down -z) -> OpenCV (x right, y down, z forward).
CV_FROM_BLENDER_CAMERA = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass(frozen=True)
class BlenderCamera:
    """What Blender's render uses of a perspective camera and the scene's output settings.

    Attributes:
        lens_mm: ``camera.data.lens``, millimetres.
        sensor_width, sensor_height: ``camera.data.sensor_width/height``, millimetres.
        sensor_fit: ``camera.data.sensor_fit``.
        shift_x, shift_y: ``camera.data.shift_x/y``, fractions of the fitted dimension.
        res_x, res_y, res_percent: ``scene.render.resolution_x/y/percentage``.
        pixel_aspect_x, pixel_aspect_y: ``scene.render.pixel_aspect_x/y``.
    """

    lens_mm: float
    sensor_width: float
    sensor_height: float
    sensor_fit: SensorFit
    shift_x: float
    shift_y: float
    res_x: int
    res_y: int
    res_percent: int = 100
    pixel_aspect_x: float = 1.0
    pixel_aspect_y: float = 1.0

    @property
    def size(self) -> tuple[int, int]:
        """Rendered image (width, height), pixels."""
        return blender_resolution(self.res_x, self.res_y, self.res_percent)

    def K(self) -> np.ndarray:
        """[3, 3] float64 pinhole intrinsics in pixels of the rendered image."""
        return K_from_blender(
            self.lens_mm, self.sensor_width, self.sensor_height, self.sensor_fit, self.shift_x, self.shift_y,
            self.res_x, self.res_y, self.res_percent, self.pixel_aspect_x, self.pixel_aspect_y,
        )


def blender_resolution(res_x: int, res_y: int, res_percent: int = 100) -> tuple[int, int]:
    """Rendered image size (width, height) in pixels, with Blender's integer rounding."""
    width, height = res_x * res_percent // 100, res_y * res_percent // 100
    if width <= 0 or height <= 0:
        raise ValueError(f"render size {res_x}x{res_y} at {res_percent}% is empty")
    return width, height


def K_from_blender(
    lens_mm: float,
    sensor_width: float,
    sensor_height: float,
    sensor_fit: SensorFit,
    shift_x: float,
    shift_y: float,
    res_x: int,
    res_y: int,
    res_percent: int = 100,
    pixel_aspect_x: float = 1.0,
    pixel_aspect_y: float = 1.0,
) -> np.ndarray:
    """[3, 3] float64 intrinsics (pixels) of a perspective Blender camera; arguments as in
    ``BlenderCamera``, formulas in the module doc."""
    if sensor_fit not in ("AUTO", "HORIZONTAL", "VERTICAL"):
        raise ValueError(f"sensor_fit must be AUTO, HORIZONTAL or VERTICAL, got {sensor_fit!r}")
    if lens_mm <= 0 or sensor_width <= 0 or sensor_height <= 0:
        raise ValueError("lens and sensor sizes must be positive")
    if pixel_aspect_x <= 0 or pixel_aspect_y <= 0:
        raise ValueError("pixel aspect must be positive")
    width, height = blender_resolution(res_x, res_y, res_percent)
    if sensor_fit == "AUTO":
        horizontal = pixel_aspect_x * width >= pixel_aspect_y * height
    else:
        horizontal = sensor_fit == "HORIZONTAL"
    sensor = sensor_height if sensor_fit == "VERTICAL" else sensor_width
    ycor = pixel_aspect_y / pixel_aspect_x
    viewfac = width if horizontal else ycor * height
    fx = lens_mm * viewfac / sensor
    fy = fx / ycor
    cx = width / 2.0 - shift_x * viewfac
    cy = height / 2.0 + shift_y * viewfac / ycor
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def without_scale(matrix_world: Matrix4) -> np.ndarray:
    """[..., 4, 4] with each axis normalized: Blender ignores a camera's scale when rendering."""
    out = np.array(matrix_world, dtype=np.float64)
    out[..., :3, :3] /= np.linalg.norm(out[..., :3, :3], axis=-2, keepdims=True)
    return out


def split_uniform_scale(matrix_world: Matrix4) -> tuple[np.ndarray, float]:
    """An avatar object's ``matrix_world`` as (rigid [4, 4], uniform scale s): M = rigid @ diag(s, s, s, 1).

    The service renders rigid cameras only; a uniformly scaled head projects like the unscaled
    one seen from a camera 1/s as far, with depths times s (see ``avatar_world_to_cam``).
    Raises ValueError for non-uniform scale, shear or mirroring, which no pinhole render of the
    head can reproduce.
    """
    m = np.array(matrix_world, dtype=np.float64)
    lengths = np.linalg.norm(m[:3, :3], axis=0)
    s = float(lengths.mean())
    rigid = m.copy()
    rigid[:3, :3] /= s
    r = rigid[:3, :3]
    if (
        s <= 0.0
        or np.abs(lengths - s).max() > UNIFORM_SCALE_TOLERANCE * s
        or np.abs(r.T @ r - np.eye(3)).max() > UNIFORM_SCALE_TOLERANCE
        or np.linalg.det(r) <= 0.0
    ):
        raise ValueError(f"the avatar object's scale must be uniform and positive, got axis lengths {np.round(lengths, 6).tolist()}")
    return rigid, s


def world_to_cam_from_blender(matrix_world: Matrix4, blender_from_world: Matrix4 = BLENDER_FROM_WORLD) -> np.ndarray:
    """Backend world -> OpenCV camera transform of a Blender camera, float64.

    world_to_cam = CV_FROM_BLENDER_CAMERA @ inverse(matrix_world) @ blender_from_world

    Args:
        matrix_world: [..., 4, 4] the camera object's ``matrix_world`` (any scale dropped).
        blender_from_world: [4, 4] rigid map from the backend world into Blender's world;
            ``BLENDER_FROM_WORLD`` unless the avatar's object is moved (then its rigid part,
            see ``avatar_world_to_cam``).

    Returns:
        [..., 4, 4] world_to_cam.
    """
    cam = without_scale(matrix_world)
    return CV_FROM_BLENDER_CAMERA @ np.linalg.inv(cam) @ np.asarray(blender_from_world, dtype=np.float64)


def avatar_world_to_cam(camera_matrix_world: Matrix4, avatar_matrix_world: Matrix4) -> tuple[np.ndarray, float]:
    """The rigid camera to send the service for an avatar object, and the depth scale.

    With the avatar's ``matrix_world`` = rigid @ diag(s, s, s, 1), a point p of the backend
    world lands at Blender camera coordinates s * (R p + t / s) for [R | t] = the
    ``world_to_cam`` of ``rigid``. Projection ignores the common factor s, so the service
    renders with [R | t / s], and its planar depth times s is Blender's depth.

    Returns:
        ([4, 4] float64 world_to_cam, s: multiply the service's depth by it).
    """
    rigid, s = split_uniform_scale(avatar_matrix_world)
    w2c = world_to_cam_from_blender(camera_matrix_world, rigid)
    w2c[:3, 3] /= s
    return w2c, s


def blender_matrix_world_from_world_to_cam(world_to_cam: Matrix4, blender_from_world: Matrix4 = BLENDER_FROM_WORLD) -> np.ndarray:
    """Inverse of ``world_to_cam_from_blender``: the Blender camera's ``matrix_world`` (unit scale).

    matrix_world = blender_from_world @ inverse(world_to_cam) @ CV_FROM_BLENDER_CAMERA
    """
    w2c = np.asarray(world_to_cam, dtype=np.float64)
    return np.asarray(blender_from_world, dtype=np.float64) @ np.linalg.inv(w2c) @ CV_FROM_BLENDER_CAMERA
