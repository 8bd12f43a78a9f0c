"""Colours the training views barely constrain, set back to the start's after refinement
(backend/refine/faint.py), on a synthetic subject whose frames' top band lies past the
source's edge."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from backend.data.subject import Subject, frame_name
from backend.data.synthetic import SynthConfig, synthesize
from backend.gaussians.avatar import deform
from backend.head.model import HeadModel
from backend.refine.config import FaintColours, LearningRates, RefineConfig
from backend.refine.faint import coverage, faint_rows, restore_colours
from backend.refine.initialize import InitConfig, initialize_on_subject
from backend.refine.refine import refine
from backend.refine.regularizers import AntiSpike
from backend.render.rasterize import render
from backend.wire.errors import InputError


@pytest.fixture(scope="module")
def cut(head: HeadModel, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A subject whose crops start ``band`` rows above the source (the top of the head is
    unknown in every frame), and the surface start on it."""
    root = synthesize(head, tmp_path_factory.mktemp("faint") / "mono", SynthConfig(frames=8, size=96, seed=7, reference_gaussians=40_000))
    size, band = 96, 30
    for t in range(8):
        for folder, value in (("images", 255), ("masks", 0)):
            path = root / folder / frame_name(t, 0)
            img = np.asarray(Image.open(path)).copy()
            img[:band] = value
            Image.fromarray(img).save(path)
    info = json.loads((root / "subject.json").read_text())
    frames = [{"box": [0, -band, size], "size": [size, size - band]}] * 8
    (root / "subject.json").write_text(json.dumps(info | {"extra": {"tracking": {"frames": frames}}}))
    subject = Subject.load(root)
    return subject, initialize_on_subject(head, subject, InitConfig(gaussians=4_000)), band


SHARE_ONLY = FaintColours(min_known_px=0.0, min_facing=0.0)  # the rule for pixels past the edge alone


def _train_vertices(head: HeadModel, subject: Subject, avatar) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """[T, V, 3] the avatar's head posed at the training frames."""
    return head(avatar.params_for(subject.params.index(subject.split["train"]))).vertices


def test_coverage_splits_each_pixels_alpha_among_the_gaussians(head: HeadModel, cut) -> None:  # type: ignore[no-untyped-def]
    subject, avatar, band = cut
    frames = subject.split["train"]
    seen = coverage(_train_vertices(head, subject, avatar), head.faces, avatar.binding, avatar.local, subject, frames, batch=3)
    known_px, total_px = seen.known, seen.total
    # The weights of all Gaussians at a pixel add up to its alpha, so the sums over the
    # Gaussians are the rendered alpha summed over the pixels (known ones for known_px).
    alpha_all, alpha_known = 0.0, 0.0
    for t in frames:
        splats = deform(avatar, head, subject.params.index([t]))
        out = render(splats, subject.cameras([t]), torch.zeros(3), depth=False)
        alpha_all += float(out.alpha.sum())
        alpha_known += float((out.alpha[0, 0] * subject.known(t)).sum())
    assert float(total_px.sum()) == pytest.approx(alpha_all, rel=1e-3)
    assert float(known_px.sum()) == pytest.approx(alpha_known, rel=1e-3)
    assert bool((known_px <= total_px + 1e-4).all()) and bool((known_px >= -1e-6).all())
    assert alpha_known < 0.9 * alpha_all  # the band holds part of the head

    # The Gaussians whose centres lie in the band in every frame are faint; most of those
    # below it are not.
    rows = torch.stack([_pixel_rows(head, subject, avatar, t) for t in frames])  # [T, N]
    in_band, below = (rows < band - 4).all(0), (rows > band + 8).all(0) & (total_px > 1.0)
    faint = faint_rows(seen, SHARE_ONLY)
    assert int(in_band.sum()) > 50 and int(below.sum()) > 500
    assert float(faint[in_band & (total_px > 0)].float().mean()) > 0.95
    assert float(faint[below].float().mean()) < 0.05

    # Where every pixel is known the weights agree exactly and nothing is faint.
    whole = Subject(subject.root, replace(subject.info, extra={}), subject.params, subject.K, subject.world_to_cam)
    inside = coverage(_train_vertices(head, whole, avatar)[:2], head.faces, avatar.binding, avatar.local, whole, frames[:2])
    assert torch.equal(inside.known, inside.total) and not bool(faint_rows(inside, SHARE_ONLY).any())


