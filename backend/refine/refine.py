"""Stage 2: layout-preserving per-subject refinement.

Optimizes every Gaussian's local parameters (offset, rotation, log-scale, opacity, colour)
against a subject's training frames; optionally fine-tunes the per-frame FLAME parameters.
The binding and the Gaussian count never change (unless baseline (a)'s densification is
configured), so everything keyed against the avatar in Blender still fits.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from backend.data.subject import Subject
from backend.errors import InputError
from backend.gaussians.avatar import Avatar, LocalGaussians, assemble_splats, place_gaussians
from backend.gaussians.frames import TriangleFrames, triangle_frames
from backend.gaussians.files import avatar_from_bytes, avatar_to_bytes
from backend.head.model import HeadModel
from backend.head.params import FlameParams
from backend.refine.config import RefineConfig
from backend.refine.densify import DensityControl
from backend.refine.losses import photometric_loss, psnr
from backend.refine.regularizers import spike_loss
from backend.render.camera import Cameras
from backend.render.rasterize import render

ProgressFn = Callable[[int, int, dict], None]
StopFn = Callable[[], bool]
CheckpointFn = Callable[["RefineState"], None]

MAX_START_SHARE_OVER_SCALE = 0.25
_FLAME_FIELDS = ("expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "translation")


@dataclass
class RefineState:
    """Everything needed to continue a run exactly where it stopped."""

    iteration: int
    avatar: Avatar
    optimizer: dict
    generator: torch.Tensor
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
            "generator": self.generator,
            "flame": self.flame,
            "config": self.config,
            "timings": self.timings,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RefineState:
        avatar = avatar_from_bytes(d["avatar"].numpy().tobytes(), "checkpoint")
        return cls(d["iteration"], avatar, d["optimizer"], d["generator"], d["flame"], d["config"], d.get("timings", {}))

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


class _Targets:
    """Training views cropped to a fixed-size window around each view's mask (plus a margin).

    The background outside the window is matched by construction, so the loss need not look
    there, and the rasterizer need not draw it: each view's camera is shifted so that it
    renders exactly its window. Images, intrinsics and extrinsics stay on the device; a step
    picks views by slicing, with no host-to-device copy.

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

    def cameras(self, views: list[int]) -> Cameras:
        """The crop cameras of flat view indices, [B, 1, ...]."""
        return Cameras(_take(self.K, views), _take(self.world_to_cam, views), self.crop_w, self.crop_h)

    def get(self, views: list[int], background: torch.Tensor) -> torch.Tensor:
        """[B, h, w, 3] crops of flat view indices composited over ``background`` [3]."""
        return _take(self.foreground, views) + background * _take(self.uncovered, views)


def _take(t: torch.Tensor, index: list[int]) -> torch.Tensor:
    """``t[index]``; one index is a slice, which is a view and costs no copy or kernel."""
    return t[index[0] : index[0] + 1] if len(index) == 1 else t[index]


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _param_groups(local: LocalGaussians, config: RefineConfig) -> list[dict]:
    lr = config.lr
    groups = [
        ("offset", local.offset, lr.offset),
        ("rotation", local.rotation, lr.rotation),
        ("log_scale", local.log_scale, lr.log_scale),
        ("opacity_logit", local.opacity_logit, lr.opacity_logit),
        ("sh", local.sh, lr.sh_dc),
    ]
    return [{"name": name, "params": [p], "lr": rate, "base_lr": rate} for name, p, rate in groups]


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


