"""The Stage 1 network: K source portraits in, mesh-bound Gaussians out, in one pass.

For every source view k and every Gaussian i of the layout:

1. the Gaussian's surface point on the posed head of source k projects into image k;
2. a small CNN (``ImageEncoder``, trained from scratch) gives a feature map at 1/4 of the
   encoder resolution; features and colours are sampled bilinearly at the projection;
3. visibility comes from the depth of the posed head in view k (the flat surface Gaussians
   rendered at ``vis_size``), a facing test and the source's person mask; its weight is
   w_ki = visible_ki * cos_ki (cos: surface normal vs direction to the camera);
4. a shared per-source point MLP turns (feature, colour, viewing direction in the parent
   triangle's frame) into a point feature.

The K point features are pooled by a parameter-free, visibility-weighted mean:
    f_i = sum_k w_ki g_ki / sum_k w_ki
so the weights and the Gaussian count do not depend on K, and the result does not depend on
the order of the sources. The pooled features are scattered into the layout's R x R UV grid
(``Binding.texel``), where a small U-Net gives regions no source sees (back of the head,
under the chin) context from their neighbours, and gathered back per Gaussian.

The output heads are residuals on top of the plain surface initialization (``surface.py``):
offset, rotation, log-scale and opacity start at exactly the surface values (the last layer
is zero-initialized), and the colour starts at the pooled source colours (an appearance path
that bypasses the network; texels no source sees are filled from their UV neighbours by a
push-pull pyramid). An untrained network therefore already produces the surface init
coloured from the sources, and training learns corrections.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from backend.gaussians.avatar import SH_C0, LocalGaussians, logit, rgb_to_sh_dc
from backend.gaussians.frames import matrix_to_quat, quat_to_matrix, surface_points, triangle_frames
from backend.gaussians.layout import Binding, sample_layout
from backend.gaussians.splats import Splats
from backend.gaussians.uv_image import push_pull_fill
from backend.gaussians.surface import SurfaceInit, surface_local
from backend.head.model import HeadModel
from backend.render.camera import Cameras, project
from backend.render.rasterize import RenderOutput, render
from backend.wire.errors import InputError

MAX_SOURCES = 4
PoolMode = Literal["mean", "best", "consensus"]
# Consensus pooling: a source's colour this far (RGB distance in [0, 1] units) from the others'
# weighted mean keeps exp(-1/2) of its weight; rounds of reweighting towards the majority.
CONSENSUS_SIGMA = 0.1
CONSENSUS_ROUNDS = 3


@dataclass(frozen=True)
class GeneratorConfig:
    """Architecture of the generator (saved with every checkpoint).

    Attributes:
        gaussians: N, the layout's Gaussian count (fixed for every K).
        image_size: sources are resized to this square size for the encoder; colours are
            sampled from the full-resolution sources.
        enc_channels: encoder widths at 1/2, 1/4, 1/8, 1/16 of ``image_size``.
        feat_dim: channels of the 1/4-resolution feature map.
        point_dim: per-source point feature width (what is pooled).
        uv_embed: channels of the learned UV-space embedding (a prior for unseen regions).
        dec_channels: U-Net widths at R, R/2, R/4 in the UV grid.
        vis_size: resolution of the depth render used for visibility.
        depth_tolerance: metres a surface point may lie behind the rendered depth and still
            count as seen (plus two pixels' worth of depth change along its slope).
        min_cos: a surface point must face the camera at least this much to be seen.
        max_offset: bound of the predicted offset, triangle units (tanh).
        surface: the surface initialization the residuals start from.
        backbone: "scratch", or "timm:<model name>" for a timm feature backbone whose weights
            come from a local file (see docs/generator.md).
        amp: bf16 autocast for the networks on CUDA (geometry and rendering stay fp32).
    """

    gaussians: int = 32_768
    image_size: int = 256
    enc_channels: tuple[int, ...] = (32, 64, 128, 192)
    feat_dim: int = 48
    point_dim: int = 64
    uv_embed: int = 16
    dec_channels: tuple[int, ...] = (64, 96, 160)
    vis_size: int = 128
    depth_tolerance: float = 0.004
    min_cos: float = 0.1
    max_offset: float = 1.0
    surface: SurfaceInit = field(default_factory=SurfaceInit)
    backbone: str = "scratch"
    amp: bool = True

    def check(self) -> None:
        if len(self.enc_channels) != 4 or len(self.dec_channels) != 3:
            raise InputError("GeneratorConfig: enc_channels needs 4 widths and dec_channels 3")
        if self.image_size % 16:
            raise InputError(f"GeneratorConfig: image_size {self.image_size} must be a multiple of 16")
        if not self.backbone == "scratch" and not self.backbone.startswith("timm:"):
            raise InputError(f"GeneratorConfig: backbone {self.backbone!r} must be 'scratch' or 'timm:<model name>'")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GeneratorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"generator config has unknown fields {unknown}; this build knows {sorted(known)}")
        d = dict(d)
        if "surface" in d:
            d["surface"] = SurfaceInit(**d["surface"])
        for key in ("enc_channels", "dec_channels"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


PRESETS: dict[str, GeneratorConfig] = {
    # The shipped model: ~33K Gaussians, 256 px encoder input.
    "default": GeneratorConfig(),
    # Tests and CPU smoke runs: seconds per step on two cores.
    "tiny": GeneratorConfig(
        gaussians=2_000, image_size=64, enc_channels=(8, 16, 24, 32), feat_dim=16, point_dim=16, uv_embed=4, dec_channels=(16, 24, 32), vis_size=48
    ),
    # A CPU-sized model at 128 px with ~5K Gaussians.
    "small": GeneratorConfig(
        gaussians=5_000, image_size=128, enc_channels=(16, 32, 48, 64), feat_dim=24, point_dim=32, uv_embed=8, dec_channels=(32, 48, 64), vis_size=64
    ),
}


def preset(name: str, **overrides: object) -> GeneratorConfig:
    if name not in PRESETS:
        raise InputError(f"unknown generator preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)  # type: ignore[arg-type]


# -- inputs and outputs --------------------------------------------------------------------


@dataclass
class SourceViews:
    """K source views of each of B identities (everything on one device).

    Attributes:
        images: [B, K, H, W, 3] linear RGB in [0, 1], composited over the background.
        masks: [B, K, H, W, 1] foreground in [0, 1].
        vertices: [B, K, V, 3] the head posed with each source's tracked FLAME parameters.
        K: [B, K, 3, 3] intrinsics in pixels of the H x W images.
        world_to_cam: [B, K, 4, 4] OpenCV world -> camera transforms.
        valid: optional [B, K] bool; invalid sources get zero weight (padding).
        known: optional [B, K, H, W, 1]: 1 where an image holds its source's pixels, 0 where
            its crop was padded past the source's edge (``Subject.known``); None: all known.
    """

    images: torch.Tensor
    masks: torch.Tensor
    vertices: torch.Tensor
    K: torch.Tensor
    world_to_cam: torch.Tensor
    valid: torch.Tensor | None = None
    known: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return int(self.images.shape[0])

    @property
    def count(self) -> int:
        return int(self.images.shape[1])

    def check(self) -> None:
        b, k = self.images.shape[:2]
        if not 1 <= k <= MAX_SOURCES:
            raise InputError(f"the generator takes 1 to {MAX_SOURCES} sources, got {k}")
        h, w = self.images.shape[2:4]
        expect = {
            "images": (b, k, h, w, 3),
            "masks": (b, k, h, w, 1),
            "K": (b, k, 3, 3),
            "world_to_cam": (b, k, 4, 4),
        }
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise InputError(f"source '{name}' has shape {list(got)}, expected {list(shape)}")
        if self.vertices.ndim != 4 or tuple(self.vertices.shape[:2]) != (b, k) or self.vertices.shape[-1] != 3:
            raise InputError(f"source 'vertices' has shape {list(self.vertices.shape)}, expected [{b}, {k}, V, 3]")

    def with_gains(self, gains: torch.Tensor) -> SourceViews:
        """The sources with per-source colour gains [B, K, 3] applied to the person (inside
        the mask); the background keeps its colour."""
        scaled = (self.images * gains[:, :, None, None]).clamp(0, 1)
        return replace(self, images=self.images + self.masks * (scaled - self.images))

    def permuted(self, order: list[int] | torch.Tensor) -> SourceViews:
        """The same sources in another order (along K)."""
        pick = lambda t: None if t is None else t[:, order]  # noqa: E731
        return SourceViews(pick(self.images), pick(self.masks), pick(self.vertices), pick(self.K), pick(self.world_to_cam), pick(self.valid), pick(self.known))


@dataclass
class GeneratorOutput:
    """Attributes:
    local: batched local parameters, every field [B, N, ...].
    seen: [B, N] sum of visibility weights over the sources (0 = no source sees it).
    base_rgb: [B, N, 3] the pooled source colours, filled where unseen (the appearance path).
    gains: [B, K, 3] the colour gains applied to the sources (``source_gains``; ones when off).
    """

    local: LocalGaussians
    seen: torch.Tensor
    base_rgb: torch.Tensor
    gains: torch.Tensor

    def frame(self, b: int) -> LocalGaussians:
        """The unbatched local parameters of identity ``b``."""
        return self.local.map(lambda t: t[b])


# -- geometry helpers ----------------------------------------------------------------------


def deform_batched(vertices: torch.Tensor, faces: torch.Tensor, binding: Binding, local: LocalGaussians) -> Splats:
    """World-space Gaussians when every frame has its own local parameters.

    ``deform_local`` shares one set of local parameters across a batch; here the batch holds
    different identities. Same formulas (see gaussians/frames.py).

    Args:
        vertices: [B, V, 3] posed vertices.
        local: every field [B, N, ...].
    Returns:
        Splats with every field batched [B, N, ...].
    """
    frames = triangle_frames(vertices, faces)
    rot = frames.rotation[:, binding.face_idx]  # [B, N, 3, 3]
    size = frames.size[:, binding.face_idx, None]  # [B, N, 1]
    anchor = surface_points(vertices, faces, binding.face_idx, binding.bary)
    means = anchor + size * (rot @ local.offset[..., None]).squeeze(-1)
    quats = matrix_to_quat(rot @ quat_to_matrix(local.rotation))
    scales = size * torch.exp(local.log_scale)
    colours = (0.5 + SH_C0 * local.sh[..., 0, :]).clamp_min(0.0)
    return Splats(means, quats, scales, torch.sigmoid(local.opacity_logit), colours)


def sample_maps(maps: torch.Tensor, xy_norm: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup. maps: [M, C, h, w]; xy_norm: [M, N, 2] in [-1, 1] -> [M, N, C]."""
    out = F.grid_sample(maps, xy_norm[:, :, None, :].to(maps.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return out[..., 0].transpose(1, 2)


def grid_coords(xy: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel coordinates [..., 2] of an H x W image -> grid_sample's [-1, 1] (pixel edges)."""
    h, w = image_hw
    return torch.stack([xy[..., 0] / w * 2 - 1, xy[..., 1] / h * 2 - 1], dim=-1)


def scaled_intrinsics(K: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """Intrinsics [..., 3, 3] of the same camera with the image resized by (sx, sy)."""
    scale = torch.tensor([sx, sy, 1.0], dtype=K.dtype, device=K.device)
    return K * scale[:, None]


@torch.no_grad()
def head_depth_render(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    binding: Binding,
    base_log_scale: torch.Tensor,
    K: torch.Tensor,
    world_to_cam: torch.Tensor,
    image_hw: tuple[int, int],
    vis_size: int,
    colours: torch.Tensor | None = None,
) -> RenderOutput:
    """The posed head's own depth and silhouette in each view, at ``vis_size`` x ``vis_size``.

    Its flat surface Gaussians are widened 1.5x in their plane to close pinholes at the low
    resolution.

    Args:
        vertices: [M, V, 3] posed vertices of M views.
        base_log_scale: [N, 3] the surface initialization's log-scales.
        K, world_to_cam: [M, 3, 3], [M, 4, 4] cameras of the H x W images.
        colours: [N, 3] what the Gaussians draw (None: black), composited over black.
    Returns:
        The render of M views, one camera each (alpha and depth [M, 1, vis_size, vis_size, 1]).
    """
    h, w = image_hw
    frames = triangle_frames(vertices, faces)
    size = frames.size[:, binding.face_idx, None]
    anchor = surface_points(vertices, faces, binding.face_idx, binding.bary)
    vis_cams = Cameras(scaled_intrinsics(K, vis_size / w, vis_size / h)[:, None], world_to_cam[:, None], vis_size, vis_size)
    widen = torch.tensor([math.log(1.5), math.log(1.5), 0.0], device=vertices.device)
    scales = size * torch.exp(base_log_scale + widen)
    drawn = torch.zeros_like(anchor) if colours is None else colours.to(anchor).expand_as(anchor)
    splats = Splats(anchor, frames.quat[:, binding.face_idx], scales, torch.full(anchor.shape[:2], 0.99, device=anchor.device), drawn)
    return render(splats, vis_cams, torch.zeros(3, device=anchor.device))


@torch.no_grad()
def source_visibility(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    binding: Binding,
    base_log_scale: torch.Tensor,
    K: torch.Tensor,
    world_to_cam: torch.Tensor,
    image_hw: tuple[int, int],
    vis_size: int,
    depth_tolerance: float,
    min_cos: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each Gaussian's surface point lands in each view, and whether it is seen there.

    Args:
        vertices: [M, V, 3] posed vertices of M views.
        base_log_scale: [N, 3] the surface initialization's log-scales.
        K, world_to_cam: [M, 3, 3], [M, 4, 4] cameras of the H x W images.
    Returns:
        xy_norm: [M, N, 2] projections in grid_sample coordinates ([-1, 1], pixel edges).
        visible: [M, N] bool.
        cos: [M, N] cosine between the surface normal and the direction to the camera.
        view_local: [M, N, 3] unit direction to the camera in the parent triangle's frame.
    """
    h, w = image_hw
    frames = triangle_frames(vertices, faces)
    rot = frames.rotation[:, binding.face_idx]  # [M, N, 3, 3]
    anchor = surface_points(vertices, faces, binding.face_idx, binding.bary)  # [M, N, 3]
    cams = Cameras(K[:, None], world_to_cam[:, None], w, h)
    centre = cams.centers[:, 0]  # [M, 3]
    to_cam = F.normalize(centre[:, None] - anchor, dim=-1)
    cos = (to_cam * rot[..., :, 2]).sum(-1)
    view_local = (rot.transpose(-1, -2) @ to_cam[..., None]).squeeze(-1)
    xy, depth = project(anchor, cams)
    xy, depth = xy[:, 0], depth[:, 0]
    xy_norm = grid_coords(xy, (h, w))
    inside = (xy_norm.abs() <= 1).all(-1) & (depth > 0)
    out = head_depth_render(vertices, faces, binding, base_log_scale, K, world_to_cam, image_hw, vis_size)
    vis_f = K[:, 0, 0] * vis_size / w
    seen_depth = sample_maps(out.depth[:, 0].permute(0, 3, 1, 2), xy_norm)[..., 0]
    seen_alpha = sample_maps(out.alpha[:, 0].permute(0, 3, 1, 2), xy_norm)[..., 0]
    pixel = depth / vis_f[:, None]  # metres per visibility pixel at that depth
    tolerance = depth_tolerance + 2.0 * pixel / cos.clamp_min(0.2)
    visible = inside & (cos > min_cos) & (seen_alpha > 0.5) & (depth <= seen_depth + tolerance)
    return xy_norm, visible, cos, view_local


def consensus_weights(rgb: torch.Tensor, weight: torch.Tensor, sigma: float = CONSENSUS_SIGMA, rounds: int = CONSENSUS_ROUNDS) -> torch.Tensor:
    """Visibility weights times each source's agreement with the sources' consensus colour.

    A surface point that hair, a hand or a shadow covers in one photo is still geometrically
    visible there; its colour then disagrees with the other photos'. Iteratively reweighted
    means pull the consensus towards the majority and turn such sources down. Parameter-free
    in K and order-invariant; with one source (or agreeing ones) the normalized weights are
    unchanged.

    Args:
        rgb: [B, K, N, 3] source colours in [0, 1] at each Gaussian.
        weight: [B, K, N] non-negative visibility weights.
    Returns:
        [B, K, N] weights, zero where ``weight`` is.
    """
    out = weight
    for _ in range(rounds):
        norm = out / out.sum(1, keepdim=True).clamp_min(1e-6)
        consensus = (norm[..., None] * rgb).sum(1, keepdim=True)  # [B, 1, N, 3]
        distance2 = (rgb - consensus).square().sum(-1)  # [B, K, N]
        # Measured from the best-agreeing visible source, so that far-apart colours do not
        # all underflow to zero; a factor common to all sources cancels in the mean.
        nearest = torch.where(weight > 0, distance2, torch.inf).amin(1, keepdim=True)
        nearest = torch.where(torch.isfinite(nearest), nearest, 0.0)
        out = weight * torch.exp(-0.5 * (distance2 - nearest) / sigma**2)
    return out


def source_gains(rgb: torch.Tensor, weight: torch.Tensor, rounds: int = 2, limit: float = 2.0) -> torch.Tensor:
    """Per-source colour gains that bring K sources' exposure and white balance together.

    Photos of one person rarely share exposure and white balance; averaged as they are, the
    pooled colours mix them and the head comes out greyer than any one source. Each source's
    gain maps its colours, on the Gaussians it sees together with another source, onto the
    visibility-weighted pool of all of them (a few rounds, the pool being remade with the new
    gains); the gains' weighted geometric mean is then fixed at 1, so the head keeps the
    sources' average level. Parameter-free in K and order-invariant; one source, or sources
    with nothing in common, get gain 1.

    Args:
        rgb: [B, K, N, 3] source colours in [0, 1] at each Gaussian.
        weight: [B, K, N] non-negative visibility weights.
    Returns:
        [B, K, 3] multiplicative gains in [1 / limit, limit].
    """
    shared = weight * ((weight > 0).sum(1, keepdim=True) > 1)  # [B, K, N]: seen by another source too
    total = shared.sum(-1)  # [B, K]
    gains = torch.ones(rgb.shape[0], rgb.shape[1], 3, dtype=rgb.dtype, device=rgb.device)
    if rgb.shape[1] < 2:
        return gains
    for _ in range(rounds):
        corrected = rgb * gains[:, :, None]
        pooled = (shared[..., None] * corrected).sum(1) / shared.sum(1).clamp_min(1e-6)[..., None]  # [B, N, 3]
        own = (shared[..., None] * rgb).sum(2)  # [B, K, 3]
        target = (shared[..., None] * pooled[:, None]).sum(2)
        gains = torch.where(total[..., None] > 0, target / own.clamp_min(1e-6), 1.0).clamp(1 / limit, limit)
    log_gain = gains.log()
    share = total / total.sum(1, keepdim=True).clamp_min(1e-6)  # [B, K]
    centre = (share[..., None] * log_gain).sum(1, keepdim=True)
    return torch.where(total[..., None] > 0, (log_gain - centre).exp(), 1.0).clamp(1 / limit, limit)


# -- networks ------------------------------------------------------------------------------


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(_groups(cout), cout), nn.SiLU())


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.GroupNorm(_groups(channels), channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.GroupNorm(_groups(channels), channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x + self.body(x))


class ImageEncoder(nn.Module):
    """A small FPN trained from scratch: [M, 4, S, S] (RGB + mask) -> [M, feat_dim, S/4, S/4].

    GroupNorm only (no batch statistics), so every image is encoded independently of the
    others in the batch: the K sources cannot see each other before the pool.
    """

    def __init__(self, channels: tuple[int, ...], feat_dim: int) -> None:
        super().__init__()
        c0, c1, c2, c3 = channels
        self.stem = nn.Sequential(ConvBlock(4, c0, 2), ConvBlock(c0, c0))
        self.down1 = nn.Sequential(ConvBlock(c0, c1, 2), ResBlock(c1))
        self.down2 = nn.Sequential(ConvBlock(c1, c2, 2), ResBlock(c2))
        self.down3 = nn.Sequential(ConvBlock(c2, c3, 2), ResBlock(c3), ResBlock(c3))
        self.lateral = nn.ModuleList([nn.Conv2d(c, feat_dim, 1) for c in (c1, c2, c3)])
        self.out = nn.Sequential(ConvBlock(feat_dim, feat_dim), nn.Conv2d(feat_dim, feat_dim, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        l1 = self.down1(x)
        l2 = self.down2(l1)
        l3 = self.down3(l2)
        y = self.lateral[2](l3)
        y = self.lateral[1](l2) + F.interpolate(y, size=l2.shape[-2:], mode="bilinear", align_corners=False)
        y = self.lateral[0](l1) + F.interpolate(y, size=l1.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(y)


class TimmEncoder(nn.Module):
    """A timm feature backbone (weights from a local file) with the same FPN head."""

    def __init__(self, name: str, feat_dim: int) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as exc:
            raise InputError(f"backbone 'timm:{name}' needs the timm package, which is not installed; use backbone 'scratch'") from exc
        self.backbone = timm.create_model(name, pretrained=False, features_only=True, out_indices=(1, 2, 3))
        chans = self.backbone.feature_info.channels()
        self.adapt = nn.Conv2d(4, 3, 1)  # RGB + mask -> the backbone's RGB input
        with torch.no_grad():
            self.adapt.weight.zero_()
            self.adapt.weight[:, :3, 0, 0] = torch.eye(3)
            self.adapt.bias.zero_()
        self.lateral = nn.ModuleList([nn.Conv2d(c, feat_dim, 1) for c in chans])
        self.out = nn.Sequential(ConvBlock(feat_dim, feat_dim), nn.Conv2d(feat_dim, feat_dim, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[-1] // 4
        l1, l2, l3 = self.backbone(self.adapt(x))
        y = self.lateral[2](l3)
        y = self.lateral[1](l2) + F.interpolate(y, size=l2.shape[-2:], mode="bilinear", align_corners=False)
        y = self.lateral[0](l1) + F.interpolate(y, size=l1.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(F.interpolate(y, size=(s, s), mode="bilinear", align_corners=False))


class UVDecoder(nn.Module):
    """A U-Net over the layout's R x R UV grid, with a masked global context at the bottom."""

    def __init__(self, cin: int, channels: tuple[int, ...], cout: int) -> None:
        super().__init__()
        d0, d1, d2 = channels
        self.enc0 = nn.Sequential(ConvBlock(cin, d0), ResBlock(d0))
        self.enc1 = nn.Sequential(ConvBlock(d0, d1, 2), ResBlock(d1))
        self.enc2 = nn.Sequential(ConvBlock(d1, d2, 2), ResBlock(d2), ResBlock(d2))
        self.context = nn.Linear(d2, d2)
        self.dec1 = nn.Sequential(ConvBlock(d2 + d1, d1), ResBlock(d1))
        self.dec0 = nn.Sequential(ConvBlock(d1 + d0, d0), ResBlock(d0))
        self.head = nn.Conv2d(d0, cout, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, occupied: torch.Tensor) -> torch.Tensor:
        e0 = self.enc0(x)
        e1 = self.enc1(e0)
        e2 = self.enc2(e1)
        occ = F.adaptive_avg_pool2d(occupied, e2.shape[-2:])
        pooled = (e2 * occ).sum((-2, -1)) / occ.sum((-2, -1)).clamp_min(1e-6)
        e2 = e2 + self.context(pooled)[..., None, None]
        d1 = self.dec1(torch.cat([F.interpolate(e2, size=e1.shape[-2:], mode="bilinear", align_corners=False), e1], 1))
        d0 = self.dec0(torch.cat([F.interpolate(d1, size=e0.shape[-2:], mode="bilinear", align_corners=False), e0], 1))
        return self.head(d0)


# Output channels of the decoder: offset 3, rotation 4, log-scale 3, opacity 1, colour 3.
_OUT = 14


class Generator(nn.Module):
    """K sources -> local Gaussian parameters for a fixed layout; see the module doc."""

    def __init__(self, config: GeneratorConfig, faces: torch.Tensor, binding: Binding, base_log_scale: torch.Tensor, head_name: str = "", head_fingerprint: str = "") -> None:
        super().__init__()
        config.check()
        if binding.count != config.gaussians:
            raise InputError(f"layout has {binding.count} Gaussians, the config says {config.gaussians}")
        self.config = config
        self.head_name = head_name
        self.head_fingerprint = head_fingerprint
        self.resolution = binding.resolution
        self.register_buffer("faces", faces.clone().long())
        self.register_buffer("face_idx", binding.face_idx.clone())
        self.register_buffer("bary", binding.bary.clone())
        self.register_buffer("texel", binding.texel.clone())
        self.register_buffer("base_log_scale", base_log_scale.clone().float())
        if config.backbone == "scratch":
            self.encoder: nn.Module = ImageEncoder(config.enc_channels, config.feat_dim)
        else:
            self.encoder = TimmEncoder(config.backbone.split(":", 1)[1], config.feat_dim)
        p = config.point_dim
        self.point = nn.Sequential(nn.Linear(config.feat_dim + 6, p), nn.SiLU(), nn.Linear(p, p))
        # The grid is padded to a multiple of 4 for the two poolings of the U-Net.
        self.grid = 4 * math.ceil(binding.resolution / 4)
        self.uv_embedding = nn.Parameter(0.1 * torch.randn(1, config.uv_embed, self.grid, self.grid))
        self.decoder = UVDecoder(p + 3 + 2 + config.uv_embed, config.dec_channels, _OUT)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def for_head(cls, config: GeneratorConfig, head: HeadModel) -> Generator:
        """A fresh network for ``head``: its layout and surface-init scales (identity-free).

        The surface initialization's log-scale is log(in_plane * texel spacing / triangle
        size); both grow with the triangle, so it depends only on the UV map and is computed
        once on the neutral template.
        """
        from backend.head.registry import fingerprint

        # A CPU copy from the model's data: Module.to would move the caller's head in place.
        head = HeadModel(head.data)
        binding = sample_layout(head.data.uv_coords, head.data.uv_faces, config.gaussians)
        grey = torch.full((binding.count, 3), 0.5)
        base = surface_local(head, torch.zeros(head.n_shape), binding, grey, config.surface)
        return cls(config, head.faces, binding, base.log_scale, head.name, fingerprint(head.data))

    @property
    def binding(self) -> Binding:
        return Binding(self.face_idx, self.bary, self.texel, self.resolution)

    @property
    def device(self) -> torch.device:
        return self.faces.device

    def base_local(self, batch: int) -> LocalGaussians:
        """The surface initialization (grey) as batched local parameters [batch, N, ...]."""
        n = self.config.gaussians
        rot = torch.zeros(batch, n, 4, device=self.device)
        rot[..., 0] = 1
        return LocalGaussians(
            offset=torch.zeros(batch, n, 3, device=self.device),
            rotation=rot,
            log_scale=self.base_log_scale.expand(batch, n, 3).clone(),
            opacity_logit=torch.full((batch, n), float(logit(self.config.surface.opacity)), device=self.device),
            sh=torch.zeros(batch, n, 1, 3, device=self.device),
        )

    # -- the forward pass ------------------------------------------------------------------

    def _autocast(self):  # type: ignore[no-untyped-def]
        enabled = self.config.amp and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def to_grid(self, values: torch.Tensor) -> torch.Tensor:
        """[B, N, C] per-Gaussian values -> [B, C, G, G] UV image (zeros where no Gaussian)."""
        b, n, c = values.shape
        g = self.grid
        flat = self.texel[:, 0] * g + self.texel[:, 1]
        out = values.new_zeros(b, g * g, c)
        out[:, flat] = values
        return out.transpose(1, 2).reshape(b, c, g, g)

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """[B, C, G, G] -> [B, N, C] at every Gaussian's texel."""
        b, c, g, _ = grid.shape
        flat = self.texel[:, 0] * g + self.texel[:, 1]
        return grid.reshape(b, c, g * g)[:, :, flat].transpose(1, 2)

    def forward(self, sources: SourceViews, pool: PoolMode = "mean", match_colours: bool = False) -> GeneratorOutput:
        """Generate the local Gaussians of B identities from their K sources each.

        Args:
            sources: see ``SourceViews``; K in 1..4.
            pool: "mean" (the model), "consensus" (the mean with sources whose colour
                disagrees with the others' turned down: ``consensus_weights``), or "best"
                (each Gaussian takes only its most frontal visible source: an ablation). No
                weights change between them.
            match_colours: bring the sources' exposure and white balance together before
                pooling (``source_gains``; no change for K = 1). Off by default: on the photo
                benchmark it changed the held-out face by -1.0 to +0.2 dB (BENCHMARKS.md).
        """
        sources.check()
        cfg = self.config
        b, k, h, w = sources.images.shape[:4]
        m = b * k
        binding = self.binding
        xy_norm, visible, cos, view_local = source_visibility(
            sources.vertices.reshape(m, *sources.vertices.shape[2:]).float(),
            self.faces,
            binding,
            self.base_log_scale,
            sources.K.reshape(m, 3, 3).float(),
            sources.world_to_cam.reshape(m, 4, 4).float(),
            (h, w),
            cfg.vis_size,
            cfg.depth_tolerance,
            cfg.min_cos,
        )
        images = sources.images.reshape(m, h, w, 3).permute(0, 3, 1, 2).float()
        masks = sources.masks.reshape(m, h, w, 1).permute(0, 3, 1, 2).float()
        # Inside the person mask only (no background colours at the silhouette); frontal
        # views count more than grazing ones.
        mask_at = sample_maps(masks, xy_norm)[..., 0]
        weight = (visible & (mask_at > 0.5)).float() * cos.clamp_min(0.0)
        if sources.valid is not None:
            weight = weight * sources.valid.reshape(m, 1).float()
        weight = weight.reshape(b, k, -1)
        rgb = sample_maps(images, xy_norm)  # [M, N, 3], full resolution
        gains = torch.ones(b, k, 3, device=rgb.device)
        if match_colours:
            gains = source_gains(rgb.reshape(b, k, -1, 3), weight)
            images = sources.with_gains(gains).images.reshape(m, h, w, 3).permute(0, 3, 1, 2).float()
            rgb = sample_maps(images, xy_norm)
        if pool == "best":
            best = weight.argmax(dim=1, keepdim=True)
            weight = torch.zeros_like(weight).scatter(1, best, weight.gather(1, best))
        elif pool not in get_args(PoolMode):
            raise InputError(f"pool must be one of {', '.join(get_args(PoolMode))}, got {pool!r}")
        size = cfg.image_size
        enc_in = torch.cat([images * 2 - 1, masks * 2 - 1], 1)
        if (h, w) != (size, size):
            enc_in = F.interpolate(enc_in, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        with self._autocast():
            feats = self.encoder(enc_in)
            sampled = sample_maps(feats, xy_norm)
            point = self.point(torch.cat([sampled, (rgb * 2 - 1).to(sampled.dtype), view_local.to(sampled.dtype)], -1))
        point = point.float().reshape(b, k, -1, cfg.point_dim)
        rgb = rgb.reshape(b, k, -1, 3)
        w_sum = weight.sum(1)  # [B, N]: how well the sources see each Gaussian, whatever they agree on
        mixing = consensus_weights(rgb, weight) if pool == "consensus" else weight
        norm = mixing / mixing.sum(1, keepdim=True).clamp_min(1e-6)
        pooled = (norm[..., None] * point).sum(1)  # [B, N, P]
        pooled_rgb = (norm[..., None] * rgb).sum(1)  # [B, N, 3]
        seen = (w_sum > 0).float()
        # The appearance path: pooled colours, filled in UV space where no source sees.
        conf = self.to_grid(w_sum.clamp(0, 1)[..., None] * 8.0).clamp(0, 1)
        rgb_grid = push_pull_fill(self.to_grid(pooled_rgb), conf)
        base_rgb = torch.where(seen[..., None] > 0, pooled_rgb, self.from_grid(rgb_grid))
        occupancy = self.to_grid(torch.ones_like(seen)[..., None])
        grid_in = torch.cat(
            [self.to_grid(pooled), rgb_grid * 2 - 1, self.to_grid(seen[..., None]), occupancy, self.uv_embedding.expand(b, -1, -1, -1)], 1
        )
        with self._autocast():
            raw = self.decoder(grid_in, occupancy)
        raw = self.from_grid(raw.float())  # [B, N, 14]
        base = self.base_local(b)
        rotation = base.rotation + raw[..., 3:7]
        local = LocalGaussians(
            offset=cfg.max_offset * torch.tanh(raw[..., 0:3]),
            rotation=rotation / rotation.norm(dim=-1, keepdim=True).clamp_min(1e-6),
            log_scale=base.log_scale + raw[..., 7:10],
            opacity_logit=base.opacity_logit + raw[..., 10],
            sh=(rgb_to_sh_dc(base_rgb) + raw[..., 11:14])[..., None, :],
        )
        return GeneratorOutput(local, w_sum, base_rgb, gains)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
