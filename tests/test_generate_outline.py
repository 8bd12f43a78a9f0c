"""The outline step after the generator: hair volume read from the sources' person masks,
carving where a mask says no person is, and the lifted shell's colours.

The "person" is the built-in head (it has a scalp part mask) with hair of known thickness:
the Gaussians of its hair region (scalp, sides and back of the neck) stand 15 mm off it. Its render gives the sources'
images and masks; an untrained "tiny" generator gives the plain surface head the step starts
from. CPU only, a few seconds.
"""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pytest
import torch

from backend.configs import SettingError
from backend.gaussians.avatar import SH_C0, LocalGaussians, deform_local
from backend.gaussians.frames import surface_points, triangle_frames
from backend.gaussians.layout import sample_layout
from backend.gaussians.surface import SurfaceInit, surface_local
from backend.generate.model import Generator, SourceViews, preset
from backend.generate.outline import OutlineFit, fit_outline, hair_weight, measure_lift, part_weight
from backend.head.params import FlameParams
from backend.head.registry import load_head_model
from backend.render.camera import Cameras, HeadShot, project
from backend.render.rasterize import render
from tests.test_generate_support import one_thread, tiny_head  # noqa: F401 (autouse fixture)

HAIR_MM = 15.0
SIZE = 128
SKIN = (0.8, 0.6, 0.5)
HAIR = (0.1, 0.6, 0.1)


@pytest.fixture(scope="module")
def head():  # type: ignore[no-untyped-def]
    return load_head_model()


@pytest.fixture(scope="module")
def generator(head) -> Generator:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return Generator.for_head(preset("tiny"), head).eval()


def _cameras(azimuth: list[float]) -> Cameras:
    return HeadShot().cameras(torch.tensor(azimuth), torch.zeros(len(azimuth)), SIZE, (0.0, 0.03, 0.0))


