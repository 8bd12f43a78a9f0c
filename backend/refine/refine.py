"""Stage 2: layout-preserving per-subject refinement.

Optimizes every Gaussian's local parameters (offset, rotation, log-scale, opacity, colour)
against a subject's training frames; optionally fine-tunes the per-frame FLAME parameters.
The binding and the Gaussian count never change (unless baseline (a)'s densification is
configured), so everything keyed against the avatar in Blender still fits.
"""

from __future__ import annotations

import copy
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from backend.atomic_write import atomic_path
from backend.data.subject import Subject
from backend.gaussians.avatar import Avatar, LocalGaussians, assemble_splats, place_gaussians
from backend.gaussians.files import avatar_from_bytes, avatar_to_bytes
from backend.gaussians.frames import TriangleFrames, triangle_frames
from backend.gaussians.layout import Binding
from backend.gaussians.splats import Splats
from backend.head.model import HeadModel
from backend.head.params import FlameParams
from backend.refine.colour_bound import bound_base_colours_
from backend.refine.config import RefineConfig
from backend.refine.densify import DensityControl
from backend.refine.exposure import exposed, frame_gains
from backend.refine.faint import coverage, faint_rows, restore_colours
from backend.refine.fused import usable as fused_kernels_usable
from backend.refine.losses import photometric_loss, psnr
from backend.refine.packed import PackedFields, PackLayout, RowAdam, pack, unpack, unpacked_copy
from backend.refine.perceptual import Lpips, load_lpips
from backend.refine.regularizers import depth_loss, spike_loss
from backend.render.camera import Cameras
from backend.render.cuda_graph import GraphedStep
from backend.render.rasterize import render
from backend.render.tile_intersect import TileBudget
from backend.wire.errors import InputError

ProgressFn = Callable[[int, int, dict], None]
StopFn = Callable[[], bool]
CheckpointFn = Callable[["RefineState"], None]

MAX_START_SHARE_OVER_SCALE = 0.25
TILE_HEADROOM = 1.5  # tile budget over the most intersections seen; grown when a render nears it
_FLAME_FIELDS = ("expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "translation")


@dataclass
class RefineState:
    """Everything needed to continue a run exactly where it stopped."""

    iteration: int
    avatar: Avatar
    optimizer: dict
    flame: dict[str, torch.Tensor]
    config: dict
    timings: dict[str, float] = field(default_factory=dict)
    exposure: torch.Tensor | None = None  # [T, 3] learnt log-gains of the training frames

    def to_dict(self) -> dict:
        """Tensors, numbers and strings only, so ``torch.load(weights_only=True)`` reads it."""
        blob = bytearray(avatar_to_bytes(self.avatar))
        return {
            "iteration": self.iteration,
            "avatar": torch.frombuffer(blob, dtype=torch.uint8).clone(),
            "optimizer": self.optimizer,
            "flame": self.flame,
            "config": self.config,
            "timings": self.timings,
        } | ({} if self.exposure is None else {"exposure": self.exposure})

    @classmethod
    def from_dict(cls, d: dict) -> RefineState:
        avatar = avatar_from_bytes(d["avatar"].numpy().tobytes(), "checkpoint")
        return cls(d["iteration"], avatar, d["optimizer"], d["flame"], d["config"], d.get("timings", {}), d.get("exposure"))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_path(path) as scratch:
            torch.save(self.to_dict(), scratch)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RefineState:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"checkpoint not found: {path}")
        try:
            data = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:  # torch raises several types for damaged files
            raise InputError(f"{path}: not a readable refinement checkpoint ({exc})") from exc
        return cls.from_dict(data)


@dataclass
class RefineResult:
    avatar: Avatar
    train_params: FlameParams  # parameters of the training frames, fine-tuned when configured
    history: list[dict]
    timings: dict[str, float]
    stopped_early: bool
    notes: list[str]  # what the run left out and why (LPIPS without its weights)
    exposure: torch.Tensor | None = None  # [T, 3] the training frames' colour gains (``config.exposure``)


