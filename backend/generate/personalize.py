"""Personalization: a generated avatar refined briefly on its own sources.

The generator's head is an average over what it has seen of people; the K photos it was
made from show this person's hair colour, skin and lighting. A short refinement on those K
views (the layout frozen, the anti-spike hinges on) takes them in. With one to four views,
most Gaussians are seen weakly or not at all, and Adam would move a weakly seen one as far
as a plainly seen one; ``RefineConfig.hold`` pulls every Gaussian back toward its generated
value, so what the sources do not show stays as the generator made it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Sequence

from backend.configs import Config, above, at_least
from backend.data.subject import Subject
from backend.gaussians.avatar import Avatar
from backend.head.model import HeadModel
from backend.refine.config import FaintColours, RealTuning, preset
from backend.refine.initialize import InitConfig
from backend.refine.refine import ProgressFn, StopFn, refine


@dataclass(frozen=True)
class Personalization(Config):
    """Attributes:
    iterations: refinement steps on the sources.
    hold: ``RefineConfig.hold``: how strongly Gaussians are held at their generated values.
    lr_factor: the Gaussians' learning rates (offset, rotation, scale, opacity, colour)
        times this: the schedule is a twentieth of a refinement's, and a generated head's
        hair and skin colours may be far from the person's.
    cpu_iterations: the schedule ``for_device`` gives the CPU, where a step at 512 x 512 px
        takes 0.6-0.7 s on two cores: under a minute, and on two real clips as good on
        held-out frames as the 500 steps of CUDA (BENCHMARKS.md).
    """

    cpu_iterations: ClassVar[int] = 70

    iterations: int = 500
    hold: float = 1e-5
    lr_factor: float = 4.0

    @classmethod
    def for_device(cls, device: str) -> Personalization:
        """The default schedule on ``device`` ("cpu", "cuda", "cuda:1")."""
        return cls() if device.startswith("cuda") else cls(iterations=cls.cpu_iterations)

    def check(self) -> None:
        at_least("iterations", self.iterations, 1)
        at_least("hold", self.hold, 0.0, "a weight must be >= 0")
        above("lr_factor", self.lr_factor, 0.0)


def personalize(
    avatar: Avatar,
    head: HeadModel,
    subject: Subject,
    views: Sequence[tuple[int, int]],
    config: Personalization = Personalization(),
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> Avatar:
    """``avatar`` (generated from ``views`` of ``subject``) refined on the frames of those
    views, every camera of each; the layout, identity and FLAME parameters are unchanged.
    ``head`` is on the device to compute on."""
    config.check()
    frames = sorted({t for t, _ in views})
    sources = Subject(subject.root, replace(subject.info, split={"train": frames, "test": []}), subject.params, subject.K, subject.world_to_cam)
    base = preset("ours")
    f = config.lr_factor
    lr = replace(
        base.lr,
        offset=base.lr.offset * f,
        rotation=base.lr.rotation * f,
        log_scale=base.lr.log_scale * f,
        opacity_logit=base.lr.opacity_logit * f,
        sh_dc=base.lr.sh_dc * f,
        sh_rest=base.lr.sh_rest * f,
    )
    # A generator's layout may be sparser than refinement's default: its Gaussians start larger.
    # The faint-colour pass stays off: the hold already keeps barely seen Gaussians near their
    # generated values, and the photo benchmark measured personalization without it.
    refine_config = replace(
        base,
        iterations=config.iterations,
        hold=config.hold,
        lr=lr,
        real_tuning=RealTuning(),
        faint=FaintColours(enabled=False),
        checkpoint_every=0,
        log_every=max(config.iterations // 10, 1),
    ).for_layout(
        avatar.count, InitConfig.gaussians
    )
    result = refine(avatar, head, sources, refine_config, progress=progress, should_stop=should_stop)
    return replace(result.avatar, meta=result.avatar.meta | {"personalized": {"iterations": config.iterations, "hold": config.hold, "lr_factor": config.lr_factor, "frames": frames}})
