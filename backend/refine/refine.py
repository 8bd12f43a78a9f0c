"""Stage 2: layout-preserving per-subject refinement.

Optimizes every Gaussian's local parameters (offset, rotation, log-scale, opacity, colour)
against a subject's training frames; optionally fine-tunes the per-frame FLAME parameters.
The binding and the Gaussian count never change (unless baseline (a)'s densification is
configured), so everything keyed against the avatar in Blender still fits.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from backend.data.subject import Subject
from backend.gaussians.avatar import Avatar, LocalGaussians, assemble_splats, place_gaussians
from backend.gaussians.frames import TriangleFrames, triangle_frames
from backend.gaussians.splats import Splats
from backend.gaussians.files import avatar_from_bytes, avatar_to_bytes
from backend.head.model import HeadModel
from backend.head.params import FlameParams
from backend.refine.config import RefineConfig
from backend.refine.densify import DensityControl
from backend.refine.fused import usable as fused_kernels_usable
from backend.refine.losses import photometric_loss, psnr
from backend.refine.packed import PackLayout, RowAdam, pack, unpack, unpacked_copy
from backend.refine.perceptual import load_lpips
from backend.refine.regularizers import depth_loss, spike_loss
from backend.render.cuda_graph import GraphedStep
from backend.render.camera import Cameras
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
        }

    @classmethod
    def from_dict(cls, d: dict) -> RefineState:
        avatar = avatar_from_bytes(d["avatar"].numpy().tobytes(), "checkpoint")
        return cls(d["iteration"], avatar, d["optimizer"], d["flame"], d["config"], d.get("timings", {}))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        torch.save(self.to_dict(), tmp)
        tmp.replace(path)
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
        K, world_to_cam: [V, 1, 3, 3] and [V, 1, 4, 4] cameras of the crops.
    """

    def __init__(self, subject: Subject, frames: list[int], device: torch.device, margin: int) -> None:
        h, w = subject.info.height, subject.info.width
        imgs, uncovered, boxes = [], [], []
        for t in frames:
            for c in range(subject.num_cameras):
                m = subject.mask(t, c)
                imgs.append(subject.image(t, c) * m)
                uncovered.append(1 - m)
                ys, xs = torch.nonzero(m[..., 0] > 0.5, as_tuple=True)
                boxes.append((int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())) if len(ys) else (0, h - 1, 0, w - 1))
        self.crop_h = min(h, _round_up(max(b[1] - b[0] + 1 for b in boxes) + 2 * margin, 16))
        self.crop_w = min(w, _round_up(max(b[3] - b[2] + 1 for b in boxes) + 2 * margin, 16))
        windows = []  # (y0, x0) of each view's crop, centred on its mask
        for y_lo, y_hi, x_lo, x_hi in boxes:
            y0 = min(max((y_lo + y_hi + 1 - self.crop_h) // 2, 0), h - self.crop_h)
            x0 = min(max((x_lo + x_hi + 1 - self.crop_w) // 2, 0), w - self.crop_w)
            windows.append((y0, x0))
        self.foreground, self.uncovered = (
            torch.stack([img[y0 : y0 + self.crop_h, x0 : x0 + self.crop_w] for img, (y0, x0) in zip(images, windows)]).to(device)
            for images in (imgs, uncovered)
        )
        cams = subject.cameras(frames)  # [T, C]
        K = cams.K.reshape(-1, 1, 3, 3).clone()
        K[:, 0, 0, 2] -= torch.tensor([x0 for _, x0 in windows], dtype=K.dtype)
        K[:, 0, 1, 2] -= torch.tensor([y0 for y0, _ in windows], dtype=K.dtype)
        self.K = K.to(device)
        self.world_to_cam = cams.world_to_cam.reshape(-1, 1, 4, 4).to(device)

    def cameras(self, views: torch.Tensor) -> Cameras:
        """The crop cameras of flat view indices [B] (a device tensor), [B, 1, ...]."""
        return Cameras(self.K.index_select(0, views), self.world_to_cam.index_select(0, views), self.crop_w, self.crop_h)

    def get(self, views: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """[B, h, w, 3] crops of flat view indices [B] composited over ``background`` [3]."""
        return self.foreground.index_select(0, views) + background * self.uncovered.index_select(0, views)


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
    surface = config.surface
    assert surface is not None  # decided for the subject
    frames = subject.split["train"]
    if not frames:
        raise InputError(f"subject {subject.root} has no training frames")
    source = resume.avatar if resume else avatar
    _check_thresholds(source.local, config)
    layout = PackLayout.of(source.local)
    if config.lpips_weight < 0:
        raise InputError(f"lpips_weight {config.lpips_weight}: a weight must be >= 0")
    notes: list[str] = []
    lpips = None
    if config.lpips_weight > 0:
        lpips, lpips_note = load_lpips(device, Path(config.lpips_folder) if config.lpips_folder else None)
        if lpips is None:
            notes.append(f"LPIPS left out of the loss: {lpips_note}")
    # The hand-written kernels replace chains of small torch operations (backend/refine/fused).
    # They compile in the background while the rest is set up. Imported here: Triton is
    # present only where they run.
    use_fused = config.fused and not config.compile and fused_kernels_usable(device)
    fused_placement = use_fused and layout.sh_coeffs == 1
    if use_fused:
        from backend.refine.fused import compile_ahead
        from backend.refine.fused.photometric import photometric_loss as photometric
        from backend.refine.fused.placement import place_with_hinges

        compiled_ahead = compile_ahead(device, fused_placement, mesh=config.finetune_flame)
    else:
        photometric = photometric_loss
    packed = pack(source.local).detach().to(device).requires_grad_(True)  # [N, D], the optimized leaf
    held = pack(avatar.local).detach().to(device) if config.hold > 0 else None  # the start, however far a resumed run got
    binding = source.binding.to(device)
    params = subject.params.to(device)
    params = replace(params, shape=source.shape.to(device), static_offset=None if source.static_offset is None else source.static_offset.to(device))
    flame = {k: getattr(params, k)[frames].clone() for k in _FLAME_FIELDS}
    if resume:
        flame = {k: v.to(device) for k, v in resume.flame.items()}
    for v in flame.values():
        v.requires_grad_(config.finetune_flame)
    targets = _Targets(subject, frames, device, config.loss_margin)
    cams = subject.num_cameras
    # Every step's draws are made up front from the seed and stay on the device; a step picks
    # its own by the step counter, so a resumed run sees the same ones.
    draws = torch.Generator().manual_seed(config.seed)
    frame_draws = torch.randint(len(frames), (config.iterations, config.views_per_step), generator=draws)
    view_draws = (frame_draws * cams + torch.randint(cams, frame_draws.shape, generator=draws)).to(device)
    frame_draws = frame_draws.to(device)
    step_rows = torch.arange(config.views_per_step, device=device)  # a step's own posed frames
    backgrounds = (
        torch.rand(config.iterations, 3, generator=torch.Generator().manual_seed(config.seed + 1))
        if config.random_background
        else subject.background().expand(config.iterations, 3)
    ).to(device)
    density = DensityControl(config.densify, binding, subject) if config.densify else None
    graphed = config.cuda_graph and device.type == "cuda" and density is None
    optimizer = RowAdam(packed)
    rates = learning_rates(config, layout).to(device)  # [iterations, D]
    flame_opt = None
    if config.finetune_flame:
        lr = config.lr
        flame_opt = torch.optim.Adam(
            [{"params": [flame["expr"]], "lr": lr.flame_expr}, {"params": [flame["translation"]], "lr": lr.flame_translation}]
            + [{"params": [flame[k]], "lr": lr.flame_pose} for k in ("rotation", "neck_pose", "jaw_pose", "eyes_pose")],
            capturable=graphed,
            fused=device.type == "cuda",  # one kernel per group: the per-tensor loop costs more than these small tensors' math
        )
    if resume:
        optimizer.load_state_dict(resume.optimizer["gaussians"])
        if flame_opt is not None and "flame" in resume.optimizer:
            flame_opt.load_state_dict(resume.optimizer["flame"])
    optimizers: list[RowAdam | torch.optim.Optimizer] = [optimizer] + ([flame_opt] if flame_opt is not None else [])
    # Posed vertices and triangle frames of every training frame, computed once when FLAME is
    # not fine-tuned: a step then only gathers them.
    fixed: tuple[torch.Tensor, TriangleFrames] | None = None
    if not config.finetune_flame:
        with torch.no_grad():
            verts_all = head(replace(params, **flame), check=False).vertices
            fixed = (verts_all, triangle_frames(verts_all, head.faces))

    timings: dict[str, float] = dict(resume.timings) if resume else {}
    clock = _StageClock(device, profile, timings)
    history: list[dict] = []
    start = resume.iteration if resume else 0
    stopped = False
    counter = torch.full((1,), start, dtype=torch.int64, device=device)  # the step being taken

    def state(step: int) -> RefineState:
        # state_dict() holds the live moment tensors, which the next steps update in place.
        opt = copy.deepcopy({"gaussians": optimizer.state_dict()} | ({"flame": flame_opt.state_dict()} if flame_opt is not None else {}))
        current = replace(source, binding=binding, local=unpacked_copy(packed, layout))
        return RefineState(step, current, opt, {k: v.detach().clone() for k, v in flame.items()}, config.to_dict(), dict(timings))

    def image_loss(rgb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = photometric(rgb, target, config.ssim_weight)
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
    mode = "reduce-overhead" if density is None and not graphed else None
    place = torch.compile(place_gaussians, dynamic=density is not None, mode=mode) if compiled else place_gaussians
    frames_of = torch.compile(triangle_frames, mode=mode) if compiled else triangle_frames
    step_loss = torch.compile(loss_fn, mode=mode) if compiled else loss_fn

    def mesh_at(frame: torch.Tensor, through_compiled: bool = True) -> tuple[torch.Tensor, TriangleFrames]:
        """Posed vertices [B, V, 3] and triangle frames at training frames [B] (a device
        index); with ``through_compiled``, through the compiled functions when compiling."""
        if fixed is not None:
            return fixed[0].index_select(0, frame), TriangleFrames(*(t.index_select(0, frame) for t in fixed[1]))
        verts = head(replace(params, **{k: v.index_select(0, frame) for k, v in flame.items()}), check=False).vertices
        return verts, (frames_of if through_compiled else triangle_frames)(verts, head.faces)

    def posed(frame: torch.Tensor, local: LocalGaussians, through_compiled: bool = True) -> Splats:
        """The Gaussians ``local`` at training frames [B] (a device index)."""
        verts, tri = mesh_at(frame, through_compiled)
        placed = (place if through_compiled else place_gaussians)(verts, head.faces, tri, binding.face_idx, binding.bary, local.offset, local.rotation, local.log_scale)
        return assemble_splats(*placed, local)

    def probe(frame: torch.Tensor) -> Splats:
        # Without gradients: through the compiled functions this would compile a second,
        # gradient-free variant of each (seconds, even from the on-disk cache).
        return posed(frame, unpack(packed, layout), through_compiled=False)

    budget = _tile_budget(probe, targets, backgrounds[0], len(frames) * cams, cams) if graphed else None

    def train_step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step at ``counter``; reads nothing back from the device. Returns the loss, the
        render [B, h, w, 3] and its target."""
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        clock.lap("")
        frame, view_idx = frame_draws.index_select(0, counter)[0], view_draws.index_select(0, counter)[0]
        background = backgrounds.index_select(0, counter)[0]
        view, target = targets.cameras(view_idx), targets.get(view_idx, background)
        clock.lap("data")
        local = unpack(packed, layout)
        if fused_placement:
            # The kernel gathers precomputed frames itself; posed ones are this step's own.
            verts, tri, rows = (*fixed, frame) if fixed is not None else (*mesh_at(frame), step_rows)
            splats, hinges = place_with_hinges(packed, layout, rows, verts, head.faces, tri, binding.face_idx, binding.bary, config.anti_spike, surface)
        else:
            splats = posed(frame, local)
        if density is not None:
            splats.means.retain_grad()
        clock.lap("deform")
        rgb = render(splats, view, background, budget=budget, depth=False).rgb[:, 0]
        clock.lap("render")
        if fused_placement:
            loss = image_loss(rgb, target) + hinges
        else:
            loss = step_loss(rgb, target, local.rotation, local.log_scale, local.offset)
        clock.lap("loss")
        loss.backward()
        if config.opacity_sparsity > 0:
            _add_seen_sparsity(local.opacity_logit, packed.grad[:, layout.columns("opacity_logit")][:, 0], config.opacity_sparsity)
        if held is not None:
            packed.grad.add_(packed.detach() - held, alpha=config.hold)
        clock.lap("backward")
        if density is not None:
            density.observe(splats, splats.means.grad, view)
        optimizer.step(rates.index_select(0, counter)[0])
        if flame_opt is not None:
            flame_opt.step()
        counter.add_(1)
        clock.lap("optimizer")
        return loss, rgb, target

    if use_fused:
        compiled_ahead()
    graph = GraphedStep(train_step, optimizers) if graphed else None
    t_start = time.perf_counter()
    step = start
    for step in range(start, config.iterations):
        if should_stop is not None and should_stop():
            stopped = True
            break
        loss, rgb, target = graph() if graph is not None else train_step()
        clock.collect(keep=graph is not None and graph.captured)
        done = step + 1
        if density is not None:
            packed, binding, optimizer = density.step(done, packed, layout, binding, optimizer)
            optimizers[0] = optimizer
        if done % config.log_every == 0 or done == config.iterations:
            stats = {"loss": float(loss.detach()), "psnr": psnr(rgb.detach(), target), "count": binding.count, "seconds": time.perf_counter() - t_start}
            if graph is not None and budget is not None:
                if int(budget.peak) > budget.capacity:
                    stats["tile_pairs_dropped"] = True  # some renders since the last line lost pairs
                if _grow(budget):
                    clock.marks.clear()
                    graph.recapture()
            history.append({"iteration": done, **stats})
            if progress is not None:
                progress(done, config.iterations, stats)
        if checkpoint is not None and config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.iterations:
            checkpoint(state(done))
    else:
        step = config.iterations
    final_step = step if stopped else config.iterations
    timings["wall"] = timings.get("wall", 0.0) + time.perf_counter() - t_start
    final = state(final_step)
    if checkpoint is not None:
        checkpoint(final)
    tuned = replace(params, **{k: v.detach().clone() for k, v in flame.items()})
    if binding.count != source.binding.count and density is None:
        raise RuntimeError("refinement changed the Gaussian count with a frozen layout")
    out_avatar = replace(final.avatar, local=final.avatar.local.map(lambda t: t.cpu()), binding=binding.to("cpu"))
    out_avatar.meta = dict(source.meta) | {"refined_iterations": final_step, "refine_config": config.to_dict()}
    return RefineResult(out_avatar, tuned.to("cpu"), history, timings, stopped, notes)


def _add_seen_sparsity(opacity_logit: torch.Tensor, grad: torch.Tensor, weight: float) -> None:
    """Add to ``grad`` [N], the photometric gradient of ``opacity_logit`` [N], the gradient of
    ``weight`` * mean sigmoid opacity, for the Gaussians that the photometric gradient reached
    this step (those the render drew with some transmittance left). A term in the loss would
    reach every Gaussian, and Adam's normalization would then fade the ones no view shows at
    full speed."""
    alpha = torch.sigmoid(opacity_logit.detach())
    grad.add_((grad != 0) * alpha * (1 - alpha) * (weight / opacity_logit.shape[0]))


def _tile_budget(posed: Callable[[torch.Tensor], Splats], targets: _Targets, background: torch.Tensor, views: int, cams: int) -> TileBudget:
    """A tile budget with room for every training view's intersections at the start, plus
    ``TILE_HEADROOM`` for Gaussians that grow during the run."""
    device = background.device
    probe = TileBudget(1, torch.zeros((), dtype=torch.int64, device=device))
    with torch.no_grad():
        for v in range(views):
            view = torch.tensor([v], device=device)
            render(posed(view // cams), targets.cameras(view), background, budget=probe, depth=False)
    return TileBudget(int(TILE_HEADROOM * int(probe.peak)) + 1, probe.peak.clone())


def _grow(budget: TileBudget) -> bool:
    """Enlarge ``budget`` when renders came near its capacity; True if it was resized."""
    peak = int(budget.peak)
    if peak <= budget.capacity / TILE_HEADROOM**0.5:
        return False
    budget.capacity = int(TILE_HEADROOM * peak) + 1
    return True
