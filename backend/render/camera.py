"""Pinhole cameras in the backend's convention, and helpers to build them.

Conventions:
    * World frame: FLAME's (metres, +y up, +z toward where the face looks).
    * Camera frame: OpenCV (x right, y down, z forward); ``world_to_cam`` maps world
      points into it.
    * Intrinsics ``K`` are in pixels; only fx, fy, cx, cy are used (no skew, as in gsplat).
      Continuous pixel coordinates put the image's top-left corner at (0, 0) and the centre
      of pixel (row i, column j) at (j + 0.5, i + 0.5), as in gsplat; an image of width W and
      height H spans [0, W] x [0, H], so a centred principal point is (W / 2, H / 2).

Blender-facing conversions live in ``backend/wire/blender_camera_math.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Vec3 = Sequence[float] | torch.Tensor


@dataclass(frozen=True)
class Cameras:
    """A rig of C pinhole cameras sharing one image size, optionally per frame.

    Attributes:
        K: [C, 3, 3] or [B, C, 3, 3] intrinsics, pixels.
        world_to_cam: [C, 4, 4] or [B, C, 4, 4] rigid world -> OpenCV camera transforms.
        width: image width, pixels.
        height: image height, pixels.
    """

    K: torch.Tensor
    world_to_cam: torch.Tensor
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.K.ndim not in (3, 4) or self.K.shape[-2:] != (3, 3):
            raise ValueError(f"Cameras.K must be [C, 3, 3] or [B, C, 3, 3], got {tuple(self.K.shape)}")
        if self.world_to_cam.shape[-2:] != (4, 4) or self.world_to_cam.shape[:-2] != self.K.shape[:-2]:
            raise ValueError(
                f"Cameras.world_to_cam must be {tuple(self.K.shape[:-2]) + (4, 4)} to match K, "
                f"got {tuple(self.world_to_cam.shape)}"
            )
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")

    @property
    def batched(self) -> bool:
        return self.K.ndim == 4

    @property
    def batch_shape(self) -> torch.Size:
        """Leading dims before the camera dim: () or (B,)."""
        return self.K.shape[:-3]

    @property
    def count(self) -> int:
        """Number of cameras C per frame."""
        return int(self.K.shape[-3])

    @property
    def cam_to_world(self) -> torch.Tensor:
        """[..., C, 4, 4] camera -> world transforms."""
        return rigid_inverse(self.world_to_cam)

    @property
    def centers(self) -> torch.Tensor:
        """[..., C, 3] camera centres, world frame, metres."""
        R = self.world_to_cam[..., :3, :3]
        t = self.world_to_cam[..., :3, 3]
        return -torch.einsum("...ji,...j->...i", R, t)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cameras:
        return Cameras(
            self.K.to(device=device, dtype=dtype),
            self.world_to_cam.to(device=device, dtype=dtype),
            self.width,
            self.height,
        )

    def frame(self, b: int) -> Cameras:
        """The unbatched rig of frame ``b``."""
        if not self.batched:
            raise ValueError("Cameras.frame() needs batched cameras")
        return Cameras(self.K[b], self.world_to_cam[b], self.width, self.height)

    def frames(self, idx: list[int]) -> Cameras:
        """The batched rigs [len(idx), C] of frames ``idx``."""
        if not self.batched:
            raise ValueError("Cameras.frames() needs batched cameras")
        return Cameras(self.K[idx], self.world_to_cam[idx], self.width, self.height)

    def expand(self, batch: int) -> Cameras:
        """This unbatched rig repeated for ``batch`` frames (a view, no copy)."""
        if self.batched:
            raise ValueError("Cameras.expand() needs unbatched cameras")
        return Cameras(
            self.K.expand(batch, *self.K.shape),
            self.world_to_cam.expand(batch, *self.world_to_cam.shape),
            self.width,
            self.height,
        )


def rigid_inverse(T: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms [..., 4, 4] (rotation + translation)."""
    R = T[..., :3, :3].transpose(-1, -2)
    t = -(R @ T[..., :3, 3:4])
    out = torch.zeros_like(T)
    out[..., :3, :3] = R
    out[..., :3, 3:4] = t
    out[..., 3, 3] = 1.0
    return out


