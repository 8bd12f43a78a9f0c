"""Per-frame colour gains of a refinement: a camera's exposure and white balance (and light
that changes as the head turns) kept out of the Gaussians' colours (``RefineConfig.exposure``)."""

from __future__ import annotations

import torch


def frame_gains(log_gain: torch.Tensor) -> torch.Tensor:
    """[T, 3] learnt log-gains -> [T, 3] per-channel gains whose logs have zero mean over the
    T frames, so the avatar's own colours hold the clip's mean exposure."""
    return torch.exp(log_gain - log_gain.mean(dim=0, keepdim=True))


def exposed(rgb: torch.Tensor, alpha: torch.Tensor, background: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Renders with their covered part scaled, the background left as it is.

    Args:
        rgb: [B, H, W, 3] composited over ``background`` [3] with coverage ``alpha`` [B, H, W, 1].
        gain: [B, 3] one gain per view and channel.
    """
    behind = (1 - alpha) * background
    return (rgb - behind) * gain[:, None, None, :] + behind
