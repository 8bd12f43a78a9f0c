"""The plain surface initialization of an avatar on a subject.

Gaussians start flat on the subject's neutral head; each takes its colour from the pixel it
projects to in a reference frame when it is visible there (in front in the rendered depth,
facing the camera, inside the mask), and from its UV-grid neighbours otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.configs import Config, SettingError, at_least
from backend.data.subject import Subject
from backend.gaussians.avatar import Avatar, deform, rgb_to_sh_dc
from backend.gaussians.frames import quat_to_matrix
from backend.gaussians.layout import MAX_GAUSSIANS, MIN_GAUSSIANS, fill_missing
from backend.gaussians.surface import SurfaceInit, surface_avatar
from backend.head.model import HeadModel
from backend.render.camera import Cameras, project
from backend.render.rasterize import render
from backend.wire.errors import InputError

NEUTRAL_GREY = 0.5


@dataclass(frozen=True)
class InitConfig(Config):
    """Attributes:
    gaussians: N.
    frame, camera: the reference view colours are taken from.
    depth_tolerance: metres a Gaussian may sit behind the rendered depth and still count as
        seen, on top of the depth change across two pixels of its slope.
    surface: shapes of the starting Gaussians.
    """

    gaussians: int = 100_000
    frame: int = 0
    camera: int = 0
    depth_tolerance: float = 0.002
    surface: SurfaceInit = SurfaceInit()

    def check(self) -> None:
        """Raise SettingError naming the first field no subject can be initialized with (the
        reference view is checked against the subject by ``initialize_on_subject``)."""
        if not MIN_GAUSSIANS <= self.gaussians <= MAX_GAUSSIANS:
            raise SettingError("gaussians", self.gaussians, f"must be in [{MIN_GAUSSIANS}, {MAX_GAUSSIANS}]")
        at_least("frame", self.frame, 0)
        at_least("camera", self.camera, 0)
        at_least("depth_tolerance", self.depth_tolerance, 0.0)


def _sample(image: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup. image: [H, W, C]; xy: [N, 2] pixel coordinates (centres at +0.5)."""
    h, w = image.shape[:2]
    grid = torch.stack([xy[:, 0] / w * 2 - 1, xy[:, 1] / h * 2 - 1], dim=-1)[None, None]
    out = torch.nn.functional.grid_sample(image.permute(2, 0, 1)[None], grid, align_corners=False, padding_mode="border")
    return out[0, :, 0].T


@torch.no_grad()
def initialize_on_subject(head: HeadModel, subject: Subject, config: InitConfig = InitConfig()) -> Avatar:
    """A surface avatar of ``config.gaussians`` Gaussians coloured from one reference view."""
    t, c = config.frame, config.camera
    if not 0 <= t < subject.num_frames or not 0 <= c < subject.num_cameras:
        raise InputError(f"reference view (frame {t}, camera {c}) outside the subject's {subject.num_frames} frames x {subject.num_cameras} cameras")
    shape = subject.params.shape
    grey = lambda f, b: torch.full((f.shape[0], 3), NEUTRAL_GREY)  # noqa: E731
    avatar = surface_avatar(head, shape, config.gaussians, grey, config.surface, meta={"init": "surface", "reference_frame": t, "reference_camera": c})
    dev = head.v_template.device
    splats = deform(avatar.to(dev), head, subject.params.index([t]).to(dev)).frame(0)
    cams = subject.cameras(t)
    cam = Cameras(cams.K[c : c + 1], cams.world_to_cam[c : c + 1], cams.width, cams.height).to(dev)
    rendered = render(splats, cam, subject.background().to(dev))
    xy, depth = project(splats.means, cam)
    xy, depth = xy[0], depth[0]
    h, w = cam.height, cam.width
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h) & (depth > 0)
    seen_depth = _sample(rendered.depth[0], xy)[:, 0]
    seen_alpha = _sample(rendered.alpha[0], xy)[:, 0]
    mask = _sample(subject.mask(t, c).to(dev), xy)[:, 0]
    normals = quat_to_matrix(splats.quats)[..., :, 2]  # the flat axis: the surface normal
    to_cam = torch.nn.functional.normalize(cam.centers[0] - splats.means, dim=-1)
    cos = (to_cam * normals).sum(-1)
    # Depth changes across a pixel by its footprint over the cosine of the viewing angle.
    pixel = depth / cam.K[0, 0, 0]
    tolerance = config.depth_tolerance + 2.0 * pixel / cos.clamp_min(0.2)
    visible = inside & (cos > 0) & (seen_alpha > 0.5) & (mask > 0.5) & (depth <= seen_depth + tolerance)
    colours = _sample(subject.image(t, c).to(dev), xy).cpu()
    colours = fill_missing(avatar.binding, colours, visible.cpu())
    avatar.local.sh[:, 0] = rgb_to_sh_dc(colours)
    avatar.meta["visible_share"] = float(visible.float().mean())
    return avatar
