"""The outline step after the generator: hair volume read from the sources' person masks,
carving where a mask says no person is, and the lifted shell's colours.

The "person" is the built-in head (it has a scalp part mask) with hair of known thickness:
the Gaussians of its hair region (scalp, sides and back of the neck) stand 15 mm off it. Its render gives the sources'
images and masks; an untrained "tiny" generator gives the plain surface head the step starts
from. CPU only, a few seconds.
"""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from backend.configs import SettingError
from backend.gaussians.avatar import SH_C0, LocalGaussians, deform_local
from backend.gaussians.frames import surface_points, triangle_frames
from backend.gaussians.layout import sample_layout
from backend.gaussians.surface import SurfaceInit, surface_local
from backend.generate.model import Generator, SourceViews, preset
from backend.generate.outline import OutlineFit, fit_outline, hair_weight, measure_lift
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


def _render_local(head, binding, local: LocalGaussians, cams: Cameras):  # type: ignore[no-untyped-def]
    verts = head(FlameParams.neutral(1, head.n_shape, head.n_expr)).vertices
    splats = deform_local(verts, head.faces, binding, local).frame(0)
    return render(splats, cams, torch.ones(3))


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
    verts = head(FlameParams.neutral(1, head.n_shape, head.n_expr)).vertices.expand(c, -1, -1)
    return SourceViews(images[None], masks[None], verts[None], cams.K[None], cams.world_to_cam[None])


def _surface(generator: Generator) -> LocalGaussians:
    return generator.base_local(1)


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
    # A bald head's mask ends a splat's blur beyond its mesh; a cap adds its thickness.
    assert medians[0.0] <= 6.0, medians
    assert abs(medians[HAIR_MM] - medians[0.0] - HAIR_MM) <= 3.0, medians


def test_fitted_outline_fills_the_mask_in_the_source_and_in_a_view_it_did_not_see(head, generator: Generator) -> None:  # type: ignore[no-untyped-def]
    source_cams, other_cams = _cameras([0.0]), _cameras([100.0])
    sources = sources_of(head, source_cams, HAIR_MM)
    hair = hair_weight(head.data, generator.binding, OutlineFit().hairline_ramp)
    before = _surface(generator)
    after, summary = fit_outline(generator, sources, before, hair, OutlineFit())
    assert summary["outline_lift_mm"] > 5.0
    one = lambda local, cams: _render_local(head, generator.binding, local.map(lambda t: t[0]), cams).alpha  # noqa: E731
    mask = sources.masks[0]
    assert _iou(one(after, source_cams), mask) > _iou(one(before, source_cams), mask) + 0.03
    _, other_mask = person(head, other_cams, HAIR_MM)
    assert _iou(one(after, other_cams), other_mask) > _iou(one(before, other_cams), other_mask) + 0.03


def test_a_bald_person_is_lifted_no_further_than_the_blur_of_the_masks_edge(head, generator: Generator) -> None:  # type: ignore[no-untyped-def]
    sources = sources_of(head, _cameras([0.0, 60.0]), 0.0)
    hair = hair_weight(head.data, generator.binding, OutlineFit().hairline_ramp)
    before = _surface(generator)
    after, summary = fit_outline(generator, sources, before, hair, OutlineFit())
    # The reference render's edge blurs a splat's width (about 2 mm at 40K Gaussians) and a
    # pixel (2.3 mm) beyond the mesh; samples are 2 mm apart.
    assert summary["outline_lift_mm"] < 6.0
    assert summary["outline_carved_share"] == 0.0
    assert torch.equal(after.opacity_logit, before.opacity_logit)


def test_carving_follows_the_mask_and_its_margin(head, generator: Generator) -> None:  # type: ignore[no-untyped-def]
    cams = _cameras([0.0])
    sources = sources_of(head, cams, 0.0)
    cut = SIZE // 2
    sources.masks[..., cut:, :, :] = 0.0  # no person below the middle row
    hair = hair_weight(head.data, generator.binding, OutlineFit().hairline_ramp)
    before = _surface(generator)
    after, _ = fit_outline(generator, sources, before, hair, OutlineFit(carve_margin=0.05))
    verts = head(FlameParams.neutral(1, head.n_shape, head.n_expr)).vertices
    xy, _ = project(surface_points(verts, head.faces, generator.face_idx, generator.bary), cams)
    row = xy[0, 0, :, 1]
    margin = 0.05 * SIZE + 2
    opacity = torch.sigmoid(after.opacity_logit[0])
    assert float(opacity[row > cut + margin].max()) < 0.01
    above = row < cut - margin
    assert torch.equal(after.opacity_logit[0, above], before.opacity_logit[0, above])


def test_the_lifted_shell_takes_the_colour_where_it_lands(head, generator: Generator) -> None:  # type: ignore[no-untyped-def]
    sources = sources_of(head, _cameras([0.0]), HAIR_MM)
    hair = hair_weight(head.data, generator.binding, OutlineFit().hairline_ramp)
    before = _surface(generator)
    before = LocalGaussians(before.offset, before.rotation, before.log_scale, before.opacity_logit, torch.zeros_like(before.sh))  # grey
    after, _ = fit_outline(generator, sources, before, hair, OutlineFit())
    lifted = after.offset[0, :, 2] > before.offset[0, :, 2] + 1.0  # at least a triangle out
    changed = (after.sh[0, :, 0] - before.sh[0, :, 0]).abs().amax(-1) > 1e-3
    assert int((lifted & changed).sum()) > 10
    rgb = 0.5 + SH_C0 * after.sh[0, lifted & changed, 0]
    # Green hair, not skin: the lifted Gaussians that were recoloured landed on the cap.
    assert float((rgb[:, 1] - rgb[:, 0]).median()) > 0.2


def test_outline_does_not_depend_on_source_order(head, generator: Generator) -> None:  # type: ignore[no-untyped-def]
    sources = sources_of(head, _cameras([-50.0, 0.0, 60.0]), HAIR_MM)
    hair = hair_weight(head.data, generator.binding, OutlineFit().hairline_ramp)
    ref, _ = fit_outline(generator, sources, _surface(generator), hair, OutlineFit())
    other, _ = fit_outline(generator, sources.permuted([2, 0, 1]), _surface(generator), hair, OutlineFit())
    for f in fields(ref):
        torch.testing.assert_close(getattr(ref, f.name), getattr(other, f.name), atol=1e-5, rtol=1e-5)


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
