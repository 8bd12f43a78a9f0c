"""The subject format and synthetic subjects."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from backend.data.subject import Subject, default_split, frame_name
from backend.data.synthetic import SynthConfig, synthesize
from backend.gaussians.avatar import deform
from backend.head.model import HeadModel
from backend.render.camera import project
from backend.wire.errors import InputError


@pytest.fixture(scope="module")
def synthetic(head: HeadModel, tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("subj") / "mono"
    return synthesize(head, root, SynthConfig(frames=5, views=2, size=64, seed=3, reference_gaussians=20_000))


def test_default_split_is_last_fifth() -> None:
    assert default_split(10) == {"train": list(range(8)), "test": [8, 9]}
    assert default_split(1) == {"train": [0], "test": []}


def test_synthetic_subject_validates_against_format(head: HeadModel, synthetic) -> None:  # type: ignore[no-untyped-def]
    s = Subject.load(synthetic)
    assert s.num_frames == 5 and s.num_cameras == 2
    assert s.info.source == "synthetic" and s.info.head_model == head.name
    assert s.params.expr_names == head.expr_names  # flame_param.npz names the head's expressions
    assert s.split["test"] == [4]
    img, mask = s.image(4, 1), s.mask(4, 1)
    assert img.shape == (64, 64, 3) and mask.shape == (64, 64, 1)
    # The head is in view and the mask matches the non-background pixels.
    fg = mask[..., 0] > 0.5
    assert 0.05 < float(fg.float().mean()) < 0.8
    differs = (img - s.background()).abs().amax(-1) > 0.05
    assert float((differs == fg).float().mean()) > 0.95


def test_synthetic_landmarks_project_inside_the_mask(head: HeadModel, synthetic) -> None:  # type: ignore[no-untyped-def]
    """Cameras, parameters and images agree: the posed head's landmarks fall on the head in the image."""
    s = Subject.load(synthetic)
    out = head(s.params.index([2]))
    xy, depth = project(out.landmarks[0], s.cameras(2))
    for c in range(s.num_cameras):
        mask = s.mask(2, c)[..., 0]
        px = xy[c].floor().long()
        ok = (px[:, 0] >= 0) & (px[:, 0] < 64) & (px[:, 1] >= 0) & (px[:, 1] < 64)
        hits = mask[px[ok, 1], px[ok, 0]] > 0.5
        assert float(hits.float().mean()) > 0.9


def test_synthetic_is_deterministic(head: HeadModel, synthetic, tmp_path) -> None:  # type: ignore[no-untyped-def]
    again = synthesize(head, tmp_path / "again", SynthConfig(frames=5, views=2, size=64, seed=3, reference_gaussians=20_000))
    a, b = Subject.load(synthetic), Subject.load(again)
    assert torch.equal(a.params.expr, b.params.expr)
    assert torch.equal(a.image(3, 0), b.image(3, 0))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: (r / "images" / frame_name(1, 0)).unlink(), "frame files missing"),
        (lambda r: (r / "images" / frame_name(1, 0)).write_bytes(b"not a png"), "unreadable image"),
        (lambda r: np.savez(r / "flame_param.npz", expr=np.zeros((3, 50), np.float32)), "has 3 frames"),
        (lambda r: (r / "subject.json").write_text("{"), "not valid JSON"),
        (lambda r: (r / "cameras.npz").unlink(), "cameras.npz is missing"),
    ],
)
def test_damaged_subjects_are_refused(synthetic, tmp_path, damage, message) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "copy"
    shutil.copytree(synthetic, root)
    damage(root)
    with pytest.raises(InputError, match=message):
        s = Subject.load(root)
        s.image(1, 0)


