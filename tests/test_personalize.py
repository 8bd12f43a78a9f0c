"""Personalization: a generated avatar refined briefly on its own sources, held near its start."""

from __future__ import annotations

import pytest
import torch

from backend.configs import SettingError
from backend.data.subject import Subject
from backend.data.synthetic import SynthConfig, synthesize
from backend.gaussians.surface import surface_avatar
from backend.generate.personalize import Personalization, personalize
from backend.head.model import HeadModel
from backend.refine.evaluate import evaluate
from backend.refine.regularizers import AntiSpike


@pytest.fixture(scope="module")
def grey_start(head: HeadModel, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A synthetic subject and a flat grey avatar of its identity (a stand-in for a generated one)."""
    subject = Subject.load(synthesize(head, tmp_path_factory.mktemp("p") / "s", SynthConfig(frames=3, size=64, seed=2, reference_gaussians=10_000)))
    grey = surface_avatar(head, subject.params.shape, 16_000, lambda f, b: torch.full((f.shape[0], 3), 0.5))
    return subject, grey


def test_personalization_takes_in_its_source_and_records_it(head: HeadModel, grey_start) -> None:  # type: ignore[no-untyped-def]
    subject, grey = grey_start
    config = Personalization(iterations=60, lr_factor=10.0)
    out = personalize(grey, head, subject, [(0, 0)], config)
    before, after = (evaluate(a, head, subject, frames=[0])["psnr_mask"] for a in (grey, out))
    assert after > before + 2.0, (before, after)
    assert out.meta["personalized"] == {"iterations": 60, "hold": config.hold, "lr_factor": 10.0, "frames": [0]}
    assert torch.equal(out.binding.face_idx, grey.binding.face_idx) and torch.equal(out.shape, grey.shape)


def test_hold_keeps_gaussians_near_their_start(head: HeadModel, grey_start) -> None:  # type: ignore[no-untyped-def]
    subject, grey = grey_start

    def moved(hold: float) -> float:
        out = personalize(grey, head, subject, [(0, 0)], Personalization(iterations=30, hold=hold, lr_factor=10.0))
        return float((out.local.sh - grey.local.sh).abs().mean())

    assert moved(1.0) < 0.5 * moved(0.0)


def test_bad_settings_name_their_field() -> None:
    with pytest.raises(SettingError, match="hold"):
        Personalization(hold=-1.0).check()


def test_a_sparse_generated_layout_is_personalized_with_a_wider_scale_threshold(head: HeadModel, grey_start) -> None:  # type: ignore[no-untyped-def]
    """A generator of few Gaussians starts them large; refinement's default threshold would
    refuse the layout as coarse, personalization widens it with the spacing."""
    subject, _ = grey_start
    sparse = surface_avatar(head, subject.params.shape, 3_000, lambda f, b: torch.full((f.shape[0], 3), 0.5))
    out = personalize(sparse, head, subject, [(0, 0)], Personalization(iterations=2))
    assert out.meta["refine_config"]["anti_spike"]["max_scale"] > AntiSpike().max_scale * 5
