"""Blender camera <-> backend camera on torch tensors.

The formulas, frames and conventions live in ``blender_camera_math.py`` (numpy only, shared
with the Blender add-on); these wrappers return tensors of the requested dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from backend.render import blender_camera_math as bcm
from backend.render.blender_camera_math import SensorFit, blender_resolution

__all__ = [
    "BLENDER_FROM_WORLD",
    "CV_FROM_BLENDER_CAMERA",
    "K_from_blender",
    "blender_matrix_world_from_world_to_cam",
    "blender_resolution",
    "world_to_cam_from_blender",
]

Matrix4 = torch.Tensor | Sequence[Sequence[float]]
BLENDER_FROM_WORLD = torch.from_numpy(bcm.BLENDER_FROM_WORLD)
CV_FROM_BLENDER_CAMERA = torch.from_numpy(bcm.CV_FROM_BLENDER_CAMERA)


def _np(m: Matrix4) -> np.ndarray:
    return m.detach().cpu().double().numpy() if isinstance(m, torch.Tensor) else np.asarray(m, dtype=np.float64)


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
    """[3, 3] K in pixels of the rendered image; see ``blender_camera_math.K_from_blender``."""
    K = bcm.K_from_blender(lens_mm, sensor_width, sensor_height, sensor_fit, shift_x, shift_y, res_x, res_y, res_percent, pixel_aspect_x, pixel_aspect_y)
    return torch.from_numpy(K).to(dtype)


def world_to_cam_from_blender(
    matrix_world: Matrix4, blender_from_world: Matrix4 = BLENDER_FROM_WORLD, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[..., 4, 4] backend world -> OpenCV camera; see ``blender_camera_math.world_to_cam_from_blender``."""
    return torch.from_numpy(bcm.world_to_cam_from_blender(_np(matrix_world), _np(blender_from_world))).to(dtype)


def blender_matrix_world_from_world_to_cam(
    world_to_cam: Matrix4, blender_from_world: Matrix4 = BLENDER_FROM_WORLD, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[..., 4, 4] the Blender camera's ``matrix_world``; see ``blender_camera_math``."""
    return torch.from_numpy(bcm.blender_matrix_world_from_world_to_cam(_np(world_to_cam), _np(blender_from_world))).to(dtype)