def _lr_scale(config: RefineConfig, group: str, step: int) -> float:
    """Multiplier of a group's base rate at ``step``: an exponential decay over the run."""
    t = min(step / max(config.iterations, 1), 1.0)
    final = config.lr.offset_final / config.lr.offset if group == "offset" else config.lr.final_factor
    return math.exp(t * math.log(final))


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
        profile: synchronize around each stage to fill ``timings`` (slower).
    """
    device = head.v_template.device
    frames = subject.split["train"]
    if not frames:
        raise InputError(f"subject {subject.root} has no training frames")
    gen = torch.Generator().manual_seed(config.seed)
    source = resume.avatar if resume else avatar
    _check_thresholds(source.local, config)
    local = source.local.map(lambda t: t.detach().clone().to(device).requires_grad_(True))
    binding = source.binding.to(device)
    params = subject.params.to(device)
    params = replace(params, shape=source.shape.to(device), static_offset=None if source.static_offset is None else source.static_offset.to(device))
    flame = {k: getattr(params, k)[frames].clone() for k in _FLAME_FIELDS}
    if resume:
        flame = {k: v.to(device) for k, v in resume.flame.items()}
        gen.set_state(resume.generator)
    for v in flame.values():
        v.requires_grad_(config.finetune_flame)
    targets = _Targets(subject, frames, device, config.loss_margin)
    random_background = config.random_background if config.random_background is not None else subject.info.source != "synthetic"
    # Drawn up front from the seed, one colour per step, so a resumed run sees the same ones.
    backgrounds = (
        torch.rand(config.iterations, 3, generator=torch.Generator().manual_seed(config.seed + 1))
        if random_background
        else subject.background().expand(config.iterations, 3)
    ).to(device)
    fused = device.type == "cuda"  # one kernel per group instead of a loop over tensors
    optimizer = torch.optim.Adam(_param_groups(local, config), eps=1e-15, fused=fused)
    flame_opt = None
    if config.finetune_flame:
        lr = config.lr
        flame_opt = torch.optim.Adam(
            [{"params": [flame["expr"]], "lr": lr.flame_expr}, {"params": [flame["translation"]], "lr": lr.flame_translation}]
            + [{"params": [flame[k]], "lr": lr.flame_pose} for k in ("rotation", "neck_pose", "jaw_pose", "eyes_pose")]
        )
    density = DensityControl(config.densify, binding, subject) if config.densify else None
    if resume:
        optimizer.load_state_dict(resume.optimizer["gaussians"])
        if flame_opt is not None and "flame" in resume.optimizer:
            flame_opt.load_state_dict(resume.optimizer["flame"])
    # Posed vertices and triangle frames of every training frame, computed once when FLAME is
    # not fine-tuned: a step then only gathers them.
    fixed: tuple[torch.Tensor, TriangleFrames] | None = None
    if not config.finetune_flame:
        with torch.no_grad():
            verts_all = head(replace(params, **flame), check=False).vertices
            fixed = (verts_all, triangle_frames(verts_all, head.faces))

    timings = {k: 0.0 for k in ("deform", "render", "loss", "backward", "optimizer")} | (dict(resume.timings) if resume else {})
    history: list[dict] = []
    start = resume.iteration if resume else 0
    stopped = False
    sync = (lambda: torch.cuda.synchronize(device)) if (profile and device.type == "cuda") else (lambda: None)

    def state(step: int) -> RefineState:
        opt = {"gaussians": optimizer.state_dict()}
        if flame_opt is not None:
            opt["flame"] = flame_opt.state_dict()
        current = replace(source, binding=binding, local=local.map(lambda t: t.detach().clone()))
        return RefineState(step, current, opt, gen.get_state(), {k: v.detach().clone() for k, v in flame.items()}, config.to_dict(), dict(timings))

    def loss_fn(rgb: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        loss = photometric_loss(rgb, target, config.ssim_weight)
        if config.anti_spike.enabled:
            loss = loss + spike_loss(log_scale, offset, config.anti_spike)
        return loss

    # Deformation and loss are chains of small element-wise kernels: compiled, they fuse. With
    # a frozen layout the shapes never change, so the compiled kernels are also replayed as
    # CUDA graphs ("reduce-overhead"): the step is bound by kernel launches, not by the GPU.
    compiled = config.compile and device.type == "cuda"
    mode = None if density is not None else "reduce-overhead"
    place = torch.compile(place_gaussians, dynamic=density is not None, mode=mode) if compiled else place_gaussians
    frames_of = torch.compile(triangle_frames, mode=mode) if compiled else triangle_frames
    step_loss = torch.compile(loss_fn, mode=mode) if compiled else loss_fn

    t_start = time.perf_counter()
    step = start
    for step in range(start, config.iterations):
        if should_stop is not None and should_stop():
            stopped = True
            break
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * _lr_scale(config, g["name"], step)
        idx = torch.randint(len(frames), (config.views_per_step,), generator=gen).tolist()
        cam_idx = torch.randint(subject.num_cameras, (config.views_per_step,), generator=gen).tolist()

        t0 = time.perf_counter()
        if fixed is not None:
            verts, tri = _take(fixed[0], idx), TriangleFrames(*(_take(t, idx) for t in fixed[1]))
        else:
            verts = head(replace(params, **{k: v[idx] for k, v in flame.items()}), check=False).vertices
            tri = frames_of(verts, head.faces)
        means, quats, scales = place(verts, head.faces, tri, binding.face_idx, binding.bary, local.offset, local.rotation, local.log_scale)
        splats = assemble_splats(means, quats, scales, local)
        if density is not None:
            splats.means.retain_grad()
        sync()
        t1 = time.perf_counter()
        flat = [i * subject.num_cameras + c for i, c in zip(idx, cam_idx)]
        view = targets.cameras(flat)
        background = backgrounds[step]
        out = render(splats, view, background)
        sync()
        t2 = time.perf_counter()
        loss = step_loss(out.rgb[:, 0], targets.get(flat, background), local.log_scale, local.offset)
        sync()
        t3 = time.perf_counter()
        loss.backward()
        sync()
        t4 = time.perf_counter()
        if density is not None:
            density.observe(splats, splats.means.grad, view)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if flame_opt is not None:
            flame_opt.step()
            flame_opt.zero_grad(set_to_none=True)
        if density is not None:
            local, binding, optimizer = density.step(step + 1, local, binding, optimizer, lambda l: _param_groups(l, config))
        sync()
        t5 = time.perf_counter()
        for key, dt in zip(("deform", "render", "loss", "backward", "optimizer"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            timings[key] += dt

        done = step + 1
        if done % config.log_every == 0 or done == config.iterations:
            stats = {
                "loss": float(loss.detach()),
                "psnr": psnr(out.rgb[:, 0].detach(), targets.get(flat, background)),
                "count": binding.count,
                "seconds": time.perf_counter() - t_start,
            }
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
    return RefineResult(out_avatar, tuned.to("cpu"), history, timings, stopped)
