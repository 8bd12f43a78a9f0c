"""Stage 2 configuration: one schema, named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from backend.configs import Config, SettingError, above, at_least
from backend.refine.regularizers import AntiSpike, SurfaceHinge


@dataclass(frozen=True)
class LearningRates:
    """Adam learning rates per parameter group (per iteration; offsets in triangle units).

    ``offset`` decays exponentially from ``offset`` to ``offset_final`` over the run, as
    3DGS does for positions; the other Gaussian groups decay exponentially to
    ``final_factor`` times their rate (1.0 keeps them constant). ``sh_dc`` is the rate of
    the first SH band (the base colour), ``sh_rest`` that of the higher bands.
    """

    offset: float = 2e-3
    offset_final: float = 2e-5
    rotation: float = 1e-3
    log_scale: float = 5e-3
    opacity_logit: float = 2.5e-2
    sh_dc: float = 2.5e-3
    sh_rest: float = 1.25e-4
    final_factor: float = 1.0
    flame_expr: float = 1e-3
    flame_pose: float = 1e-5
    flame_translation: float = 1e-6
    exposure: float = 5e-3


@dataclass(frozen=True)
class Densify:
    """Adaptive density control, GaussianAvatars-style: used only by baseline (a).

    Attributes:
        start, stop, every: iterations between which, and how often, Gaussians are cloned,
            split and pruned.
        grad_threshold: mean view-space positional gradient (NDC units, as 3DGS) above which a
            Gaussian is densified.
        clone_max_scale: Gaussians whose largest axis is below this (triangle units) are
            cloned, larger ones are split in two.
        min_opacity: Gaussians below it are pruned (keeping at least one per face).
        reset_every: opacities are reset to ``reset_opacity`` this often.
        max_count: no growth beyond this many Gaussians.
    """

    start: int = 500
    stop: int = 7500
    every: int = 500
    grad_threshold: float = 2e-4
    clone_max_scale: float = 0.3
    min_opacity: float = 0.005
    reset_every: int = 3000
    reset_opacity: float = 0.01
    max_count: int = 400_000


@dataclass(frozen=True)
class RealTuning:
    """What tracked real subjects get on top of the configuration, measured on the real
    benchmark (docs/refinement.md): hair and turned cheeks need more room and faster
    rates than the synthetic heads the defaults were tuned on.

    The defaults are what the short stages built on refinement (photometric tracking,
    personalization) were measured with; a refinement's own default is stronger
    (``RefineConfig.real_tuning``).

    Attributes:
        threshold_factor: the scale and offset hinges' thresholds are multiplied by this.
        lr_factor: the starting learning rates of offsets, scales and base colour are
            multiplied by this (the offsets still decay to ``LearningRates.offset_final``).
    """

    threshold_factor: float = 2.5
    lr_factor: float = 2.0


@dataclass(frozen=True)
class FaintColours:
    """Gaussians whose colour the training views barely constrain take their starting colour
    back after the last step (``backend/refine/faint.py``).

    Attributes:
        enabled: off leaves every colour as refined. On by default: on five real clips it
            took the band of saturated colours off the necks past the frame's edge and the
            specks off the sides of neck and hair, and left the scores where they were
            (BENCHMARKS.md).
        min_known_share: a Gaussian that the views reach is faint when less than this share
            of its blending weight over all their pixels falls on known ones (most of it
            lies past the frame's edge). Where every pixel is known this rule flags nothing.
        min_known_px: a Gaussian is faint when its blending weight over the known pixels of
            all training views adds up to less than this many pixels: hidden behind others,
            its colour followed the residual. Setting it back changes those views by at most
            that weight. 0.1: 0.03 dB in a synthetic subject's mask; 1 cost 0.6 dB there.
        min_facing: a Gaussian is faint when the views see it this edge-on or more: the mean
            |cos| between its triangle's normal and the line of sight, weighted as its known
            pixels are. Off (0): at 0.15 it cost 0.7 dB in the real clips' held-out mask.
    """

    enabled: bool = True
    min_known_share: float = 0.5
    min_known_px: float = 0.1
    min_facing: float = 0.0


@dataclass(frozen=True)
class RefineConfig(Config):
    """Everything the refinement loop reads.

    Attributes:
        iterations: optimizer steps.
        views_per_step: (frame, camera) pairs rendered and averaged per step.
        ssim_weight: lambda in (1 - lambda) L1 + lambda D-SSIM.
        loss_margin: pixels around the largest mask box that the loss window keeps (the
            window has one size for all views, so the compiled loss sees one shape).
        anti_spike: the three hinges; all-zero weights switch them off (baseline b).
        surface: the depth hinge that keeps Gaussians on their triangles (kept in b, off in a).
            None: on for synthetic subjects, whose whole appearance lies on the mesh, and off
            for tracked real ones, whose hair stands off it (on the tracked astronaut it cost
            4.8 dB within the person mask; docs/refinement.md).
        finetune_flame: also optimize the training frames' expression, jaw, neck, eyes,
            global pose and translation with small learning rates. Off by default: on real
            clips it raises the training frames' PSNR (1.3 dB) but not the held-out frames',
            which keep the tracked parameters, so the avatar learns a face they do not show
            (their face region scores 1.0 dB better without it; docs/refinement.md).
        real_tuning: applied by ``for_subject`` to tracked real subjects (None: nothing);
            the decided configuration holds the tuned values and None here.
        random_background: composite each step's target and render over a new random colour,
            so Gaussians outside the mask must turn transparent instead of taking on the
            background's colour (a glow around the hair in other scenes). None: on unless the
            subject is synthetic (whose figures were measured on its fixed background).
        lpips_weight: weight of LPIPS (AlexNet, v0.1) in the loss; 0 leaves it out. It runs
            only where its weight files are on this machine (``perceptual.py``; never
            downloaded); elsewhere it is left out and ``RefineResult.notes`` says so. Off by
            default: it adds two AlexNet passes and a backward to every step.
        lpips_folder: where to look first for LPIPS's weight files (then torch's hub cache
            and the lpips package).
        opacity_sparsity: weight of the mean opacity, applied to the Gaussians each step's
            render reaches (Gaussians no training view shows keep their opacity). Off by
            default: it clears faint coverage past the outline in the captured views, but it
            also fades Gaussians that those views barely show, which opens holes in views the
            video did not cover (docs/refinement.md has the numbers).
        hold: weight of a pull of every Gaussian's local parameters back to the start's
            (gradient ``hold * (p - p_start)`` per packed value). Adam scales each value's
            step by its own gradient history, so a Gaussian that the views barely reach would
            move as fast as one they show plainly; the pull keeps such Gaussians where the
            start put them. 0 (default) leaves it out; personalization of a generated avatar
            on its few sources uses it.
        exposure: learn a colour gain per training frame and channel (log-gains with zero
            mean over the frames, rate ``lr.exposure``) that the step's render is multiplied
            by, where it covers, before the loss: a camera's auto-exposure and white balance,
            and light that changes as the head turns, then need not go into the Gaussians'
            colours. Held-out frames render with the mean gain, 1.
        bound_colours: clamp every Gaussian's base colour into [0, 1] after each step
            (``backend/refine/colour_bound.py``): Gaussians seen only faintly otherwise take
            colours far outside it and show as saturated specks in other views. On by
            default since it won held-out frames on real clips (BENCHMARKS.md).
        faint: colours the training views barely constrain, set back to the start's at the end.
        densify: None keeps the layout frozen (ours); set only for baseline (a).
        lr: learning rates.
        seed: view sampling.
        log_every: iterations between progress reports (each costs one device sync).
        checkpoint_every: iterations between checkpoints (0: only on stop).
        compile: on CUDA, fuse deformation and loss with torch.compile instead of the
            hand-written kernels (``fused``). Its step is slower than theirs (1.92 against
            1.47 ms on an H100) and it costs ~10-20 s of compilation per process, so it pays
            only where the kernels do not reach (SH degree > 0) in long runs. Without
            ``cuda_graph`` it is what keeps the step fast.
        cuda_graph: on CUDA with a frozen layout, capture the whole step (deformation,
            render, loss, backward, optimizer) in one CUDA graph and replay it: the host then
            launches one graph per step instead of every kernel from Python.
        fused: on CUDA with Triton, run the step's photometric loss, and (SH degree 0) its
            placement with the hinges, as the hand-written kernels of
            ``backend/refine/fused`` instead of chains of torch operations. Off
            when ``compile`` is on, which fuses those operations itself.
    """

    iterations: int = 10_000
    views_per_step: int = 1
    ssim_weight: float = 0.2
    loss_margin: int = 24
    anti_spike: AntiSpike = field(default_factory=AntiSpike)
    surface: SurfaceHinge | None = None
    finetune_flame: bool = False
    real_tuning: RealTuning | None = field(default_factory=lambda: RealTuning(threshold_factor=5.0, lr_factor=4.0))
    random_background: bool | None = None
    lpips_weight: float = 0.0
    lpips_folder: str | None = None
    opacity_sparsity: float = 0.0
    hold: float = 0.0
    exposure: bool = False
    bound_colours: bool = True
    faint: FaintColours = field(default_factory=FaintColours)
    densify: Densify | None = None
    lr: LearningRates = field(default_factory=LearningRates)
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 1000
    compile: bool = False
    cuda_graph: bool = True
    fused: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Raise SettingError naming the first field the loop cannot run with."""
        at_least("iterations", self.iterations, 1)
        at_least("views_per_step", self.views_per_step, 1)
        if not 0.0 <= self.ssim_weight <= 1.0:
            raise SettingError("ssim_weight", self.ssim_weight, "must be in [0, 1]")
        at_least("loss_margin", self.loss_margin, 0)
        for name in ("lpips_weight", "opacity_sparsity", "hold"):
            at_least(name, getattr(self, name), 0.0, "a weight must be >= 0")
        if self.hold > 0 and self.densify is not None:
            raise SettingError("hold", self.hold, "holds a frozen layout to its start; densification changes the layout")
        at_least("log_every", self.log_every, 1)
        at_least("checkpoint_every", self.checkpoint_every, 0, "must be >= 0 (0: only when stopped)")
        a = self.anti_spike
        for name in ("scale_weight", "aniso_weight", "offset_weight"):
            at_least(f"anti_spike.{name}", getattr(a, name), 0.0, "a weight must be >= 0")
        above("anti_spike.max_scale", a.max_scale, 0.0, "the scale threshold must be > 0 (triangle sizes)")
        above("anti_spike.max_offset", a.max_offset, 0.0, "the offset threshold must be > 0 (triangle sizes)")
        at_least("anti_spike.max_ratio", a.max_ratio, 1.0, "an axis ratio must be >= 1")
        if self.surface is not None:
            at_least("surface.weight", self.surface.weight, 0.0, "a weight must be >= 0")
            above("surface.max_depth", self.surface.max_depth, 0.0, "the depth threshold must be > 0 (triangle sizes)")
        if not 0.0 <= self.faint.min_known_share <= 1.0:
            raise SettingError("faint.min_known_share", self.faint.min_known_share, "must be in [0, 1]")
        at_least("faint.min_known_px", self.faint.min_known_px, 0.0)
        if not 0.0 <= self.faint.min_facing <= 1.0:
            raise SettingError("faint.min_facing", self.faint.min_facing, "must be in [0, 1]")
        for name, rate in asdict(self.lr).items():
            at_least(f"lr.{name}", rate, 0.0, "a learning rate must be >= 0")

    def for_layout(self, gaussians: int, default: int) -> RefineConfig:
        """This configuration with the scale hinge's threshold widened for a layout sparser
        than ``default`` Gaussians (the count the thresholds were tuned at, the surface
        start's ``InitConfig.gaussians``): the threshold is in triangle sizes, and a sparser layout
        starts with Gaussians larger by the square root of the count ratio (denser layouts
        keep it)."""
        spacing = max(1.0, (default / gaussians) ** 0.5)
        return replace(self, anti_spike=replace(self.anti_spike, max_scale=self.anti_spike.max_scale * spacing))

    def for_subject(self, synthetic: bool) -> RefineConfig:
        """This configuration with the defaults that depend on the subject (None fields) decided."""
        decided = replace(
            self,
            random_background=(not synthetic) if self.random_background is None else self.random_background,
            surface=(SurfaceHinge() if synthetic else SurfaceHinge(weight=0.0)) if self.surface is None else self.surface,
            real_tuning=None,
        )
        tune = self.real_tuning
        if synthetic or tune is None:
            return decided
        a, lr = self.anti_spike, self.lr
        return replace(
            decided,
            anti_spike=replace(a, max_scale=a.max_scale * tune.threshold_factor, max_offset=a.max_offset * tune.threshold_factor),
            lr=replace(lr, offset=lr.offset * tune.lr_factor, log_scale=lr.log_scale * tune.lr_factor, sh_dc=lr.sh_dc * tune.lr_factor),
        )

    @classmethod
    def from_dict(cls, d: dict) -> RefineConfig:
        d = dict(d)
        d["anti_spike"] = AntiSpike(**d.get("anti_spike", {}))
        d["surface"] = SurfaceHinge(**d["surface"]) if d.get("surface") else None
        d["lr"] = LearningRates(**d.get("lr", {}))
        d["faint"] = FaintColours(**d.get("faint", {}))
        d["densify"] = Densify(**d["densify"]) if d.get("densify") else None
        d["real_tuning"] = RealTuning(**d["real_tuning"]) if d.get("real_tuning") else None
        return cls(**d)


def preset(name: str, **overrides: object) -> RefineConfig:
    """Named configurations: "ours", "no-antispike" (baseline b), "densify" (baseline a).

    The baselines fine-tune FLAME on the training frames, as GaussianAvatars does, and take
    no real-subject tuning: they stay as they were measured."""
    base = RefineConfig()
    baseline = replace(base, finetune_flame=True, real_tuning=None)
    presets = {
        "ours": base,
        "no-antispike": replace(baseline, anti_spike=AntiSpike(scale_weight=0.0, aniso_weight=0.0, offset_weight=0.0)),
        # GaussianAvatars keeps its own two local hinges beside densification.
        "densify": replace(
            baseline, anti_spike=AntiSpike(scale_weight=1.0, aniso_weight=0.0, offset_weight=0.01), surface=SurfaceHinge(weight=0.0), densify=Densify()
        ),
    }
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(presets)}")
    return replace(presets[name], **overrides)  # type: ignore[arg-type]
