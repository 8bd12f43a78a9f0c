"""Blender camera <-> backend camera: the one place for these conversions (pure math).

Frames:
    * Backend world: FLAME's, +y up, +z toward where the face looks (metres).
    * Blender world: +z up. ``BLENDER_FROM_WORLD`` maps backend (x, y, z) to Blender
      (x, -z, y): a +90 degree turn about x, so the face looks along Blender's -Y, i.e.
      toward a camera in Blender's "Front" view.
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
from typing import Literal

import torch

SensorFit = Literal["AUTO", "HORIZONTAL", "VERTICAL"]
Matrix4 = torch.Tensor | Sequence[Sequence[float]]

# Backend world (x, y, z) -> Blender world (x, -z, y).
BLENDER_FROM_WORLD = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, -1.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ],
    dtype=torch.float64,
)

# Blender camera axes (x right, y up, looking down -z) -> OpenCV (x right, y down, z forward).
CV_FROM_BLENDER_CAMERA = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


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
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pinhole intrinsics of a perspective Blender camera (formulas in the module doc).

    Args:
        lens_mm: ``camera.data.lens``, millimetres.
        sensor_width, sensor_height: ``camera.data.sensor_width/height``, millimetres.
        sensor_fit: ``camera.data.sensor_fit``.
        shift_x, shift_y: ``camera.data.shift_x/y``, fractions of the fitted dimension.
        res_x, res_y, res_percent: ``scene.render.resolution_x/y/percentage``.
        pixel_aspect_x, pixel_aspect_y: ``scene.render.pixel_aspect_x/y``.

    Returns:
        [3, 3] K in pixels of the rendered image (see ``blender_resolution``).
    """
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
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=dtype)


def _without_scale(matrix_world: torch.Tensor) -> torch.Tensor:
    """Drop object scale from [..., 4, 4]; Blender ignores a camera's scale when rendering."""
    out = matrix_world.clone()
    out[..., :3, :3] = matrix_world[..., :3, :3] / torch.linalg.norm(
        matrix_world[..., :3, :3], dim=-2, keepdim=True
    )
    return out


def world_to_cam_from_blender(
    matrix_world: Matrix4,
    blender_from_world: Matrix4 = BLENDER_FROM_WORLD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Backend world -> OpenCV camera transform of a Blender camera.

    world_to_cam = CV_FROM_BLENDER_CAMERA @ inverse(matrix_world) @ blender_from_world

    Args:
        matrix_world: [..., 4, 4] the camera object's ``matrix_world`` (any scale dropped).
        blender_from_world: [4, 4] rigid map from the backend world into Blender's world;
            ``BLENDER_FROM_WORLD`` unless the avatar's object is moved (then
            ``avatar.matrix_world @ BLENDER_FROM_WORLD``; put any scale into the splats).

    Returns:
        [..., 4, 4] world_to_cam.
    """
    cam = _without_scale(torch.as_tensor(matrix_world, dtype=torch.float64))
    b_from_w = torch.as_tensor(blender_from_world, dtype=torch.float64)
    return (CV_FROM_BLENDER_CAMERA @ torch.linalg.inv(cam) @ b_from_w).to(dtype)


def blender_matrix_world_from_world_to_cam(
    world_to_cam: Matrix4,
    blender_from_world: Matrix4 = BLENDER_FROM_WORLD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of ``world_to_cam_from_blender``: the Blender camera's ``matrix_world``.

    matrix_world = blender_from_world @ inverse(world_to_cam) @ CV_FROM_BLENDER_CAMERA

    Args:
        world_to_cam: [..., 4, 4] backend camera (OpenCV) transform.
        blender_from_world: [4, 4] as in ``world_to_cam_from_blender``.

    Returns:
        [..., 4, 4] matrix_world (unit scale).
    """
    w2c = torch.as_tensor(world_to_cam, dtype=torch.float64)
    b_from_w = torch.as_tensor(blender_from_world, dtype=torch.float64)
    return (b_from_w @ torch.linalg.inv(w2c) @ CV_FROM_BLENDER_CAMERA).to(dtype)
