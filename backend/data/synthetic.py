"""Synthetic subjects: random identities, animated, filmed by known cameras.

Ground truth comes from a high-detail reference of the textured head: a surface avatar many
times denser than any avatar being fitted (its own layout, tiny flat Gaussians carrying the
procedural albedo), never from the avatar under test. With ``looks`` on, the reference also
carries hair and facial-hair volumes, glasses and skin texture, and is lit per frame
(``backend/data/looks.py``); the subject's static offset then lifts the head's surface to
the hair's outer surface, as the generator's outline step does from masks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from backend.configs import Config, SettingError, at_least
from backend.data.albedo import AlbedoParams, surface_albedo
from backend.data.looks import Looks, LooksConfig, concat_splats, hair_lift, look_avatars, shade, textured_skin
from backend.data.motion import random_trajectory
from backend.data.subject import SubjectInfo, default_split, write_frame, write_subject
from backend.gaussians.avatar import Avatar, deform
from backend.gaussians.layout import MAX_GAUSSIANS, MIN_GAUSSIANS
from backend.gaussians.surface import SurfaceInit, surface_avatar
from backend.head.model import HeadModel
from backend.render.camera import Cameras, HeadShot
from backend.render.rasterize import render

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SynthConfig(Config):
    """A synthetic capture.

    Attributes:
        frames: number of time steps T.
        views: cameras per frame V (1 = monocular video with a moving head; > 1 = a static
            ring of cameras on an arc around the head).
        size: image width and height in pixels.
        seed: identity, albedo and motion all follow from it.
        reference_gaussians: density of the ground-truth reference head.
        shape_std: standard deviation of the identity coefficients.
        motion: scale of head and face motion (0 = a still, neutral head).
        shot: camera distance and focal length (the backend's one default framing).
        arc_degrees: horizontal span of the multi-view ring.
        background: RGB in [0, 1].
        looks: give the identity hair and facial-hair volumes, glasses, skin texture and a
            key light (off: a bare, flatly lit head, as the benchmarks' subjects are).
        looks_config: how those are drawn.
    """

    frames: int = 30
    views: int = 1
    size: int = 256
    seed: int = 0
    reference_gaussians: int = 200_000
    shape_std: float = 1.0
    motion: float = 1.0
    shot: HeadShot = HeadShot()
    arc_degrees: float = 150.0
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    looks: bool = False
    looks_config: LooksConfig = LooksConfig()

    def check(self) -> None:
        """Raise SettingError naming the first field a capture cannot be made with."""
        at_least("frames", self.frames, 1, "a synthetic subject needs at least one frame")
        at_least("views", self.views, 1, "a synthetic subject needs at least one view")
        if not 32 <= self.size <= 4096:
            raise SettingError("size", self.size, "the image size must be in [32, 4096] pixels")
        if not MIN_GAUSSIANS <= self.reference_gaussians <= MAX_GAUSSIANS:
            raise SettingError("reference_gaussians", self.reference_gaussians, f"must be in [{MIN_GAUSSIANS}, {MAX_GAUSSIANS}]")
        self.looks_config.check()


def capture_cameras(config: SynthConfig) -> Cameras:
    """V cameras looking at the head centre: straight ahead for V = 1, else an arc at three heights."""
    if config.views == 1:
        azimuth, elevation = torch.zeros(1), torch.zeros(1)
    else:
        azimuth = torch.linspace(-config.arc_degrees / 2, config.arc_degrees / 2, config.views)
        elevation = 8.0 * (torch.arange(config.views) % 3 - 1)
    return config.shot.cameras(azimuth, elevation, config.size)


def reference_head(head: HeadModel, config: SynthConfig, rng: np.random.Generator) -> tuple[Avatar, AlbedoParams]:
    """The dense, textured ground-truth surface of one random identity."""
    shape = torch.tensor(rng.normal(0.0, config.shape_std, head.n_shape), dtype=torch.float32)
    albedo = AlbedoParams.random(rng)
    ref = surface_avatar(
        head,
        shape,
        config.reference_gaussians,
        lambda f, b: surface_albedo(head.data, albedo, f, b),
        SurfaceInit(in_plane=0.7, thickness=0.1, opacity=0.995),
        meta={"role": "synthetic ground-truth reference"},
    )
    return ref, albedo


@torch.no_grad()
def synthesize(head: HeadModel, out: str | Path, config: SynthConfig, progress: Progress | None = None) -> Path:
    """Write a synthetic subject to ``out``, rendering on the head model's device; returns the folder."""
    config.check()
    rng = np.random.default_rng(config.seed)
    ref, albedo = reference_head(head, config, rng)
    params = random_trajectory(head, config.frames, rng, config.motion, moving_head=config.views == 1)
    # Drawn after the motion, so that turning looks on changes no identity's face or motion.
    looks = Looks.random(rng, config.looks_config) if config.looks else None
    parts = [ref]
    if looks:
        hair_count = int(config.looks_config.hair_share * config.reference_gaussians)
        parts = [textured_skin(ref, head.data, looks), *look_avatars(head, ref.shape, looks, albedo.hair, hair_count)]
        params.static_offset = hair_lift(head, ref.shape, looks)
    params.shape = ref.shape.clone()
    cams = capture_cameras(config)
    root = Path(out)
    info = SubjectInfo(
        name=root.name,
        width=config.size,
        height=config.size,
        num_frames=config.frames,
        num_cameras=config.views,
        background=config.background,
        split=default_split(config.frames),
        head_model=head.name,
        source="synthetic",
        extra={"synth": asdict(config), "albedo": asdict(albedo), **({"looks": asdict(looks)} if looks else {})},
    )
    t_cams = config.frames
    write_subject(root, info, params, cams.K.expand(t_cams, *cams.K.shape), cams.world_to_cam.expand(t_cams, *cams.world_to_cam.shape))
    device = head.v_template.device
    parts_dev, cams_dev = [p.to(device) for p in parts], cams.to(device)
    background = torch.tensor(config.background, device=device)
    for t in range(config.frames):
        frame = params.index([t]).to(device)
        splats = concat_splats([deform(p, head, frame).frame(0) for p in parts_dev])
        if looks:
            splats = shade(splats, looks)
        out_t = render(splats, cams_dev, background)
        for c in range(config.views):
            write_frame(root, t, c, out_t.rgb[c].cpu().numpy(), out_t.alpha[c, ..., 0].cpu().numpy())
        if progress:
            progress(t + 1, config.frames)
    return root