def _rest(head, static_offset: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """[1, V, 3] the neutral head, its template moved by ``static_offset`` [V, 3]."""
    return head(replace(FlameParams.neutral(1, head.n_shape, head.n_expr), static_offset=static_offset)).vertices


def _render_local(head, binding, local: LocalGaussians, cams: Cameras, static_offset: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
    splats = deform_local(_rest(head, static_offset), head.faces, binding, local).frame(0)
    return render(splats, cams, torch.ones(3))


def _fit(generator: Generator, head, sources: SourceViews, config: OutlineFit = OutlineFit(), local: LocalGaussians | None = None):  # type: ignore[no-untyped-def]
    """(local [1, N, ...], template offset [V, 3], summary) of the outline step on the surface head."""
    hair = hair_weight(head.data, generator.binding, config.hairline_ramp)
    scalp = part_weight(head.data, generator.binding, "scalp")
    local, lift, summary = fit_outline(generator, sources, generator.base_local(1) if local is None else local, hair, scalp, _rest(head), config)
    return local, lift[0], summary


def person(head, cams: Cameras, hair_mm: float):  # type: ignore[no-untyped-def]
    """(images [C, S, S, 3], masks [C, S, S, 1]) of the head with a hair cap ``hair_mm`` thick,
    skin-coloured where the bald head shows and hair-coloured where only the cap does."""
    binding = sample_layout(head.data.uv_coords, head.data.uv_faces, 40_000)
    grey = torch.full((binding.count, 3), 0.5)
    bald = surface_local(head, torch.zeros(head.n_shape), binding, grey, SurfaceInit(opacity=0.995))
    lift = hair_weight(head.data, binding, 0.0) * hair_mm / 1000
    tri_size = triangle_frames(head.v_template[None], head.faces).size[0, binding.face_idx]
    offset = bald.offset.clone()
    offset[:, 2] += lift / tri_size
    haired = LocalGaussians(offset, bald.rotation, bald.log_scale + torch.log1p(lift / 0.09)[:, None], bald.opacity_logit, bald.sh)
    bald_alpha = _render_local(head, binding, bald, cams).alpha
    haired_alpha = _render_local(head, binding, haired, cams).alpha
    mask = haired_alpha if hair_mm > 0 else bald_alpha  # [C, S, S, 1]
    colour = torch.where(bald_alpha > 0.5, torch.tensor(SKIN), torch.tensor(HAIR))
    images = colour * mask + (1 - mask)
    return images, mask


def sources_of(head, cams: Cameras, hair_mm: float) -> SourceViews:  # type: ignore[no-untyped-def]
    images, masks = person(head, cams, hair_mm)
    c = images.shape[0]
    verts = _rest(head).expand(c, -1, -1)
    return SourceViews(images[None], masks[None], verts[None], cams.K[None], cams.world_to_cam[None])


def _iou(alpha: torch.Tensor, mask: torch.Tensor) -> float:
    a, m = alpha > 0.5, mask > 0.5
    return float((a & m).sum() / (a | m).sum())


def test_lift_measures_the_hair_thickness_on_the_outline(head, generator: Generator) -> None:  # type: ignore[no-untyped-def]
    hair = hair_weight(head.data, generator.binding, OutlineFit().hairline_ramp)
    medians = {}
    for hair_mm in (0.0, HAIR_MM):
        lift, measured = measure_lift(generator, sources_of(head, _cameras([0.0, 70.0]), hair_mm), hair, OutlineFit())
        deep = measured & (hair >= 1)
        assert int(deep.sum()) > 20
        medians[hair_mm] = float(lift[deep].median()) * 1000
    # A bald head's mask ends within a splat's blur of its own outline; a cap adds its thickness.
    assert medians[0.0] <= 2.0, medians
    assert abs(medians[HAIR_MM] - HAIR_MM) <= 3.0, medians


def test_hair_beside_the_face_lifts_what_the_jaw_hides(head, generator: Generator) -> None:  # type: ignore[no-untyped-def]
    """In a frontal source the sides of the neck hang behind the jaw's outline. A bald head's
    mask stops at that outline: what hides there is measured as bare; hair falling beside the
    face (the mask widened sideways below the eyes) lifts the hidden hair region out to it."""
    hair = hair_weight(head.data, generator.binding, OutlineFit().hairline_ramp)
    bald = sources_of(head, _cameras([0.0]), 0.0)
    hidden = {}
    masks = bald.masks[0].permute(0, 3, 1, 2)  # [C, 1, S, S]
    sideways = torch.nn.functional.max_pool2d(masks, (1, 25), 1, (0, 12))  # 12 px more on each side
    long_hair = masks.clone()
    long_hair[..., SIZE // 2 :, :] = sideways[..., SIZE // 2 :, :]
    for name, sources in (("bald", bald), ("long", replace(bald, masks=long_hair.permute(0, 2, 3, 1)[None]))):
        on_lift, on = measure_lift(generator, sources, hair, OutlineFit())
        _, off = measure_lift(generator, sources, hair, OutlineFit(behind_outline=False))
        hidden[name] = (on & ~off, on_lift)
    chosen, lift = hidden["bald"]
    assert int(chosen.sum()) > 10 and float(lift[chosen].abs().max()) == 0.0
    chosen, lift = hidden["long"]
    out = chosen & (lift > 0)
    assert int(out.sum()) > 10
    assert float(lift[out].median()) > 0.01  # out past the jaw, not the mask's soft edge


def test_fitted_outline_fills_the_mask_in_the_source_and_in_a_view_it_did_not_see(head, generator: Generator) -> None:  # type: ignore[no-untyped-def]
    source_cams, other_cams = _cameras([0.0]), _cameras([100.0])
    sources = sources_of(head, source_cams, HAIR_MM)
    before = generator.base_local(1)
    after, lift, summary = _fit(generator, head, sources)
    assert summary["outline_lift_mm"] > 5.0
    # The Gaussians keep their place on their triangles: the lift moves the triangles.
    assert torch.equal(after.offset, before.offset) and torch.equal(after.log_scale, before.log_scale)

    def alpha(local: LocalGaussians, cams: Cameras, offset: torch.Tensor | None) -> torch.Tensor:
        return _render_local(head, generator.binding, local.map(lambda t: t[0]), cams, offset).alpha

    mask = sources.masks[0]
    assert _iou(alpha(after, source_cams, lift), mask) > _iou(alpha(before, source_cams, None), mask) + 0.03
    _, other_mask = person(head, other_cams, HAIR_MM)
    assert _iou(alpha(after, other_cams, lift), other_mask) > _iou(alpha(before, other_cams, None), other_mask) + 0.03


def test_a_bald_person_is_lifted_no_further_than_the_blur_of_the_masks_edge(head, generator: Generator) -> None:  # type: ignore[no-untyped-def]
    sources = sources_of(head, _cameras([0.0, 60.0]), 0.0)
    before = generator.base_local(1)
    after, lift, summary = _fit(generator, head, sources)
    # Measured against the bare head's own outline, a bald head has no hair to add: what is
    # left is the reference render's edge blur (a splat's width, about 2 mm at 40K Gaussians,
    # and a pixel, 2.3 mm) at a sample spacing of 2 mm.
    assert summary["outline_lift_mm"] < 1.0
    assert float(lift.norm(dim=-1).max()) < 0.005
    assert summary["outline_carved_share"] == 0.0
    assert torch.equal(after.opacity_logit, before.opacity_logit)


def test_carving_follows_the_mask_and_its_margin(head, generator: Generator) -> None:  # type: ignore[no-untyped-def]
    cams = _cameras([0.0])
    sources = sources_of(head, cams, 0.0)
    cut = SIZE // 2
    sources.masks[..., cut:, :, :] = 0.0  # no person below the middle row
    before = generator.base_local(1)
    after, _, _ = _fit(generator, head, sources, OutlineFit(carve_margin=0.05))
    verts = _rest(head)
    xy, _ = project(surface_points(verts, head.faces, generator.face_idx, generator.bary), cams)
    row = xy[0, 0, :, 1]
    margin = 0.05 * SIZE + 2
    opacity = torch.sigmoid(after.opacity_logit[0])
    assert float(opacity[row > cut + margin].max()) < 0.01
    above = row < cut - margin
    assert torch.equal(after.opacity_logit[0, above], before.opacity_logit[0, above])


def test_nothing_is_carved_where_the_crop_ran_past_its_source(head, generator: Generator) -> None:  # type: ignore[no-untyped-def]
    """The bottom half padded past the source's edge: its mask is 0 there, as tracking writes
    it, but no source pixel says that no person is there, so nothing is carved."""
    sources = sources_of(head, _cameras([0.0]), 0.0)
    cut = SIZE // 2
    sources.masks[..., cut:, :, :] = 0.0
    sources.known = torch.ones_like(sources.masks)
    sources.known[..., cut:, :, :] = 0.0
    before = generator.base_local(1)
    after, _, summary = _fit(generator, head, sources, OutlineFit(carve_margin=0.05))
    assert summary["outline_carved_share"] == 0.0
    assert torch.equal(after.opacity_logit, before.opacity_logit)


def test_the_lifted_shell_takes_the_colour_where_it_lands(head, generator: Generator) -> None:  # type: ignore[no-untyped-def]
    sources = sources_of(head, _cameras([0.0]), HAIR_MM)
    base = generator.base_local(1)
    grey = LocalGaussians(base.offset, base.rotation, base.log_scale, base.opacity_logit, torch.zeros_like(base.sh))
    after, lift, _ = _fit(generator, head, sources, local=grey)
    corners = generator.faces[generator.face_idx]
    lifted = (lift.norm(dim=-1)[corners] * generator.bary).sum(-1) > 0.008  # [N]: more than 8 mm out
    template = torch.as_tensor(np.asarray(head.data.v_template), dtype=torch.float32)
    front = (template[corners] * generator.bary[..., None]).sum(1)[:, 2] > float(template[:, 2].mean())  # the source's side
    changed = (after.sh[0, :, 0] - grey.sh[0, :, 0]).abs().amax(-1) > 1e-3
    # Where each lands in the source: on the hair (green), or on the face's skin (a lifted
    # hairline over the forehead).
    landed = surface_points(_rest(head, lift), head.faces, generator.face_idx, generator.bary)[0]
    xy, _ = project(landed, _cameras([0.0]))
    col, row = xy[0].long().clamp(0, SIZE - 1).unbind(-1)
    pixel = sources.images[0, 0, row, col]  # [N, 3]
    on_hair, on_skin = pixel[:, 1] - pixel[:, 0] > 0.3, pixel[:, 0] - pixel[:, 1] > 0.1
    rgb = 0.5 + SH_C0 * after.sh[0, :, 0]
    for landed_on, sign in ((on_hair, 1.0), (on_skin, -1.0)):
        chosen = lifted & front & changed & landed_on
        assert int(chosen.sum()) > 10
        assert float(sign * (rgb[chosen, 1] - rgb[chosen, 0]).median()) > 0.15


def test_hair_no_source_shows_takes_the_colour_of_the_hair_they_show(head, generator: Generator) -> None:  # type: ignore[no-untyped-def]
    """One frontal source: the back of the head is lifted (the measurements spread over the
    hair's region) but seen by nothing; its scalp must be hair-coloured, not the network's grey."""
    sources = sources_of(head, _cameras([0.0]), HAIR_MM)
    base = generator.base_local(1)
    grey = LocalGaussians(base.offset, base.rotation, base.log_scale, base.opacity_logit, torch.zeros_like(base.sh))
    after, lift, _ = _fit(generator, head, sources, local=grey)
    corners = generator.faces[generator.face_idx]
    template = torch.as_tensor(np.asarray(head.data.v_template), dtype=torch.float32)
    point = (template[corners] * generator.bary[..., None]).sum(1)
    lifted = (lift.norm(dim=-1)[corners] * generator.bary).sum(-1) > 0.008
    back = lifted & (point[:, 2] < float(template[:, 2].min()) + 0.04)  # the back of the head and neck
    scalp = part_weight(head.data, generator.binding, "scalp")
    assert int((back & (scalp == 1)).sum()) > 20
    rgb = 0.5 + SH_C0 * after.sh[0, back & (scalp == 1), 0]
    assert float((rgb[:, 1] - rgb[:, 0]).median()) > 0.2
    # Below the hairline (the back of the neck) only what stands off the head is hair; short
    # hair leaves skin there, so what stays on the head is left as the network made it.
    standing = (lift.norm(dim=-1)[corners] * generator.bary).sum(-1) >= OutlineFit().min_hair
    region = hair_weight(head.data, generator.binding, OutlineFit().hairline_ramp) > 0
    nape = region & (scalp == 0) & (point[:, 2] < float(template[:, 2].min()) + 0.04)
    assert int((nape & ~standing).sum()) > 5 and torch.equal(after.sh[0, nape & ~standing], grey.sh[0, nape & ~standing])
    if (nape & standing).any():
        rgb = 0.5 + SH_C0 * after.sh[0, nape & standing, 0]
        assert float((rgb[:, 1] - rgb[:, 0]).median()) > 0.2


def test_the_shell_reads_its_colour_inside_the_mask_not_at_its_soft_edge(head, generator: Generator) -> None:  # type: ignore[no-untyped-def]
    """Over a red background, the mask's soft edge mixes red into the pixels: with no margin
    some lifted Gaussians turn red, with the default margin none does."""
    sources = sources_of(head, _cameras([0.0, 60.0]), HAIR_MM)
    sources.images = sources.images - (1 - sources.masks) * torch.tensor([0.0, 1.0, 1.0])
    base = generator.base_local(1)
    # The network's colour is skin: any blend with it stays between skin and hair.
    skin_coloured = LocalGaussians(base.offset, base.rotation, base.log_scale, base.opacity_logit, torch.zeros_like(base.sh) + (torch.tensor(SKIN) - 0.5) / SH_C0)
    redness = {}
    for margin in (0.0, OutlineFit().colour_margin):
        after, lift, _ = _fit(generator, head, sources, OutlineFit(colour_margin=margin), local=skin_coloured)
        lifted = (lift.norm(dim=-1)[generator.faces[generator.face_idx]] * generator.bary).sum(-1) > 0.004
        rgb = 0.5 + SH_C0 * after.sh[0, lifted, 0]
        # Mixes of skin and hair lie on the segment between them; the background pulls off it.
        skin, hair = torch.tensor(SKIN), torch.tensor(HAIR)
        along = (((rgb - hair) @ (skin - hair)) / (skin - hair).square().sum()).clamp(0, 1)
        redness[margin] = float((rgb - hair - along[:, None] * (skin - hair)).norm(dim=-1).max())
    assert redness[0.0] > 0.05 and redness[OutlineFit().colour_margin] < 0.02, redness


def test_outline_does_not_depend_on_source_order(head, generator: Generator) -> None:  # type: ignore[no-untyped-def]
    sources = sources_of(head, _cameras([-50.0, 0.0, 60.0]), HAIR_MM)
    ref, ref_lift, _ = _fit(generator, head, sources)
    other, other_lift, _ = _fit(generator, head, sources.permuted([2, 0, 1]))
    torch.testing.assert_close(ref_lift, other_lift, atol=1e-6, rtol=1e-5)
    for f in fields(ref):
        torch.testing.assert_close(getattr(ref, f.name), getattr(other, f.name), atol=1e-5, rtol=1e-5)


def test_hair_may_cover_the_scalp_ears_and_the_skin_behind_them_not_the_face(head, generator: Generator) -> None:  # type: ignore[no-untyped-def]
    binding = generator.binding
    weight = hair_weight(head.data, binding, OutlineFit().hairline_ramp)
    corners = head.faces[binding.face_idx]
    masks = {k: torch.from_numpy(np.asarray(v, bool)) for k, v in head.data.part_masks.items()}
    on = lambda name: masks[name][corners].all(-1)  # noqa: E731
    template = torch.as_tensor(np.asarray(head.data.v_template), dtype=torch.float32)
    point = (template[corners] * binding.bary[..., None]).sum(1)  # [N, 3] on the neutral head
    ear_front = float(template[masks["ears"], 2].max())
    # Long hair falls over the ears and past the jaw behind them.
    behind_ears = masks["skin"][corners].all(-1) & (point[:, 2] < ear_front - 0.01) & (point[:, 1] < -0.04) & (point[:, 1] > -0.09)
    assert float(weight[on("scalp")].mean()) > 0.8
    assert float(weight[behind_ears].mean()) > 0.5
    assert float(weight[on("ears")].max()) > 0.5
    # Not the face in front of the ears, nor the throat.
    for name in ("nose", "upper_lip", "lower_lip", "eyelids", "brows"):
        assert float(weight[on(name)].max()) == 0.0, name
    cheeks = masks["skin"][corners].all(-1) & (point[:, 2] > ear_front + 0.02) & (point[:, 1] > -0.06) & (point[:, 1] < 0.02)
    throat = masks["neck"][corners].all(-1) & (point[:, 2] > 0.03)
    assert float(weight[cheeks].max()) == 0.0 and float(weight[throat].max()) == 0.0


def test_a_head_without_a_scalp_mask_gets_no_lift(generator: Generator) -> None:
    small = tiny_head()
    binding = Generator.for_head(preset("tiny"), small).binding
    assert not small.data.part_masks.get("scalp", torch.zeros(1)).any()
    assert float(hair_weight(small.data, binding, 0.02).abs().max()) == 0.0


def test_bad_settings_are_named() -> None:
    with pytest.raises(SettingError, match="max_lift"):
        OutlineFit().with_overrides({"max_lift": 0.0})
    with pytest.raises(SettingError, match="smooth"):
        OutlineFit().with_overrides({"smooth": 0})
    with pytest.raises(SettingError, match="colour_margin"):
        OutlineFit().with_overrides({"colour_margin": -0.01})
    with pytest.raises(SettingError, match="min_hair"):
        OutlineFit().with_overrides({"min_hair": 0.0})
