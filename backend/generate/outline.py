"""The person's outline from the sources' masks: hair volume and what lies outside the person.

The network was trained on bald synthetic heads, and its offsets are bounded to a triangle's
size (a few millimetres), so on a real portrait the generated head stops at the scalp while
the person mask goes on to the top of the hair. Both are geometric facts of the sources, so
this step reads them from the masks directly, after the network, in one pass:

1. **Lift.** Where a Gaussian that may carry hair (``hair_weight``: the scalp, the ears and
   the skin behind them, the sides and back of the neck) lies on the head's outline in a
   source (its normal at a grazing angle and just outside the posed head's own
   silhouette), march along its normal and measure how much further the projection stays
   inside the person mask than inside the bare head's own silhouette: the hair's thickness
   there, in metres. Where the region hides behind an outline that cannot carry hair (the
   sides of the neck behind the jaw) and the person goes on past that outline, hair falls
   beside the face: the hidden Gaussians are measured out to the person's outline (and as
   bare where the person stops there). The measurements (a ring around the head per
   source) are averaged over sources, spread over the rest of the region in UV space
   (push-pull) and faded in from the face, and the region's vertices move out along their
   normals by that much (a per-vertex offset of the template, the avatar's
   ``static_offset``): the Gaussians keep their place on their triangles and grow with
   them, so the shell stays closed and the refinement's hinges, which keep Gaussians near
   their triangles, hold them on the hair. The lifted Gaussians take their colour from where they now land in the sources; lifted
   scalp that no source shows, and any of the region standing off the head, from the hair
   the sources show around the outline.
2. **Carve.** A Gaussian that lands where a source's person mask fades out (the neck below
   the mask's fade; the far side of the neck behind it) gets no more opacity than the mask
   there, as the source image was composited with that mask: the visual hull of the masks,
   widened by a margin for tracking error.

Parameter-free in K and order-invariant, as the network's pool is. Heads without a "scalp"
part mask get no lift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from backend.configs import Config, above, at_least
from backend.gaussians.avatar import LocalGaussians, logit, rgb_to_sh_dc
from backend.gaussians.frames import surface_points, triangle_frames
from backend.gaussians.layout import Binding
from backend.gaussians.uv_image import push_pull_fill
from backend.generate.model import Generator, SourceViews, grid_coords, head_depth_render, sample_maps
from backend.head.model import HeadModelData
from backend.render.camera import Cameras, project
from backend.render.mesh_preview import vertex_normals


@dataclass(frozen=True)
class OutlineFit(Config):
    """Attributes:
    enabled: run the step (``generate --no-outline`` turns it off).
    max_lift: the thickest hair measured, metres.
    step: spacing of the samples along the normal, metres.
    grazing_cos: a Gaussian is on the outline where |cos(normal, view)| is below this; the
        lifted shell takes colour from sources it faces at more than minus this.
    probe: metres along the normal (plus two pixels of the coarse head render) at which an
        outline Gaussian must leave the posed head's own silhouette (so that Gaussians behind
        an ear or on the far side do not count).
    hairline_ramp: metres from the edge of the hair's region over which the lift fades in.
    smooth: texels of the box filter that evens out the measurements in UV space.
    carve_margin: the masks are widened by this share of the image side before carving.
    recolour_lift: metres of lift at which a Gaussian's colour is wholly the one its new
        place shows in the sources (less lift, a blend with the network's colour).
    colour_margin: the shell reads its colour only where the mask, eroded by this share of
        the image side, still holds the person (the soft edge mixes in the background).
    behind_outline: also measure the hair region where another part of the head hides it
        from a source (the sides of the neck behind the jaw in a frontal view): where the
        person mask goes on past the head's outline there, hair falls beside the face, and
        the region is lifted until it reaches the mask's outline.
    min_hair: metres the person mask must go on past the head's outline for a hidden
        Gaussian to count it as hair (less is the mask's soft edge).
    """

    enabled: bool = True
    max_lift: float = 0.08
    step: float = 0.002
    grazing_cos: float = 0.35
    probe: float = 0.006
    hairline_ramp: float = 0.02
    smooth: int = 5
    carve_margin: float = 0.015
    recolour_lift: float = 0.004
    colour_margin: float = 0.01
    behind_outline: bool = True
    min_hair: float = 0.006

    def check(self) -> None:
        above("max_lift", self.max_lift, 0.0)
        above("step", self.step, 0.0)
        above("grazing_cos", self.grazing_cos, 0.0)
        above("probe", self.probe, 0.0)
        at_least("hairline_ramp", self.hairline_ramp, 0.0)
        at_least("smooth", self.smooth, 1)
        at_least("carve_margin", self.carve_margin, 0.0)
        above("recolour_lift", self.recolour_lift, 0.0)
        at_least("colour_margin", self.colour_margin, 0.0)
        above("min_hair", self.min_hair, 0.0)


def _vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """[V, 3] unit normals of ``vertices`` (any device; ``mesh_preview.vertex_normals``)."""
    normals = vertex_normals(vertices.detach().cpu().double().numpy(), faces.cpu().numpy())
    return torch.from_numpy(normals).to(vertices)


def _vertex_part(data: HeadModelData, *names: str) -> torch.Tensor:
    """[V] bool: the union of the named part masks the head has."""
    masks = data.part_masks or {}
    union = np.zeros(len(np.asarray(data.v_template)), bool)
    for name in names:
        if name in masks:
            union |= np.asarray(masks[name], bool)
    return torch.from_numpy(union)


def _per_gaussian(values: torch.Tensor, data: HeadModelData, binding: Binding) -> torch.Tensor:
    """[V] per-vertex values -> [N] barycentric per Gaussian (made on the CPU, whatever device
    the layout lives on)."""
    corners = torch.as_tensor(np.asarray(data.faces), dtype=torch.long)[binding.face_idx.cpu()]
    return (values.float()[corners] * binding.bary.float().cpu()).sum(-1)


def part_weight(data: HeadModelData, binding: Binding, *names: str) -> torch.Tensor:
    """[N] how much of each Gaussian lies on the named part masks, in [0, 1] (zeros for parts
    the head does not have)."""
    return _per_gaussian(_vertex_part(data, *names), data, binding)


def hair_weight(data: HeadModelData, binding: Binding, ramp: float) -> torch.Tensor:
    """[N] how freely each Gaussian may stand off the head as hair, in [0, 1].

    The scalp; the ears, and the skin behind them that faces sideways or back (the sides and
    back of the head below the hairline and of the neck), where long hair covers the ears
    and falls past the jaw; faded in over ``ramp`` metres from the face and the throat.
    Zeros for a head without a "scalp" part mask.
    """
    masks = data.part_masks or {}
    scalp = masks.get("scalp")
    if scalp is None or not scalp.any():
        return torch.zeros(binding.count)
    verts = torch.as_tensor(np.asarray(data.v_template), dtype=torch.float32)
    faces = torch.as_tensor(np.asarray(data.faces), dtype=torch.long)
    weight = _vertex_part(data, "scalp").float()
    ears = _vertex_part(data, "ears", "left_ear", "right_ear")
    # The skin the hair may cover: all of it where the head says, else the neck.
    skin = _vertex_part(data, "skin" if "skin" in masks else "neck")
    if ears.any():
        skin &= verts[:, 2] <= verts[ears, 2].max()  # behind the front of the ears, not the cheeks
        weight = torch.maximum(weight, ears.float())
    normal = _vertex_normals(verts, faces)
    sideways = ((0.3 - normal[:, 2]) / 0.5).clamp(0, 1) * ((normal[:, 1] + 0.5) / 0.3).clamp(0, 1)
    weight = torch.maximum(weight, skin.float() * sideways)
    if ramp > 0:
        inside, outside = weight > 0, verts[weight <= 0]
        edge = torch.cat([torch.cdist(chunk, outside).amin(1) for chunk in verts[inside].split(2048)])
        weight[inside] *= (edge / ramp).clamp(0, 1)
    return _per_gaussian(weight, data, binding)


class _Posed(NamedTuple):
    """The layout on each source's posed head, M = B x K views."""

    vertices: torch.Tensor  # [M, V, 3]
    K: torch.Tensor  # [M, 3, 3]
    world_to_cam: torch.Tensor  # [M, 4, 4]
    cams: Cameras  # one camera per view
    normal: torch.Tensor  # [M, N, 3] each Gaussian's triangle normal
    anchor: torch.Tensor  # [M, N, 3] each Gaussian's surface point


def _posed(model: Generator, sources: SourceViews) -> _Posed:
    h, w = sources.images.shape[2:4]
    m = sources.batch * sources.count
    vertices = sources.vertices.reshape(m, *sources.vertices.shape[2:]).float()
    K = sources.K.reshape(m, 3, 3).float()
    world_to_cam = sources.world_to_cam.reshape(m, 4, 4).float()
    frames = triangle_frames(vertices, model.faces)
    return _Posed(
        vertices,
        K,
        world_to_cam,
        Cameras(K[:, None], world_to_cam[:, None], w, h),
        frames.rotation[:, model.face_idx, :, 2],
        surface_points(vertices, model.faces, model.face_idx, model.bary),
    )


@torch.no_grad()
def measure_lift(model: Generator, sources: SourceViews, hair: torch.Tensor, config: OutlineFit, posed: _Posed | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hair thickness seen at the head's outline in each source.

    Args:
        hair: [N] ``hair_weight``.
        posed: ``_posed(model, sources)`` when the caller has it.
    Returns:
        lift: [B, K, N] metres (meaningful where measured).
        measured: [B, K, N] bool: the Gaussian may carry hair and lies on this source's outline.
    """
    b, k, h, w = sources.images.shape[:4]
    m = b * k
    vertices, K, world_to_cam, cams, normal, anchor = posed or _posed(model, sources)
    cos = (F.normalize(cams.centers[:, 0, None] - anchor, dim=-1) * normal).sum(-1)
    head = head_depth_render(vertices, model.faces, model.binding, model.base_log_scale, K, world_to_cam, (h, w), model.config.vis_size)

    def in_image(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xy, depth = project(points, cams)
        xy_norm = grid_coords(xy[:, 0], (h, w))
        return xy_norm, (xy_norm.abs() <= 1).all(-1) & (depth[:, 0] > 0)

    # The head's own silhouette is rendered coarsely and blurs outward by a pixel or two.
    _, anchor_depth = project(anchor, cams)
    vis_pixel = anchor_depth[:, 0] / (K[:, 0, 0, None] * model.config.vis_size / w)  # [M, N] metres
    probe_xy, probe_in = in_image(anchor + (config.probe + 2 * vis_pixel)[..., None] * normal)
    leaves_head = sample_maps(head.alpha[:, 0].permute(0, 3, 1, 2), probe_xy)[..., 0] < 0.5
    _, anchor_in = in_image(anchor)
    grazing = (hair > 0) & (cos.abs() < config.grazing_cos) & probe_in & anchor_in
    # On the outline, or (``behind_outline``) hidden behind another part of the head's
    # outline, as the sides of the neck are behind the jaw in a frontal source.
    measured = grazing & (leaves_head | config.behind_outline)
    masks = sources.masks.reshape(m, h, w, 1).permute(0, 3, 1, 2).float()
    # The bare head's own outline at the image's resolution: a Gaussian on the grazing band
    # but in front of the outline reaches it only some way out along its normal, and that
    # stretch is head, not hair. Its colour is the hair region's weight of what is in front.
    bare_render = head_depth_render(vertices, model.faces, model.binding, model.base_log_scale, K, world_to_cam, (h, w), max(h, w), hair[:, None].expand(-1, 3))
    bare = bare_render.alpha[:, 0].permute(0, 3, 1, 2)
    bare_hair = bare_render.rgb[:, 0, ..., :1].permute(0, 3, 1, 2) / bare.clamp_min(1e-6)
    steps = torch.arange(0, config.max_lift + 1e-9, config.step, device=anchor.device)  # [J], 0 first
    lift = torch.zeros(m, anchor.shape[1], device=anchor.device)
    for i in range(m):
        idx = measured[i].nonzero()[:, 0]
        if len(idx) == 0:
            continue
        points = anchor[i, idx, None] + steps[:, None] * normal[i, idx, None]  # [n, J, 3]
        one = Cameras(K[i, None], world_to_cam[i, None], w, h)
        xy, depth = project(points.reshape(-1, 3), one)  # [1, n * J, 2], [1, n * J]
        xy_norm = grid_coords(xy, (h, w))
        seen = (xy_norm[0].abs() <= 1).all(-1) & (depth[0] > 0)
        person = (sample_maps(masks[i : i + 1], xy_norm)[0, :, 0] > 0.5) & seen
        head_only = (sample_maps(bare[i : i + 1], xy_norm)[0, :, 0] > 0.5) & seen
        # Samples stay inside up to the first one that leaves: the person's outline minus the head's.
        person_run = person.reshape(len(idx), len(steps)).int().cumprod(dim=1).sum(1)
        head_run = head_only.reshape(len(idx), len(steps)).int().cumprod(dim=1).sum(1)
        beyond = config.step * (person_run - head_run).clamp_min(0).float()
        # A Gaussian hidden behind the head's outline (the side of the neck behind the jaw)
        # measures where its march leaves the head at an outline that cannot carry hair (the
        # face): if the person goes on past it, hair falls there, beside the face, and only
        # the hidden region can hold it, lifted all the way out to the person's outline; if
        # the person stops there, this source shows no hair beside the face (0), as a bald
        # outline does. Past an outline that can carry hair, that outline's own Gaussians
        # measure it.
        hidden = ~leaves_head[i, idx]
        exit_at = points[torch.arange(len(idx)), (head_run - 1).clamp(0, len(steps) - 1)]  # [n, 3] last sample on the head
        exit_xy = grid_coords(project(exit_at, one)[0], (h, w))
        outline_hair = sample_maps(bare_hair[i : i + 1], exit_xy)[0, :, 0] > 0.5
        to_outline = config.step * (person_run - 1).clamp_min(0).float()  # the last sample inside the person
        beside_face = torch.where(beyond >= config.min_hair, to_outline, 0.0)
        lift[i, idx] = torch.where(hidden, beside_face, beyond)
        measured[i, idx] &= ~hidden | ((head_run < len(steps)) & ~outline_hair)
    return lift.reshape(b, k, -1), measured.reshape(b, k, -1)


@torch.no_grad()
def fit_outline(
    model: Generator, sources: SourceViews, local: LocalGaussians, hair: torch.Tensor, scalp: torch.Tensor, rest_vertices: torch.Tensor, config: OutlineFit
) -> tuple[LocalGaussians, torch.Tensor, dict]:
    """The generated Gaussians with the sources' hair volume and outline.

    Args:
        local: [B, N, ...] the network's output for ``sources``.
        hair: [N] ``hair_weight`` of the model's layout.
        scalp: [N] ``part_weight(..., "scalp")``: where hair no source shows takes the colour
            of the hair they do.
        rest_vertices: [B, V, 3] each identity's head at rest (zero pose and expression).
    Returns:
        The local Gaussians recoloured and carved; the lift as a per-vertex offset of the
        template [B, V, 3] (metres, to add to the avatar's ``static_offset``: the hair's
        triangles move out, and their Gaussians, sized in triangle units, grow with them);
        and a summary (mean lift where hair may grow, in millimetres; the share of Gaussians
        carved).
    """
    config.check()
    b, k, h, w = sources.images.shape[:4]
    m = b * k
    hair, scalp = hair.to(model.device), scalp.to(model.device)
    posed = _posed(model, sources)
    lift, measured = measure_lift(model, sources, hair, config, posed)
    count = measured.float().sum(1)  # [B, N]
    mean_lift = (lift * measured).sum(1) / count.clamp_min(1)
    # Even out the ring of measurements, then spread it over the hair's region.
    box = (config.smooth, config.smooth)
    pad = config.smooth // 2
    weight_grid = F.avg_pool2d(model.to_grid((count > 0).float()[..., None]), box, 1, pad)
    value_grid = F.avg_pool2d(model.to_grid((mean_lift * (count > 0))[..., None]), box, 1, pad)
    filled = push_pull_fill(value_grid / weight_grid.clamp_min(1e-6), (weight_grid * 8).clamp(0, 1))
    has_any = (count > 0).any(1, keepdim=True)
    lift_n = model.from_grid(filled)[..., 0] * hair * has_any  # [B, N] metres

    # Where the lifted shell lands in each source.
    cams, normal = posed.cams, posed.normal
    # The Gaussians' places on the lifted shell, near enough: each moved along its triangle's
    # normal (the avatar moves the vertices, along theirs).
    lifted = posed.anchor + lift_n.repeat_interleave(k, 0)[..., None] * normal
    xy, depth = project(lifted, cams)
    xy_norm = grid_coords(xy[:, 0], (h, w))  # [M, N, 2]
    in_front = depth[:, 0] > 0
    if sources.valid is not None:
        in_front &= sources.valid.reshape(m, 1)
    in_image = in_front & (xy_norm.abs() <= 1).all(-1)
    masks = sources.masks.reshape(m, h, w, 1).permute(0, 3, 1, 2).float()

    # Carve: nothing may show where a source's mask says no person is. The mask is widened
    # first, so that a tracking error of a few pixels does not eat the face's outline; beyond
    # the image it continues as at its border (a neck running out of the frame's bottom
    # fades as the mask does there; hair cut off by the frame's top stays). Where a crop was
    # padded past its source's edge, nothing is known, so nothing is carved.
    r = max(1, round(config.carve_margin * max(h, w)))
    carve_by = masks if sources.known is None else torch.maximum(masks, 1 - sources.known.reshape(m, h, w, 1).permute(0, 3, 1, 2).float())
    widened = F.max_pool2d(carve_by, 2 * r + 1, 1, r)
    outside = torch.where(in_front, sample_maps(widened, xy_norm)[..., 0], 1.0).reshape(b, k, -1).amin(1)
    ceiling = logit(outside.clamp(1e-3, 1 - 1e-3))
    opacity_logit = torch.where(outside < 1.0, torch.minimum(local.opacity_logit, ceiling), local.opacity_logit)

    # Recolour the lifted shell from where it now lands (the network coloured it on the head),
    # reading only pixels well inside the mask: at its soft edge they mix in the background.
    cos = (F.normalize(cams.centers[:, 0, None] - lifted, dim=-1) * normal).sum(-1)
    e = round(config.colour_margin * max(h, w))
    held = -F.max_pool2d(-masks, 2 * e + 1, 1, e) if e > 0 else masks
    inside = sample_maps(held, xy_norm)[..., 0] > 0.5
    facing = ((cos > -config.grazing_cos) & in_image & inside).float() * (cos + config.grazing_cos)
    facing = facing.reshape(b, k, -1)
    rgb = sample_maps(sources.images.reshape(m, h, w, 3).permute(0, 3, 1, 2).float(), xy_norm).reshape(b, k, -1, 3)
    seen = facing.sum(1)
    colour = (facing[..., None] * rgb).sum(1) / seen.clamp_min(1e-6)[..., None]
    # Scalp no source shows (the back, the far side) takes the colour of the hair they do
    # show standing off the scalp (the outline's ring, where a source can show only hair, not
    # a forehead's skin), spread in UV space, rather than the network's guess for a bald
    # head; so does any of the region standing off the head by ``min_hair`` or more (only hair
    # stands there: the sides of the neck lifted to hair that falls beside the face, whose
    # shell lies at the mask's outline, where nothing is read). The rest below the hairline
    # (the back of the neck, the ears) short hair leaves skin, and the ring there may show a
    # collar: that stays as the network made it.
    region = hair > 0
    ring = (measured & (lift > 0)).any(1)  # [B, N]
    shown = ((seen > 0) & (scalp > 0.5) & ring).float()[..., None]
    shown_grid = model.to_grid(shown)
    hair_colour = model.from_grid(push_pull_fill(model.to_grid(colour * shown) / shown_grid.clamp_min(1e-6), shown_grid))
    colour = torch.where(seen[..., None] > 0, colour, hair_colour)
    standing = torch.maximum(scalp, (lift_n >= config.min_hair).float())
    reach = torch.where(seen > 0, 1.0, standing * (shown.sum(1) > 0))
    blend = ((lift_n / config.recolour_lift).clamp(0, 1) * region * reach)[..., None]
    dc = local.sh[..., 0, :]
    sh = local.sh.clone()
    sh[..., 0, :] = dc + blend * (rgb_to_sh_dc(colour) - dc)

    summary = {
        "outline_lift_mm": round(float(lift_n[:, region].mean()) * 1000, 2) if region.any() else 0.0,
        "outline_carved_share": round(float((outside < 0.5).float().mean()), 4),
    }
    lift_v = _to_vertices(lift_n, model.faces[model.face_idx], model.bary, rest_vertices.shape[1])
    displacement = lift_v[..., None] * torch.stack([_vertex_normals(v, model.faces) for v in rest_vertices])
    return LocalGaussians(local.offset, local.rotation, local.log_scale, opacity_logit, sh), displacement, summary


def _to_vertices(values: torch.Tensor, corners: torch.Tensor, bary: torch.Tensor, count: int, sweeps: int = 8) -> torch.Tensor:
    """Per-Gaussian values [B, N] -> per-vertex values [B, V]: the barycentric-weighted mean of
    the Gaussians on each vertex's faces; a vertex none lies near takes the mean of its
    neighbours' (``sweeps`` rounds), else 0.

    Args:
        corners: [N, 3] the vertices of each Gaussian's face; bary: [N, 3].
    """
    b = values.shape[0]
    flat, weight = corners.reshape(-1), bary.float().to(values)
    num = values.new_zeros(b, count).index_add_(1, flat, (values[..., None] * weight).reshape(b, -1))
    den = values.new_zeros(count).index_add_(0, flat, weight.reshape(-1))
    known = den > 0
    out = num / den.clamp_min(1e-12)
    for _ in range(sweeps):
        if bool(known.all()):
            break
        # Each Gaussian's face carries the mean of its known corners to its unknown ones.
        face_known = known[corners].float()  # [N, 3]
        face_mean = (out[:, corners] * face_known).sum(-1) / face_known.sum(-1).clamp_min(1)  # [B, N]
        reach = (face_known.sum(-1) > 0)[:, None].expand(-1, 3) & ~known[corners]
        add = values.new_zeros(b, count).index_add_(1, corners[reach], face_mean[:, reach.nonzero()[:, 0]])
        hits = values.new_zeros(count).index_add_(0, corners[reach], torch.ones_like(corners[reach], dtype=values.dtype))
        fresh = (hits > 0) & ~known
        out = torch.where(fresh, add / hits.clamp_min(1), out)
        known = known | fresh
    return torch.where(known, out, 0.0)
