"""Synthetic looks: hair and facial-hair volumes bound to the head, and per-frame lighting."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.configs import SettingError
from backend.data.looks import BACK_HANG, Looks, LooksConfig, look_avatars, shade, template_points
from backend.data.synthetic import SynthConfig, synthesize
from backend.gaussians.avatar import deform
from backend.gaussians.frames import matrix_to_quat
from backend.gaussians.splats import Splats
from backend.head.model import HeadModel

LONG_HAIR_AND_BEARD = Looks(
    hair_style="long",
    hair_thickness=0.03,
    hair_reach=-0.13,
    fringe=0.008,
    beard=0.006,
    glasses=None,
    skin_texture=0.0,
    light=(0.0, 0.0, 1.0),
    ambient=1.0,
    tint=(1.0, 1.0, 1.0),
    seed=3,
)


def _template_points(head: HeadModel, face_idx: torch.Tensor, bary: torch.Tensor) -> np.ndarray:
    return template_points(head.data, face_idx.numpy(), bary.numpy())


def test_hair_stands_off_the_scalp_within_its_style_and_leaves_the_face_bare(head: HeadModel) -> None:
    shape = torch.zeros(head.n_shape)
    hair, beard = look_avatars(head, shape, LONG_HAIR_AND_BEARD, (0.3, 0.2, 0.1), 4000)
    neutral = head.neutral_params(1)

    for part, thickness in ((hair, BACK_HANG * LONG_HAIR_AND_BEARD.hair_thickness), (beard, LONG_HAIR_AND_BEARD.beard)):
        lifted = deform(part, head, neutral).means[0]
        on_skin = deform(replace(part, local=replace(part.local, offset=torch.zeros_like(part.local.offset))), head, neutral).means[0]
        height = (lifted - on_skin).norm(dim=-1)
        # A volume: from the skin to the style's outer surface, never beyond it.
        assert float(height.max()) <= thickness * 1.001
        assert float(height.max()) > 0.8 * thickness
        assert float(height.median()) > 0.2 * thickness

    p = _template_points(head, hair.binding.face_idx, hair.binding.bary)
    face_front = (p[:, 2] > 0.07) & (p[:, 1] < 0.03) & (p[:, 1] > -0.1)  # eyes, nose, mouth, chin
    assert not face_front.any()
    assert (p[:, 1] < -0.05).any(), "long hair reaches below the ears at the back"
    q = _template_points(head, beard.binding.face_idx, beard.binding.bary)
    assert (q[:, 1] < 0.0).all(), "facial hair stays below the eyes"
    on_nose = head.data.part_masks["nose"][head.data.faces[beard.binding.face_idx.numpy()]].all(axis=1)
    assert not on_nose.any()
    assert (q[:, 2] > -0.03).all(), "facial hair stays on the front half of the head"


def test_no_hair_where_the_style_has_none(head: HeadModel) -> None:
    bald = replace(LONG_HAIR_AND_BEARD, hair_style="buzz", hair_thickness=0.003, hair_reach=None, fringe=0.0, beard=0.0)
    (hair,) = look_avatars(head, torch.zeros(head.n_shape), bald, (0.1, 0.1, 0.1), 2000)
    p = _template_points(head, hair.binding.face_idx, hair.binding.bary)
    scalp = head.data.part_masks["scalp"]
    on_scalp = scalp[head.data.faces[hair.binding.face_idx.numpy()]].any(axis=1)
    assert on_scalp.all(), "a buzz cut keeps to the scalp"
    assert (p[:, 1] > -0.07).all()


def test_glasses_sit_in_front_of_the_eyes_and_stay_put_when_the_face_moves(head: HeadModel) -> None:
    looks = replace(LONG_HAIR_AND_BEARD, glasses=(0.05, 0.05, 0.05))
    shape = torch.zeros(head.n_shape)
    (glasses,) = [p for p in look_avatars(head, shape, looks, (0.3, 0.2, 0.1), 2000) if p.meta["role"] == "synthetic glasses"]
    neutral = head.neutral_params(1)
    at_rest = deform(glasses, head, neutral).means[0]
    rims = at_rest[at_rest[:, 2] > 0.08]
    assert len(rims) > 200, "two rims and a bridge in front of the eyes"
    for sign in (1, -1):
        rim = rims[rims[:, 0] * sign > 0.012]
        assert float(rim[:, 1].min()) < 0.0 < float(rim[:, 1].max()), "each rim circles its eye's height"
    moved = head.neutral_params(1)
    moved.jaw_pose[:, 0] = 0.3
    moved.expr[:, :10] = 1.0
    shift = (deform(glasses, head, moved).means[0] - at_rest).norm(dim=-1)
    assert float(shift.max()) < 0.0015, "glasses rest on the nose and temples, which barely move when the face speaks"
    assert not any(p.meta["role"] == "synthetic glasses" for p in look_avatars(head, shape, LONG_HAIR_AND_BEARD, (0.3, 0.2, 0.1), 2000))


def _splats_facing(normals: torch.Tensor) -> Splats:
    """One grey Gaussian per row of ``normals`` [N, 3], its local z axis along it."""
    n = torch.nn.functional.normalize(normals, dim=-1)
    helper = torch.tensor([0.0, 1.0, 0.0]).expand_as(n)
    t = torch.nn.functional.normalize(torch.cross(helper, n, dim=-1), dim=-1)
    b = torch.cross(n, t, dim=-1)
    quats = matrix_to_quat(torch.stack([t, b, n], dim=-1))
    count = len(n)
    return Splats(torch.zeros(count, 3), quats, torch.full((count, 3), 0.01), torch.ones(count), torch.full((count, 3), 0.5))


def test_shading_brightens_what_faces_the_light_and_keeps_what_faces_the_camera() -> None:
    looks = replace(LONG_HAIR_AND_BEARD, light=(0.6, 0.0, 0.8), ambient=0.3)
    lit = shade(_splats_facing(torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.6, 0.0, 0.8], [0.0, 0.0, 1.0]])), looks).colors[:, 0]
    sideways, away, at_light, at_camera = lit.tolist()
    assert at_light > at_camera > sideways > away
    assert away == pytest.approx(0.5 * 0.3 / (0.3 + 0.7 * 0.8), rel=1e-4), "the side away from the light keeps the ambient share"
    assert at_camera == pytest.approx(0.5, rel=1e-4)
    assert at_light == pytest.approx(min(1.0, 0.5 / (0.3 + 0.7 * 0.8)), rel=1e-4)
    tinted = shade(_splats_facing(torch.tensor([[0.0, 0.0, 1.0]])), replace(LONG_HAIR_AND_BEARD, ambient=0.5, tint=(1.1, 1.0, 0.9)))
    assert tinted.colors[0].tolist() == pytest.approx([0.55, 0.5, 0.45], rel=1e-4)


def _capture(head: HeadModel, out: Path, looks: bool) -> tuple[np.ndarray, dict, dict]:
    config = SynthConfig(
        frames=2, size=64, seed=11, reference_gaussians=8_000, looks=looks, looks_config=LooksConfig(style_weights=(0, 0, 0, 1))
    )
    root = synthesize(head, out, config)
    masks = np.stack([np.asarray(Image.open(root / "masks" / f"{t:05d}_00.png")) > 127 for t in range(2)])
    params = dict(np.load(root / "flame_param.npz"))
    return masks, params, json.loads((root / "subject.json").read_text())


def test_a_subject_with_looks_shows_hair_above_the_bare_head_with_the_same_face_and_motion(head: HeadModel, tmp_path: Path) -> None:
    bare_masks, bare_params, bare_info = _capture(head, tmp_path / "bare", looks=False)
    masks, params, info = _capture(head, tmp_path / "looks", looks=True)
    again, _, _ = _capture(head, tmp_path / "again", looks=True)

    assert "looks" not in bare_info["extra"]
    assert info["extra"]["looks"]["hair_style"] == "long"
    assert set(params) - set(bare_params) == {"static_offset"}
    for key in bare_params:
        np.testing.assert_array_equal(params[key], bare_params[key])  # same identity and motion
    # The static offset lifts the head's surface to the hair's outer surface, the face not at all.
    lift = np.linalg.norm(params["static_offset"].reshape(-1, 3), axis=1)
    thickness = info["extra"]["looks"]["hair_thickness"]
    crown = int(np.argmax(head.data.v_template[:, 1]))
    assert lift[crown] == pytest.approx(thickness, rel=0.05)
    nose = head.data.part_masks["nose"]
    assert lift[nose].max() == 0.0
    assert lift.max() <= BACK_HANG * thickness * 1.001
    np.testing.assert_array_equal(masks, again)  # reproducible from the seed
    top = [int(np.argmax(m.any(axis=1))) for m in masks]
    bare_top = [int(np.argmax(m.any(axis=1))) for m in bare_masks]
    assert all(t < b for t, b in zip(top, bare_top)), "the hair rises above the bare skull"
    assert masks.sum() > 1.1 * bare_masks.sum()


def test_bad_looks_settings_are_refused() -> None:
    with pytest.raises(SettingError, match="beard_chance"):
        SynthConfig().with_overrides({"looks": True, "looks_config.beard_chance": 2.0})
    with pytest.raises(SettingError, match="style_weights"):
        LooksConfig(style_weights=(0, 0, 0, 0)).check()


def test_the_synth_command_draws_looks_on_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from backend.cli import main

    assert main(["synth", str(tmp_path / "s"), "--frames", "1", "--size", "48", "--reference-gaussians", "4000", "--looks", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["frames"] == 1
    info = json.loads((tmp_path / "s" / "subject.json").read_text())
    assert info["extra"]["synth"]["looks"] is True and info["extra"]["looks"]["hair_style"] in ("buzz", "short", "medium", "long")


def test_a_corpus_mixes_looks_and_bare_identities_evenly(tmp_path: Path) -> None:
    from tests.benchmarks.make_synthetic_corpus import parse_args, plan

    def looks_of(*flags: str) -> tuple[list[bool], list[int]]:
        args = parse_args(["--out", str(tmp_path), "--mono", "40", "--multi", "10", "--test-mono", "0", "--test-multi", "0", *flags])
        tasks = [config for out, config in plan(args) if "/train/mono/" in out]
        return [config["looks"] for config in tasks], [config["seed"] for config in tasks]

    half, seeds = looks_of("--looks", "--looks-share", "0.5")
    assert abs(sum(half) - 20) <= 1 and 4 <= sum(half[:10]) <= 6  # spread over the group, not its first half
    every, same_seeds = looks_of("--looks")
    assert all(every) and seeds == same_seeds == list(range(40))  # the share never changes who is who
    assert not any(looks_of("--looks-share", "0.5")[0]) and not any(looks_of("--looks", "--looks-share", "0")[0])
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--looks", "--looks-share", "1.5"])
