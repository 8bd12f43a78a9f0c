"""Rendering an avatar over an animation: frame by frame, in small batches, to PNG files."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from backend.gaussians.avatar import Avatar
from backend.head.model import HeadModel
from backend.head.params import FlameParams
from backend.render.camera import Cameras, HeadShot
from backend.render.frame_player import FramePlayer
from backend.render.rasterize import RenderOutput


@dataclass(frozen=True)
class ViewConfig:
    """A camera framing the head.

    Attributes:
        size: image width and height, pixels.
        shot: distance and focal length (the backend's one default framing).
        turntable_degrees: yaw swept over the animation (0 = a fixed frontal camera).
        elevation_degrees: camera height angle above the head centre.
        background: RGB in [0, 1].
    """

    size: int = 512
    shot: HeadShot = HeadShot()
    turntable_degrees: float = 0.0
    elevation_degrees: float = 5.0
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)


FRAMING_FRAMES = 64  # frames, spread over the animation, that its framing is taken from


@dataclass(frozen=True)
class HeadFraming:
    """Where an animation's head is, for a camera to face it.

    Attributes:
        centre: [3] mean of the posed vertices over the animation, metres, world frame.
        azimuth_deg, elevation_deg: direction of the head's mean facing axis (its +z after
            the global and neck rotations), in ``sphere_cameras``' angles.
    """

    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    azimuth_deg: float = 0.0
    elevation_deg: float = 0.0


@torch.no_grad()
def head_framing(head: HeadModel, params: FlameParams) -> HeadFraming:
    """The framing of ``params``' head: a tracked subject's global pose lies in its tracking
    camera's frame, far from the origin a default camera looks at."""
    from smplx.lbs import batch_rodrigues

    sample = params.index(np.linspace(0, params.batch_size - 1, min(params.batch_size, FRAMING_FRAMES)).round().astype(int).tolist())
    centre = head(sample, check=False).vertices.mean(dim=(0, 1)).cpu()
    forward = batch_rodrigues(sample.rotation.float().cpu()) @ batch_rodrigues(sample.neck_pose.float().cpu()) @ torch.tensor([0.0, 0.0, 1.0])
    f = torch.nn.functional.normalize(forward.mean(dim=0), dim=0)
    return HeadFraming(
        tuple(float(x) for x in centre),  # type: ignore[arg-type]
        math.degrees(math.atan2(float(f[0]), float(f[2]))),
        math.degrees(math.asin(max(-1.0, min(1.0, float(f[1]))))),
    )


def view_cameras(view: ViewConfig, frames: int, framing: HeadFraming = HeadFraming()) -> Cameras:
    """[T, 1] cameras, one per frame, facing the head of ``framing`` (default: a head at the
    origin looking down +z) and sweeping ``turntable_degrees`` of yaw about +y."""
    azimuth = torch.linspace(-0.5, 0.5, frames) * view.turntable_degrees if frames > 1 else torch.zeros(1)
    rig = view.shot.cameras(azimuth + framing.azimuth_deg, torch.tensor(view.elevation_degrees + framing.elevation_deg), view.size, framing.centre)
    return Cameras(rig.K[:, None].contiguous(), rig.world_to_cam[:, None].contiguous(), view.size, view.size)


@torch.no_grad()
def render_animation(
    avatar: Avatar, head: HeadModel, params: FlameParams, cameras: Cameras, background: torch.Tensor, batch: int = 8
) -> Iterator[RenderOutput]:
    """Render frame t of ``params`` with ``cameras.frame(t)``, ``batch`` frames per call of
    one ``FramePlayer``; yields one RenderOutput per frame ([C, H, W, k], no depth)."""
    params.validate()
    params.check_head(head.name, head.expr_names)
    player = FramePlayer(avatar, head, background)
    for start in range(0, params.batch_size, batch):
        idx = list(range(start, min(start + batch, params.batch_size)))
        # The player's outputs are its capture's buffers, refilled by the next batch.
        out = RenderOutput(*(None if t is None else t.clone() for t in player(params.index(idx), cameras.frames(idx))))
        for i in range(len(idx)):
            yield RenderOutput(*(None if t is None else t[i] for t in out))


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """[H, W, 3] float in [0, 1] -> uint8."""
    return (rgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def contact_sheet(images: list[np.ndarray], columns: int = 8, max_tiles: int = 48) -> np.ndarray:
    """Tile up to ``max_tiles`` evenly chosen [H, W, 3] uint8 images into one image."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    pick = np.unique(np.round(np.linspace(0, len(images) - 1, min(max_tiles, len(images)))).astype(int))
    tiles = [images[i] for i in pick]
    h, w = tiles[0].shape[:2]
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    sheet = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    return sheet


def write_frames(
    frames: Iterator[RenderOutput], out: Path, total: int, progress: Callable[[int, int], None] | None = None
) -> list[Path]:
    """Write camera 0 of every frame as out/frame_TTTT.png plus out/contact_sheet.png."""
    out.mkdir(parents=True, exist_ok=True)
    paths, images = [], []
    for t, result in enumerate(frames):
        img = to_uint8(result.rgb[0])
        path = out / f"frame_{t:04d}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
        images.append(img)
        if progress:
            progress(t + 1, total)
    Image.fromarray(contact_sheet(images)).save(out / "contact_sheet.png")
    return paths