def test_facing_is_the_known_weights_mean_cosine(head: HeadModel, cut) -> None:  # type: ignore[no-untyped-def]
    subject, avatar, _ = cut
    frames = subject.split["train"][:3]
    verts = _train_vertices(head, subject, avatar)[:3]
    seen = coverage(verts, head.faces, avatar.binding, avatar.local, subject, frames)
    # Each view's |cos| between the Gaussian's triangle normal and its line of sight, from
    # the triangles' corners: the weighted mean lies between its smallest and largest.
    tri = verts[:, head.faces[avatar.binding.face_idx]]  # [T, N, 3, 3]
    normal = torch.nn.functional.normalize(torch.linalg.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0]), dim=-1)
    means = torch.stack([deform(avatar, head, subject.params.index([t])).means[0] for t in frames])
    sight = torch.nn.functional.normalize(means - subject.cameras(frames).centers[:, :1], dim=-1)
    cos = (normal * sight).sum(-1).abs()  # [T, N]
    shown = seen.known > 1e-3
    mean = seen.facing[shown] / seen.known[shown]
    assert bool((mean >= cos.amin(0)[shown] - 1e-4).all()) and bool((mean <= cos.amax(0)[shown] + 1e-4).all())
    # The synthetic head faces its camera: most of the weight comes square on, and the
    # rule flags the Gaussians whose mean lies under the threshold.
    assert float(seen.facing.sum() / seen.known.sum()) > 0.6
    edge_on = faint_rows(seen, FaintColours(min_known_share=0.0, min_known_px=0.0, min_facing=0.3))
    assert torch.equal(edge_on, seen.facing < 0.3 * seen.known)
    assert 0.0 < float(edge_on[shown].float().mean()) < 0.5


def _pixel_rows(head: HeadModel, subject: Subject, avatar, t: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """[N] image row of each Gaussian's centre in frame t."""
    means = deform(avatar, head, subject.params.index([t])).means[0]
    cams = subject.cameras([t])
    cam = means @ cams.world_to_cam[0, 0, :3, :3].T + cams.world_to_cam[0, 0, :3, 3]
    return cams.K[0, 0, 1, 1] * cam[:, 1] / cam[:, 2] + cams.K[0, 0, 1, 2]


def test_refinement_sets_faint_colours_back_and_leaves_the_rest(head: HeadModel, cut) -> None:  # type: ignore[no-untyped-def]
    subject, avatar, _ = cut
    # A fast colour rate: the band's Gaussians are driven to the gamut's corners within 40 steps.
    config = RefineConfig(iterations=40, log_every=40, anti_spike=AntiSpike(max_scale=3.0), lr=LearningRates(sh_dc=2.5e-2))
    assert config.faint.enabled  # the default
    plain = refine(avatar, head, subject, replace(config, faint=FaintColours(enabled=False))).avatar
    settled = refine(avatar, head, subject, config).avatar
    train = subject.split["train"]
    seen = coverage(_train_vertices(head, subject, avatar), head.faces, settled.binding, plain.local, subject, train)
    faint = faint_rows(seen, FaintColours())
    assert 0.01 < settled.meta["faint_share"] == pytest.approx(float(faint.float().mean()))
    assert torch.equal(settled.local.sh, restore_colours(plain.local, avatar.local, faint).sh)
    assert torch.equal(settled.local.sh[faint], avatar.local.sh[faint])
    moved = (plain.local.sh[faint] - avatar.local.sh[faint]).abs().amax((1, 2))
    assert float((moved > 0.05).float().mean()) > 0.3  # without the pass those colours had left the start
    for name in ("offset", "rotation", "log_scale", "opacity_logit"):
        assert torch.equal(getattr(settled.local, name), getattr(plain.local, name))
    assert "faint_share" not in plain.meta
    # Only colours changed, and each pixel's colour is the weights times the colours: on the
    # known pixels of the training views the renders differ by at most the flagged Gaussians'
    # known weight (colours lie in [0, 1]), a small share of what the views show.
    change = 0.0
    for t in train:
        a, b = (render(deform(x, head, subject.params.index([t])), subject.cameras([t]), torch.zeros(3), depth=False).rgb for x in (plain, settled))
        change += float(((a - b).abs() * subject.known(t)).amax(-1).sum())
    assert 0.0 < change <= float(seen.known[faint].sum()) * 1.001 + 1e-3
    assert float(seen.known[faint].sum()) < 0.2 * float(seen.known.sum())


def test_faint_settings_are_checked() -> None:
    for bad in (FaintColours(min_known_share=-0.1), FaintColours(min_known_share=1.5), FaintColours(min_known_px=-1.0), FaintColours(min_facing=1.5)):
        with pytest.raises(InputError):
            RefineConfig(faint=bad).with_overrides({})
    assert not RefineConfig.from_dict(RefineConfig(faint=FaintColours(enabled=False)).to_dict()).faint.enabled


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_coverage_through_gsplat_matches_the_reference(head: HeadModel, cut) -> None:  # type: ignore[no-untyped-def]
    subject, avatar, _ = cut
    frames = subject.split["train"][:4]
    verts = head(avatar.params_for(subject.params.index(frames))).vertices
    on_cpu = coverage(verts, head.faces, avatar.binding, avatar.local, subject, frames)
    gpu = HeadModel(head.data).to("cuda")  # a copy: the fixture's head stays on the CPU
    local = avatar.local.map(lambda t: t.cuda())
    on_gpu = coverage(verts.cuda(), gpu.faces, avatar.binding.to("cuda"), local, subject, frames)
    for ref, got in zip(on_cpu, on_gpu):
        assert float(got.sum().cpu()) == pytest.approx(float(ref.sum()), rel=0.02)
        seen = ref > 1.0
        assert float(((got.cpu()[seen] - ref[seen]).abs() / ref[seen]).median()) < 0.05