def test_split_outside_frames_is_refused(synthetic, tmp_path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "copy"
    shutil.copytree(synthetic, root)
    meta = json.loads((root / "subject.json").read_text())
    meta["split"]["test"] = [99]
    (root / "subject.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="outside"):
        Subject.load(root)


@pytest.mark.parametrize(
    "crop, message",
    [
        ({"box": [0, -4], "size": [64, 60]}, r"frames\[2\]\): box \[0, -4\] is not 3 numbers \[x0, y0, side\]"),
        ({"box": [0, "top", 64], "size": [64, 60]}, r"frame 2 .*box .* is not 3 numbers"),
        ({"box": [0, -4, 64], "size": [64, 0]}, r"frame 2 .*size \[64, 0\] needs a positive width and height"),
        ({"box": [0, -4, 64], "size": [64, None]}, r"frame 2 .*size .* is not 2 numbers \[width, height\]"),
        ({"box": [0, -4, 64], "size": 64}, r"frame 2 .*size 64 is not 2 numbers"),
    ],
)
def test_malformed_crop_records_are_refused(synthetic, tmp_path, crop, message) -> None:  # type: ignore[no-untyped-def]
    """A tracked subject's per-frame crop records (read by Subject.known) are checked on load:
    the error names subject.json and the frame. Missing records, or records without a source
    size (older tracked subjects), load as before."""
    root = tmp_path / "copy"
    shutil.copytree(synthetic, root)
    meta = json.loads((root / "subject.json").read_text())
    good = {"box": [0, -4, 64], "size": [64, 60]}
    for frames in ([good] * 5, [{"box": [0, -4, 64]}] * 5, []):
        meta["extra"] = {"tracking": {"frames": frames}}
        (root / "subject.json").write_text(json.dumps(meta))
        Subject.load(root).known(2)
    meta["extra"] = {"tracking": {"frames": [good, good, crop, good, good]}}
    (root / "subject.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=message) as err:
        Subject.load(root)
    assert "subject.json" in str(err.value)


def test_reference_differs_from_fitted_layout(head: HeadModel) -> None:
    """Ground truth never comes from the avatar being fitted: its layout is much denser."""
    from backend.data.synthetic import reference_head

    ref, _ = reference_head(head, SynthConfig(reference_gaussians=50_000), np.random.default_rng(0))
    assert ref.count == 50_000
    splats = deform(ref, head, head.neutral_params(1))
    assert bool((splats.opacities > 0.99).all())


def test_synthetic_identities_differ_from_side_to_side(head: HeadModel) -> None:
    """The markings make one side of a head unlike the other, so one view does not predict the
    rest: 10-25% of an identity's vertices differ by more than 0.1 from their mirror vertex;
    without markings (skin tone plus 6% noise) at most 0.1% do."""
    from backend.data.albedo import AlbedoParams, vertex_albedo

    v = head.data.v_template
    flipped = v * np.array([-1, 1, 1], np.float32)
    # [V]: the vertex nearest each vertex's mirror image across x = 0 (rows in chunks: V x V is large)
    mirror = np.concatenate([np.argmin(((f[:, None] - v[None]) ** 2).sum(-1), axis=1) for f in np.array_split(flipped, 40)])
    for seed in range(4):
        params = AlbedoParams.random(np.random.default_rng(seed))
        colour = vertex_albedo(head.data, params)
        asymmetry = np.abs(colour - colour[mirror]).max(axis=1)
        assert (asymmetry > 0.1).mean() > 0.05, seed
        assert np.array_equal(colour, vertex_albedo(head.data, params))  # deterministic per identity


def test_a_crop_past_the_source_edge_knows_which_pixels_are_the_sources() -> None:
    from backend.data.subject import inside_source
    from backend.tracking.crop import crop_image

    inside = inside_source((-10, 5, 40), (30, 50), 20)  # 2 source pixels per crop pixel
    assert inside.shape == (20, 20)
    assert not inside[:, :5].any() and inside[:, 5:].all()  # columns left of the source's edge
    source = np.full((50, 30, 3), 7, np.uint8)
    img, valid = crop_image(source, np.array([-10, 5, 40]), 20, fill=(200, 200, 200))
    assert np.array_equal(valid, inside)
    assert (img[:, :2] == 200).all() and (img[:, 8:] == 7).all()  # the edge itself rings (Lanczos)