class _Targets:
    """Training views cropped to a fixed-size window around each view's mask (plus a margin).

    The background outside the window is matched by construction, so the loss need not look
    there, and the rasterizer need not draw it: each view's camera is shifted so that it
    renders exactly its window. Images, intrinsics and extrinsics stay on the device; a step
    picks views with a device index, with no host-to-device copy.

    Attributes:
        foreground: [V, h, w, 3] crops of the images times their masks, V = frames x cameras
            (flat view index = frame index * C + camera).
        uncovered: [V, h, w, 1] 1 - mask of the same crops.
        known: [V, h, w, 1] ``Subject.known`` of the same crops, or None where every pixel
            is known: where the frame was padded past its source's edge, the loss takes
            the render as its own target.
        num_cameras, views: C and V.
        K, world_to_cam: [V, 1, 3, 3] and [V, 1, 4, 4] cameras of the crops.
    """

    def __init__(self, subject: Subject, frames: list[int], device: torch.device, margin: int) -> None:
        h, w = subject.info.height, subject.info.width
        self.num_cameras = subject.num_cameras
        self.views = len(frames) * self.num_cameras

        def view(t: int, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int, int]]:
            m = subject.mask(t, c)
            ys, xs = torch.nonzero(m[..., 0] > 0.5, as_tuple=True)
            box = (int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())) if len(ys) else (0, h - 1, 0, w - 1)
            return subject.image(t, c) * m, 1 - m, subject.known(t, c), box

        # PNG decoding releases the GIL: a clip's frames decode side by side.
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            loaded = list(pool.map(view, *zip(*[(t, c) for t in frames for c in range(subject.num_cameras)])))
        imgs, uncovered, known, boxes = (list(x) for x in zip(*loaded))
        self.crop_h = min(h, _round_up(max(b[1] - b[0] + 1 for b in boxes) + 2 * margin, 16))
        self.crop_w = min(w, _round_up(max(b[3] - b[2] + 1 for b in boxes) + 2 * margin, 16))
        windows = []  # (y0, x0) of each view's crop, centred on its mask
        for y_lo, y_hi, x_lo, x_hi in boxes:
            y0 = min(max((y_lo + y_hi + 1 - self.crop_h) // 2, 0), h - self.crop_h)
            x0 = min(max((x_lo + x_hi + 1 - self.crop_w) // 2, 0), w - self.crop_w)
            windows.append((y0, x0))
        self.foreground, self.uncovered, known_crops = (
            torch.stack([img[y0 : y0 + self.crop_h, x0 : x0 + self.crop_w] for img, (y0, x0) in zip(images, windows)]).to(device)
            for images in (imgs, uncovered, known)
        )
        self.known = None if bool((known_crops == 1).all()) else known_crops
        cams = subject.cameras(frames)  # [T, C]
        K = cams.K.reshape(-1, 1, 3, 3).clone()
        K[:, 0, 0, 2] -= torch.tensor([x0 for _, x0 in windows], dtype=K.dtype)
        K[:, 0, 1, 2] -= torch.tensor([y0 for y0, _ in windows], dtype=K.dtype)
        self.K = K.to(device)
        self.world_to_cam = cams.world_to_cam.reshape(-1, 1, 4, 4).to(device)

    def cameras(self, views: torch.Tensor) -> Cameras:
        """The crop cameras of flat view indices [B] (a device tensor), [B, 1, ...]."""
        return Cameras(self.K.index_select(0, views), self.world_to_cam.index_select(0, views), self.crop_w, self.crop_h)

    def get(self, views: torch.Tensor, background: torch.Tensor, rendered: torch.Tensor) -> torch.Tensor:
        """[B, h, w, 3] crops of flat view indices [B] composited over ``background`` [3];
        where a crop's pixels are unknown, the ``rendered`` views [B, h, w, 3] themselves
        (no gradient), so that the loss does not look there."""
        target = self.foreground.index_select(0, views) + background * self.uncovered.index_select(0, views)
        if self.known is None:
            return target
        return torch.lerp(rendered.detach(), target, self.known.index_select(0, views))


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _check_thresholds(local: LocalGaussians, config: RefineConfig) -> None:
    """Refuse a scale threshold that most Gaussians already exceed: on a coarse layout (few
    Gaussians per triangle) flat surface Gaussians are larger than 0.6 triangle sizes, and the
    hinge would then shrink every one of them instead of catching spikes."""
    if config.anti_spike.scale_weight <= 0:
        return
    share = float((local.log_scale.max(dim=-1).values.exp() > config.anti_spike.max_scale).float().mean())
    if share > MAX_START_SHARE_OVER_SCALE:
        raise InputError(
            f"{100 * share:.0f}% of the starting Gaussians are already larger than the anti-spike scale threshold "
            f"({config.anti_spike.max_scale} triangle sizes): the layout is coarse for this mesh; raise the threshold "
            f"(--max-scale) or use more Gaussians"
        )


def learning_rates(config: RefineConfig, layout: PackLayout) -> torch.Tensor:
    """[iterations, D] learning rate of every packed column at every step: each decays
    exponentially over the run from its base rate (offsets to ``offset_final``, the rest to
    ``final_factor`` times theirs). A step reads its row by its step counter."""
    lr = config.lr
    base = torch.empty(layout.width, dtype=torch.float64)
    final = torch.full((layout.width,), lr.final_factor, dtype=torch.float64)
    for name, rate in (("offset", lr.offset), ("rotation", lr.rotation), ("log_scale", lr.log_scale), ("opacity_logit", lr.opacity_logit)):
        base[layout.columns(name)] = rate
    sh = layout.columns("sh")
    base[sh] = lr.sh_rest
    base[sh.start : sh.start + 3] = lr.sh_dc
    final[layout.columns("offset")] = lr.offset_final / lr.offset
    progress = (torch.arange(config.iterations, dtype=torch.float64) / max(config.iterations, 1))[:, None]
    return (base * final.pow(progress)).float()


class _StageClock:
    """Per-stage time of the step when profiling: on CUDA, GPU time between events recorded
    at each stage boundary (inside a captured step too, so replays are timed); on the CPU,
    host wall time. Off, every call returns at once."""

    def __init__(self, device: torch.device, enabled: bool, timings: dict[str, float]) -> None:
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.timings = timings
        self.marks: list[tuple[str, torch.cuda.Event | float]] = []

    def lap(self, stage: str) -> None:
        """Mark the end of ``stage`` ("" marks the start of the step)."""
        if not self.enabled:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True, external=True)
            event.record()
            self.marks.append((stage, event))
        else:
            self.marks.append((stage, time.perf_counter()))

    def collect(self, keep: bool) -> None:
        """Add the last step's stage times; ``keep`` the marks when a graph replays them."""
        if not self.enabled:
            return
        if self.cuda:
            torch.cuda.synchronize()
        for (_, begin), (stage, end) in zip(self.marks, self.marks[1:]):
            seconds = begin.elapsed_time(end) / 1000 if isinstance(begin, torch.cuda.Event) else end - begin  # type: ignore[operator, arg-type]
            self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        if not keep:
            self.marks.clear()


class _Draws(NamedTuple):
    """Every step's random draws, made up front from the seed and kept on the device: a step
    picks its own row by the step counter, so a resumed run sees the same ones.

    Attributes:
        frame: [iterations, views_per_step] indices into the training frames.
        view: [iterations, views_per_step] flat view indices (frame index * C + camera).
        background: [iterations, 3] each step's background colour.
    """

    frame: torch.Tensor
    view: torch.Tensor
    background: torch.Tensor


def _draw(config: RefineConfig, frames: int, subject: Subject, device: torch.device) -> _Draws:
    """The draws of a run over ``frames`` training frames of ``subject``: frames and cameras
    from ``config.seed``, backgrounds from the next seed."""
    cams = subject.num_cameras
    draws = torch.Generator().manual_seed(config.seed)
    frame_draws = torch.randint(frames, (config.iterations, config.views_per_step), generator=draws)
    view_draws = (frame_draws * cams + torch.randint(cams, frame_draws.shape, generator=draws)).to(device)
    backgrounds = (
        torch.rand(config.iterations, 3, generator=torch.Generator().manual_seed(config.seed + 1))
        if config.random_background
        else subject.background().expand(config.iterations, 3)
    ).to(device)
    return _Draws(frame_draws.to(device), view_draws, backgrounds)


@dataclass(frozen=True)
class _Kernels:
    """The step's photometric loss and placement: the fused kernels where they run, else torch.

    Attributes:
        photometric: (rgb, target, ssim_weight) -> loss, the kernel or the torch reference.
        place_with_hinges: the fused placement with its hinges (SH degree 0 only), or None.
        ready: waits for the fused kernels compiling in the background (returns at once without them).
    """

    photometric: Callable[..., torch.Tensor]
    place_with_hinges: Callable[..., tuple[Splats, torch.Tensor]] | None
    ready: Callable[[], None]


def _kernels(config: RefineConfig, device: torch.device, layout: PackLayout) -> _Kernels:
    """The step's kernels; the fused ones start compiling in the background."""
    # The hand-written kernels replace chains of small torch operations (backend/refine/fused).
    # They compile in the background while the rest is set up. Imported here: Triton is
    # present only where they run.
    use_fused = config.fused and not config.compile and fused_kernels_usable(device)
    if not use_fused:
        return _Kernels(photometric_loss, None, lambda: None)
    fused_placement = layout.sh_coeffs == 1
    from backend.refine.fused import compile_ahead
    from backend.refine.fused.photometric import photometric_loss as photometric
    from backend.refine.fused.placement import place_with_hinges

    compiled_ahead = compile_ahead(device, fused_placement, mesh=config.finetune_flame)
    return _Kernels(photometric, place_with_hinges if fused_placement else None, compiled_ahead)


@dataclass
class _Run:
    """One refinement run's state: what its step reads, and what its loop moves on.

    Densification replaces ``packed``, ``binding`` and ``optimizer`` between steps, and a
    captured step's tile budget grows, so the step reads them from here at every call.

    Attributes:
        config: decided for the subject.
        source: the avatar the run starts from (a resumed run's, else the input).
        params: the subject's FLAME parameters with the avatar's shape, on the device.
        layout, packed: the local parameters packed [N, D], the optimized leaf.
        held: [N, D] the input avatar's packed parameters that ``config.hold`` pulls toward.
        flame: the training frames' FLAME parameters [T, ...] that stay fixed (all of them
            unless fine-tuned).
        tuned: the fine-tuned ones with their optimizer (None unless fine-tuned).
        exposure: the training frames' log-gains [T, 3] (``config.exposure``) with their
            optimizer, or None.
        fixed: posed vertices [T, V, 3] and triangle frames of every training frame,
            computed once when FLAME is not fine-tuned (a step then only gathers them).
        graphed: the step is captured in a CUDA graph (CUDA and a frozen layout).
        budget: tile slots of a captured step's renders (None when not captured).
        start: the step the run starts at (a resumed run's iteration).
        counter: [1] int64 on the device, the step being taken (a captured step reads it).
        timings: seconds per stage (profiling) and the loop's wall time.
    """

    config: RefineConfig
    source: Avatar
    params: FlameParams
    layout: PackLayout
    packed: torch.Tensor
    held: torch.Tensor | None
    binding: Binding
    flame: dict[str, torch.Tensor]
    tuned: PackedFields | None
    optimizer: RowAdam
    exposure: PackedFields | None
    targets: _Targets
    draws: _Draws
    rates: torch.Tensor  # [iterations, D] learning rates
    fixed: tuple[torch.Tensor, TriangleFrames] | None
    density: DensityControl | None
    graphed: bool
    start: int
    counter: torch.Tensor
    timings: dict[str, float]
    clock: _StageClock
    budget: TileBudget | None = None

    @classmethod
    def begin(cls, avatar: Avatar, head: HeadModel, subject: Subject, config: RefineConfig, resume: RefineState | None, profile: bool) -> _Run:
        """The state before the first step: ``avatar``'s (or ``resume``'s) parameters on
        ``head``'s device, the targets, draws, optimizers and rates."""
        device = head.v_template.device
        source = resume.avatar if resume else avatar
        frames = subject.split["train"]
        layout = PackLayout.of(source.local)
        packed = pack(source.local).detach().to(device).requires_grad_(True)
        held = pack(avatar.local).detach().to(device) if config.hold > 0 else None  # the start, however far a resumed run got
        binding = source.binding.to(device)
        params = subject.params.to(device)
        params = replace(params, shape=source.shape.to(device), static_offset=None if source.static_offset is None else source.static_offset.to(device))
        flame = {k: getattr(params, k)[frames].clone() for k in _FLAME_FIELDS}
        if resume:
            flame = {k: v.to(device) for k, v in resume.flame.items()}
        tuned = None
        if config.finetune_flame:
            # On a head whose jawOpen carries the jaw, the joint stays at rest here too.
            names = tuple(k for k in _FLAME_FIELDS if not (k == "jaw_pose" and head.data.jaw_expression is not None))
            lr = config.lr
            rate = {"expr": lr.flame_expr, "translation": lr.flame_translation} | {k: lr.flame_pose for k in ("rotation", "neck_pose", "jaw_pose", "eyes_pose")}
            tuned = PackedFields.of({k: flame.pop(k) for k in names}, rate)
        targets = _Targets(subject, frames, device, config.loss_margin)
        draws = _draw(config, len(frames), subject, device)
        density = DensityControl(config.densify, binding, subject) if config.densify else None
        graphed = config.cuda_graph and device.type == "cuda" and density is None
        optimizer = RowAdam(packed)
        rates = learning_rates(config, layout).to(device)
        exposure = None
        if config.exposure:
            gains = resume.exposure.to(device) if resume and resume.exposure is not None else torch.zeros(len(frames), 3, device=device)
            exposure = PackedFields.of({"exposure": gains}, {"exposure": config.lr.exposure})
        if resume:
            optimizer.load_state_dict(resume.optimizer["gaussians"])
            for name, small in (("flame", tuned), ("exposure", exposure)):
                if small is not None and name in resume.optimizer:
                    small.optimizer.load_state_dict(resume.optimizer[name])
        fixed = None
        if tuned is None:
            with torch.no_grad():
                verts_all = head(replace(params, **flame), check=False).vertices
                fixed = (verts_all, triangle_frames(verts_all, head.faces))
        timings: dict[str, float] = dict(resume.timings) if resume else {}
        start = resume.iteration if resume else 0
        counter = torch.full((1,), start, dtype=torch.int64, device=device)
        return cls(
            config=config, source=source, params=params, layout=layout, packed=packed, held=held, binding=binding, flame=flame,
            tuned=tuned, optimizer=optimizer, exposure=exposure, targets=targets, draws=draws, rates=rates, fixed=fixed, density=density,
            graphed=graphed, start=start, counter=counter, timings=timings, clock=_StageClock(device, profile, timings),
        )

    @property
    def optimizers(self) -> list[RowAdam]:
        """Every optimizer of the step, the Gaussians' first."""
        return [self.optimizer] + [small.optimizer for small in (self.tuned, self.exposure) if small is not None]

    def flame_fields(self) -> dict[str, torch.Tensor]:
        """The training frames' FLAME parameters by field name, [T, ...]; fine-tuned ones are
        views of their packed tensor (gradients through them reach it)."""
        return self.flame | (self.tuned.fields() if self.tuned is not None else {})

    def state(self, step: int) -> RefineState:
        """A copy of the run after ``step`` steps, for a checkpoint or the result."""
        # state_dict() holds the live moment tensors, which the next steps update in place.
        named = {"gaussians": self.optimizer} | {name: small.optimizer for name, small in (("flame", self.tuned), ("exposure", self.exposure)) if small is not None}
        opt = copy.deepcopy({name: o.state_dict() for name, o in named.items()})
        current = replace(self.source, binding=self.binding, local=unpacked_copy(self.packed, self.layout))
        flame = {k: v.detach().clone() for k, v in self.flame_fields().items()}
        exposure = None if self.exposure is None else self.exposure.packed.detach().clone()
        return RefineState(step, current, opt, flame, self.config.to_dict(), dict(self.timings), exposure)



def refine(
    avatar: Avatar,
    head: HeadModel,
    subject: Subject,
    config: RefineConfig = RefineConfig(),
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    checkpoint: CheckpointFn | None = None,
    resume: RefineState | None = None,
    profile: bool = False,
) -> RefineResult:
    """Refine ``avatar`` on ``subject``'s training frames; the input avatar is not modified.

    Args:
        head: the avatar's head model, on the device to compute on.
        progress: called every ``config.log_every`` steps with (step, total, stats).
        should_stop: polled every step; True ends the run early (a checkpoint is written).
        checkpoint: receives the state every ``config.checkpoint_every`` steps and at the end.
        resume: a state from an earlier run of the same configuration to continue.
        profile: fill ``timings`` with a per-stage breakdown (GPU time on CUDA); the device
            is synchronized after every step (slower).
    """
    device = head.v_template.device
    config = config.for_subject(subject.info.source == "synthetic")
    if not subject.split["train"]:
        raise InputError(f"subject {subject.root} has no training frames")
    source = resume.avatar if resume else avatar
    _check_thresholds(source.local, config)
    if config.lpips_weight < 0:
        raise InputError(f"lpips_weight {config.lpips_weight}: a weight must be >= 0")
    notes: list[str] = []
    lpips = None
    if config.lpips_weight > 0:
        lpips, lpips_note = load_lpips(device, Path(config.lpips_folder) if config.lpips_folder else None)
        if lpips is None:
            notes.append(f"LPIPS left out of the loss: {lpips_note}")
    kernels = _kernels(config, device, PackLayout.of(source.local))  # first: they compile while the run is set up
    run = _Run.begin(avatar, head, subject, config, resume, profile)
    train_step = _build_step(run, head, kernels, lpips)
    final, history, stopped = _run_steps(run, train_step, kernels, progress, should_stop, checkpoint)
    tuned = replace(run.params, **{k: v.detach().clone() for k, v in run.flame_fields().items()})
    if run.binding.count != source.binding.count and run.density is None:
        raise RuntimeError("refinement changed the Gaussian count with a frozen layout")
    local, faint_meta = final.avatar.local, {}
    if config.faint.enabled and run.density is None:
        local, faint_meta = _settle_faint(run, head, subject, tuned, local, avatar.local)
    out_avatar = replace(final.avatar, local=local.map(lambda t: t.cpu()), binding=run.binding.to("cpu"))
    out_avatar.meta = dict(source.meta) | {"refined_iterations": final.iteration, "refine_config": config.to_dict()} | faint_meta
    gains = None if final.exposure is None else frame_gains(final.exposure).cpu()
    return RefineResult(out_avatar, tuned.to("cpu"), history, run.timings, stopped, notes, gains)


def _settle_faint(run: _Run, head: HeadModel, subject: Subject, tuned: FlameParams, local: LocalGaussians, start: LocalGaussians) -> tuple[LocalGaussians, dict]:
    """``local`` with the colours of its faint Gaussians (``RefineConfig.faint``) back at
    ``start``'s, and the share of them for the avatar's meta. ``tuned``: the training frames'
    parameters as the run ended (posed once more only when they were fine-tuned)."""
    with torch.no_grad():
        verts = run.fixed[0] if run.fixed is not None else head(tuned, check=False).vertices
    rows = faint_rows(coverage(verts, head.faces, run.binding, local, subject, subject.split["train"]), run.config.faint)
    return restore_colours(local, start, rows), {"faint_share": float(rows.float().mean())}


_Step = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # loss, render, target


def _build_step(run: _Run, head: HeadModel, kernels: _Kernels, lpips: Lpips | None) -> _Step:
    """The training step of ``run``: one step at ``run.counter``, reading nothing back from the
    device, returning the loss, the render [B, h, w, 3] and its target. A captured step's
    tile budget is sized here first (it renders every training view once)."""
    config, layout, clock = run.config, run.layout, run.clock
    surface = config.surface
    assert surface is not None  # decided for the subject
    device = run.packed.device
    step_rows = torch.arange(config.views_per_step, device=device)  # a step's own posed frames

    def image_loss(rgb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = kernels.photometric(rgb, target, config.ssim_weight)
        if lpips is not None:
            loss = loss + config.lpips_weight * lpips(rgb, target).mean()
        return loss

    def loss_fn(rgb: torch.Tensor, target: torch.Tensor, rotation: torch.Tensor, log_scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        loss = image_loss(rgb, target)
        if config.anti_spike.enabled:
            loss = loss + spike_loss(log_scale, offset, config.anti_spike)
        if surface.weight > 0:
            loss = loss + depth_loss(rotation, log_scale, offset, surface)
        return loss

    # Deformation and loss are chains of small element-wise kernels: compiled, they fuse.
    # Without the whole-step graph, a frozen layout still lets the compiled regions replay as
    # CUDA graphs of their own ("reduce-overhead").
    compiled = config.compile and device.type == "cuda"
    mode = "reduce-overhead" if run.density is None and not run.graphed else None
    place = torch.compile(place_gaussians, dynamic=run.density is not None, mode=mode) if compiled else place_gaussians
    frames_of = torch.compile(triangle_frames, mode=mode) if compiled else triangle_frames
    step_loss = torch.compile(loss_fn, mode=mode) if compiled else loss_fn

    def mesh_at(frame: torch.Tensor, through_compiled: bool = True) -> tuple[torch.Tensor, TriangleFrames]:
        """Posed vertices [B, V, 3] and triangle frames at training frames [B] (a device
        index); with ``through_compiled``, through the compiled functions when compiling."""
        if run.fixed is not None:
            return run.fixed[0].index_select(0, frame), TriangleFrames(*(t.index_select(0, frame) for t in run.fixed[1]))
        verts = head(replace(run.params, **{k: v.index_select(0, frame) for k, v in run.flame_fields().items()}), check=False).vertices
        return verts, (frames_of if through_compiled else triangle_frames)(verts, head.faces)

    def posed(frame: torch.Tensor, local: LocalGaussians, through_compiled: bool = True) -> Splats:
        """The Gaussians ``local`` at training frames [B] (a device index)."""
        verts, tri = mesh_at(frame, through_compiled)
        binding = run.binding
        placed = (place if through_compiled else place_gaussians)(verts, head.faces, tri, binding.face_idx, binding.bary, local.offset, local.rotation, local.log_scale)
        return assemble_splats(*placed, local)

    def probe(frame: torch.Tensor) -> Splats:
        # Without gradients: through the compiled functions this would compile a second,
        # gradient-free variant of each (seconds, even from the on-disk cache).
        return posed(frame, unpack(run.packed, layout), through_compiled=False)

    if run.graphed:
        run.budget = _tile_budget(probe, run.targets, run.draws.background[0])

    def train_step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        packed, counter = run.packed, run.counter
        for opt in run.optimizers:
            opt.zero_grad(set_to_none=True)
        clock.lap("")
        frame, view_idx = run.draws.frame.index_select(0, counter)[0], run.draws.view.index_select(0, counter)[0]
        background = run.draws.background.index_select(0, counter)[0]
        view = run.targets.cameras(view_idx)
        clock.lap("data")
        local = unpack(packed, layout)
        if kernels.place_with_hinges is not None:
            # The kernel gathers precomputed frames itself; posed ones are this step's own.
            verts, tri, rows = (*run.fixed, frame) if run.fixed is not None else (*mesh_at(frame), step_rows)
            binding = run.binding
            splats, hinges = kernels.place_with_hinges(packed, layout, rows, verts, head.faces, tri, binding.face_idx, binding.bary, config.anti_spike, surface)
        else:
            splats = posed(frame, local)
        if run.density is not None:
            splats.means.retain_grad()
        clock.lap("deform")
        out = render(splats, view, background, budget=run.budget, depth=False)
        rgb = out.rgb[:, 0]
        if run.exposure is not None:
            rgb = exposed(rgb, out.alpha[:, 0], background, frame_gains(run.exposure.packed).index_select(0, frame))
        target = run.targets.get(view_idx, background, rgb)
        clock.lap("render")
        if kernels.place_with_hinges is not None:
            loss = image_loss(rgb, target) + hinges
        else:
            loss = step_loss(rgb, target, local.rotation, local.log_scale, local.offset)
        clock.lap("loss")
        loss.backward()
        if config.opacity_sparsity > 0:
            _add_seen_sparsity(local.opacity_logit, packed.grad[:, layout.columns("opacity_logit")][:, 0], config.opacity_sparsity)
        if run.held is not None:
            packed.grad.add_(packed.detach() - run.held, alpha=config.hold)
        clock.lap("backward")
        if run.density is not None:
            run.density.observe(splats, splats.means.grad, view)
        run.optimizer.step(run.rates.index_select(0, counter)[0])
        if config.bound_colours:
            bound_base_colours_(packed, layout)
        for small in (run.tuned, run.exposure):
            if small is not None:
                small.step()
        counter.add_(1)
        clock.lap("optimizer")
        return loss, rgb, target

    return train_step


def _run_steps(
    run: _Run, train_step: _Step, kernels: _Kernels, progress: ProgressFn | None, should_stop: StopFn | None, checkpoint: CheckpointFn | None
) -> tuple[RefineState, list[dict], bool]:
    """Take ``run``'s steps from its start: captured in a CUDA graph when ``run.graphed``,
    densified between steps when configured; log, checkpoint, grow a captured step's tile
    budget, and stop when asked. Returns the final state (also given to ``checkpoint``), the
    log lines and whether the run stopped early."""
    config, clock = run.config, run.clock
    kernels.ready()
    graph = GraphedStep(train_step, run.optimizers) if run.graphed else None
    history: list[dict] = []
    stopped = False
    done = run.start  # steps taken
    t_start = time.perf_counter()
    for step in range(run.start, config.iterations):
        if should_stop is not None and should_stop():
            stopped = True
            break
        loss, rgb, target = graph() if graph is not None else train_step()
        clock.collect(keep=graph is not None and graph.captured)
        done = step + 1
        if run.density is not None:
            run.packed, run.binding, run.optimizer = run.density.step(done, run.packed, run.layout, run.binding, run.optimizer)
        if done % config.log_every == 0 or done == config.iterations:
            stats = {"loss": float(loss.detach()), "psnr": psnr(rgb.detach(), target), "count": run.binding.count, "seconds": time.perf_counter() - t_start}
            if graph is not None and run.budget is not None:
                if int(run.budget.peak) > run.budget.capacity:
                    stats["tile_pairs_dropped"] = True  # some renders since the last line lost pairs
                if run.budget.grow(TILE_HEADROOM, margin=TILE_HEADROOM**0.5):
                    clock.marks.clear()
                    graph.recapture()
            history.append({"iteration": done, **stats})
            if progress is not None:
                progress(done, config.iterations, stats)
        if checkpoint is not None and config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.iterations:
            checkpoint(run.state(done))
    run.timings["wall"] = run.timings.get("wall", 0.0) + time.perf_counter() - t_start
    final = run.state(done)
    if checkpoint is not None:
        checkpoint(final)
    return final, history, stopped


def _add_seen_sparsity(opacity_logit: torch.Tensor, grad: torch.Tensor, weight: float) -> None:
    """Add to ``grad`` [N], the photometric gradient of ``opacity_logit`` [N], the gradient of
    ``weight`` * mean sigmoid opacity, for the Gaussians that the photometric gradient reached
    this step (those the render drew with some transmittance left). A term in the loss would
    reach every Gaussian, and Adam's normalization would then fade the ones no view shows at
    full speed."""
    alpha = torch.sigmoid(opacity_logit.detach())
    grad.add_((grad != 0) * alpha * (1 - alpha) * (weight / opacity_logit.shape[0]))


def _tile_budget(posed: Callable[[torch.Tensor], Splats], targets: _Targets, background: torch.Tensor) -> TileBudget:
    """A tile budget with room for every training view's intersections at the start, plus
    ``TILE_HEADROOM`` for Gaussians that grow during the run."""
    device = background.device
    probe = TileBudget.probe(device)
    with torch.no_grad():
        for v in range(targets.views):
            view = torch.tensor([v], device=device)
            render(posed(view // targets.num_cameras), targets.cameras(view), background, budget=probe, depth=False)
    return probe.sized(TILE_HEADROOM)
