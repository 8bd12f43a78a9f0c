"""The real benchmark's protocol settings, in one place."""

from __future__ import annotations

from dataclasses import dataclass

# Methods scored on every clip, in table order. "generator" is Stage 1 alone (zero-shot).
METHODS = ("generator", "ours-generator", "ours-surface", "no-antispike", "densify")
METHOD_LABELS = {
    "generator": "generated, K = 1 (zero-shot)",
    "ours-generator": "ours from the generator",
    "ours-surface": "ours from the surface",
    "no-antispike": "baseline (b), no anti-spike",
    "densify": "baseline (a), densification",
}


@dataclass(frozen=True)
class Protocol:
    """Attributes:
    size: side of the tracked crops, pixels (refinement and scores at this size).
    max_frames: clips are tracked with the stride that keeps at most this many frames,
        spread over the whole clip; the last 20% of them are held out.
    iterations: refinement budget of every method.
    gaussians: Gaussians of the surface start (ours, (a) and (b)); the generator's
        avatars have the layout it was trained with.
    train_every: training-frame PSNR is taken on every n-th training frame.
    turntable_deg: the turntable figure spans +- this yaw.
    jpeg_quality: frames travel to the GPU machine as JPEG of this quality; the decoded
        frames are the ground truth every method is scored against.
    """

    size: int = 512
    max_frames: int = 120
    iterations: int = 10_000
    gaussians: int = 100_000
    train_every: int = 4
    turntable_deg: float = 45.0
    jpeg_quality: int = 90