def _as_tensor(v: Vec3, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    return torch.as_tensor(v, dtype=dtype, device=device)


def look_at(eye: Vec3, target: Vec3, up: Vec3 = (0.0, 1.0, 0.0)) -> torch.Tensor:
    """World -> OpenCV camera transform of a camera at ``eye`` looking at ``target``.

    The camera's +z points from ``eye`` to ``target``; its image "up" (-y) is as close to
    ``up`` as possible.

    Args:
        eye: [..., 3] camera centre, world frame, metres.
        target: [..., 3] point on the optical axis, world frame.
        up: [..., 3] world direction that should appear upward in the image.

    Returns:
        [..., 4, 4] world_to_cam (float32 unless ``eye`` is a floating tensor).
    """
    is_tensor = isinstance(eye, torch.Tensor)
    dtype = eye.dtype if is_tensor and eye.is_floating_point() else torch.float32
    device = eye.device if is_tensor else None
    eye_t, target_t, up_t = (_as_tensor(v, dtype, device) for v in (eye, target, up))
    eye_t, target_t, up_t = torch.broadcast_tensors(eye_t, target_t, up_t)
    forward = target_t - eye_t
    right = torch.linalg.cross(forward, up_t)
    if bool((torch.linalg.norm(forward, dim=-1) == 0).any()):
        raise ValueError("look_at: eye and target coincide")
    if bool((torch.linalg.norm(right, dim=-1) <= 1e-9 * torch.linalg.norm(forward, dim=-1)).any()):
        raise ValueError("look_at: up is parallel to the viewing direction")
    z = forward / torch.linalg.norm(forward, dim=-1, keepdim=True)
    x = right / torch.linalg.norm(right, dim=-1, keepdim=True)
    y = torch.linalg.cross(z, x)  # image down
    R = torch.stack([x, y, z], dim=-2)
    out = torch.zeros(eye_t.shape[:-1] + (4, 4), dtype=dtype, device=eye_t.device)
    out[..., :3, :3] = R
    out[..., :3, 3] = -torch.einsum("...ij,...j->...i", R, eye_t)
    out[..., 3, 3] = 1.0
    return out


def focal_from_fov(fov_deg: float, size_px: float) -> float:
    """Focal length in pixels giving a field of view of ``fov_deg`` across ``size_px``."""
    if not 0.0 < fov_deg < 180.0:
        raise ValueError(f"field of view must be in (0, 180) degrees, got {fov_deg}")
    return 0.5 * size_px / math.tan(math.radians(fov_deg) / 2.0)


def intrinsics(
    width: int,
    height: int,
    *,
    focal_px: float | None = None,
    fov_deg: float | None = None,
    principal_point: tuple[float, float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pinhole intrinsics with square pixels.

    Args:
        width, height: image size, pixels.
        focal_px: focal length in pixels; or
        fov_deg: horizontal field of view (across ``width``), degrees.
        principal_point: (cx, cy) in pixels; default the image centre (W / 2, H / 2).

    Returns:
        [3, 3] K.
    """
    if (focal_px is None) == (fov_deg is None):
        raise ValueError("intrinsics: give exactly one of focal_px and fov_deg")
    f = focal_px if focal_px is not None else focal_from_fov(fov_deg, width)
    cx, cy = principal_point if principal_point is not None else (width / 2.0, height / 2.0)
    return torch.tensor([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]], dtype=dtype)


def sphere_cameras(
    azimuth_deg: torch.Tensor,
    elevation_deg: torch.Tensor,
    radius: float,
    width: int,
    height: int,
    *,
    target: Vec3 = (0.0, 0.0, 0.0),
    focal_px: float | None = None,
    fov_deg: float | None = None,
) -> Cameras:
    """Cameras on a sphere around ``target`` in the y-up world, all looking at it with +y up.

    Camera i sits at azimuth ``azimuth_deg[i]`` about +y, measured from +z toward +x
    (azimuth 0 faces the FLAME face head-on), and ``elevation_deg[i]`` above the horizontal
    plane (positive looks down on the target).

    Args:
        azimuth_deg, elevation_deg: [n] degrees.
        radius: metres from ``target`` to every camera centre.
        width, height: image size, pixels.
        target: [3] world point looked at.
        focal_px / fov_deg: exactly one; see ``intrinsics``.

    Returns:
        Cameras with K [n, 3, 3] and world_to_cam [n, 4, 4] (float32).
    """
    azimuth = torch.deg2rad(torch.as_tensor(azimuth_deg, dtype=torch.float64).reshape(-1))
    elevation = torch.deg2rad(torch.as_tensor(elevation_deg, dtype=torch.float64).reshape(-1)).expand_as(azimuth)
    n = azimuth.shape[0]
    if n == 0 or radius <= 0.0:
        raise ValueError(f"cameras need n > 0 and radius > 0, got n={n}, radius={radius}")
    if bool((elevation.abs() >= math.pi / 2).any()):
        raise ValueError("elevation must be in (-90, 90) degrees")
    offsets = radius * torch.stack([elevation.cos() * azimuth.sin(), elevation.sin(), elevation.cos() * azimuth.cos()], dim=-1)
    target_t = torch.as_tensor(target, dtype=torch.float64)
    world_to_cam = look_at(target_t + offsets, target_t.expand(n, 3), (0.0, 1.0, 0.0))
    K = intrinsics(width, height, focal_px=focal_px, fov_deg=fov_deg, dtype=torch.float64)
    return Cameras(K.expand(n, 3, 3).float().contiguous(), world_to_cam.float(), width, height)


@dataclass(frozen=True)
class HeadShot:
    """How far and how wide a camera frames a head: the one default of every picture of a head
    the backend sets up itself (synthetic captures, animation renders, turntables).

    Attributes:
        distance: metres from the head's centre to the camera centre.
        focal: focal length as a multiple of the image width (2.0: about 28 degrees across).
    """

    distance: float = 0.75
    focal: float = 2.0

    @property
    def fov_deg(self) -> float:
        """Field of view across the image, degrees."""
        return math.degrees(2.0 * math.atan(0.5 / self.focal))

    def cameras(self, azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor, size: int, target: Vec3 = (0.0, 0.0, 0.0)) -> Cameras:
        """Square cameras of ``size`` pixels at this distance from ``target``, looking at it
        (angles as in ``sphere_cameras``); K [n, 3, 3], world_to_cam [n, 4, 4]."""
        return sphere_cameras(azimuth_deg, elevation_deg, self.distance, size, size, target=target, focal_px=self.focal * size)


def orbit_cameras(
    n: int,
    radius: float,
    width: int,
    height: int,
    *,
    elevation_deg: float = 0.0,
    target: Vec3 = (0.0, 0.0, 0.0),
    focal_px: float | None = None,
    fov_deg: float | None = None,
    azimuth_offset_deg: float = 0.0,
) -> Cameras:
    """A turntable of ``n`` cameras evenly spaced on a ring: camera i at azimuth
    ``azimuth_offset_deg + 360 * i / n``, all at ``elevation_deg`` (see ``sphere_cameras``)."""
    if n <= 0:
        raise ValueError(f"orbit_cameras needs n > 0, got n={n}")
    azimuth = azimuth_offset_deg + 360.0 * torch.arange(n, dtype=torch.float64) / n
    return sphere_cameras(azimuth, torch.tensor(elevation_deg), radius, width, height, target=target, focal_px=focal_px, fov_deg=fov_deg)


def project(points: torch.Tensor, cameras: Cameras) -> tuple[torch.Tensor, torch.Tensor]:
    """Pinhole projection of world points into every camera (no distortion, no culling).

    Pixel coordinates follow the module convention: pixel (0, 0)'s centre is (0.5, 0.5).

    Args:
        points: [..., N, 3] world points, metres; leading dims must match
            ``cameras.batch_shape`` (or be absent).
        cameras: rig with K [..., C, 3, 3].

    Returns:
        uv: [..., C, N, 2] pixel coordinates (x right, y down).
        depth: [..., C, N] camera-space z, metres (planar depth, not distance).
    """
    R = cameras.world_to_cam[..., :3, :3].to(points)
    t = cameras.world_to_cam[..., :3, 3].to(points)
    K = cameras.K.to(points)
    p_cam = torch.einsum("...cij,...nj->...cni", R, points) + t[..., :, None, :]
    depth = p_cam[..., 2]
    focal = torch.stack([K[..., 0, 0], K[..., 1, 1]], dim=-1)[..., None, :]
    uv = focal * p_cam[..., :2] / depth[..., None] + K[..., None, :2, 2]
    return uv, depth
