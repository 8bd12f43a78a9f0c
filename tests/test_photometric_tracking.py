"""Photometric tracking moves misplaced frames' parameters back toward the truth."""

from __future__ import annotations

from dataclasses import replace

import torch

from backend.data.subject import Subject
from backend.data.synthetic import SynthConfig, synthesize
from backend.head.model import HeadModel
from backend.refine.photometric_tracking import PhotometricTracking, track_photometric


def test_a_shifted_head_is_pulled_back_onto_its_images(head: HeadModel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    truth = Subject.load(synthesize(head, tmp_path / "s", SynthConfig(frames=3, size=64, seed=3, reference_gaussians=10_000)))
    # Frames 1-2 tracked 4 mm to the subject's left; frame 0 (the start's colour reference) right.
    shift = torch.tensor([0.004, 0.0, 0.0])
    moved = truth.params.translation.clone()
    moved[1:] += shift
    off = Subject(truth.root, truth.info, replace(truth.params, translation=moved), truth.K, truth.world_to_cam)

    # A short CPU schedule: each frame is drawn ~40 times, so FLAME's rates are raised to match.
    tracked = track_photometric(head, off, PhotometricTracking(gaussians=3_000, iterations=120, flame_lr_factor=150.0))

    before = (moved[1:] - truth.params.translation[1:]).norm(dim=-1)
    after = (tracked.params.translation[1:] - truth.params.translation[1:]).norm(dim=-1)
    assert float(after.mean()) < 0.5 * float(before.mean()), (before, after)
    # Only the per-frame parameters move: identity, cameras, images and the split stay.
    assert torch.equal(tracked.params.shape, off.params.shape)
    assert torch.equal(tracked.K, off.K) and torch.equal(tracked.world_to_cam, off.world_to_cam)
    assert tracked.split == off.split and tracked.root == off.root
