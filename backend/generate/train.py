"""Two-phase training of the generator, on one device or many (torchrun DDP).

    phase 1  monocular-temporal    sources and targets: one video, different times
    phase 2  multi-view-spatial    sources and targets: different cameras; starts from the
                                   phase-1 weights, L2-SP toward them, 25% cross-time mix

Loss per step: (1 - w) L1 + w D-SSIM on the rendered target views (w = 0.2), plus the
refinement's three anti-spike hinges on the predicted local parameters (scales measured
against the layout's surface-init size, see ``relative_log_scales``), plus (phase 2)
l2sp * sum ||theta - theta_phase1||^2, plus LPIPS when asked for and available locally.

A run folder holds:

    checkpoint.pt   everything needed to resume (fp32 weights, optimizer, step, clock,
                    the L2-SP anchor); written every ``checkpoint_every`` steps, when the
                    time limit is reached, and at the end
    generator.pt    the compact weights (fp16) for `spatialavatar generate`
    log.jsonl       one JSON line per ``log_every`` steps: loss terms, K and PSNR averaged
                    over the steps and the ranks, lr, time, samples/s, and data_ms (host
                    time per step spent drawing and gathering the batch)
    summary.json    the run's configuration and final numbers (the model card's source)

Running the same command again continues from checkpoint.pt, so a run longer than one
session's time limit is a sequence of identical commands (``max_minutes`` each).

Distributed: under torchrun (WORLD_SIZE > 1) every rank loads its shard of the subjects
(rank r: subjects r, r + W, ...), samples with its own seed, and gradients are averaged by
DistributedDataParallel (nccl on CUDA, gloo on CPU). Rank 0 writes files and the progress bar.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from backend.atomic_write import atomic_path
from backend.gaussians.avatar import LocalGaussians
from backend.generate.checkpoint import generator_from_state, generator_state, read_generator_file, save_generator
from backend.generate.data import Batch, Corpus, PhaseSampler, find_subjects, shard
from backend.generate.model import Generator, GeneratorConfig, deform_batched
from backend.head.model import HeadModel
from backend.refine.losses import l1, mse, ssim_map
from backend.refine.perceptual import Lpips, load_lpips
from backend.refine.regularizers import AntiSpike, spike_loss
from backend.render.camera import Cameras
from backend.render.rasterize import render
from backend.wire.errors import InputError

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "generator.pt"
LOG = "log.jsonl"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class TrainConfig:
    """Attributes:
    phase: 1 (monocular-temporal) or 2 (multi-view-spatial).
    steps: optimizer steps of the whole run (across resumed commands).
    batch: samples per step per rank; each has K in 1..4 sources (one K per step).
    targets: target views rendered per sample.
    lr, lr_final, warmup: AdamW peak rate, final rate as a fraction of it (cosine decay),
        linear warm-up steps.
    weight_decay, grad_clip: AdamW decay; gradient-norm clip (0: off).
    ssim_weight: w in (1 - w) L1 + w D-SSIM.
    anti_spike: the refinement's three hinges on the predicted Gaussians.
    l2sp: weight of sum ||theta - theta_anchor||^2 (phase 2; the anchor is the phase-1 weights).
    cross_time: phase 2's share of samples with targets from another time.
    lpips_weight: LPIPS term (its weight files on this machine, backend/refine/perceptual.py; 0 = off).
    seed: sampling and initialization.
    log_every, checkpoint_every: steps between log lines / checkpoints.
    max_minutes: stop cleanly (checkpoint written) after this much wall time in one
        command; 0 = no limit.
    """

    phase: int = 1
    steps: int = 6_000
    batch: int = 8
    targets: int = 2
    lr: float = 4e-4
    lr_final: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ssim_weight: float = 0.2
    anti_spike: AntiSpike = field(default_factory=AntiSpike)
    l2sp: float = 0.0
    cross_time: float = 0.25
    lpips_weight: float = 0.0
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 500
    max_minutes: float = 0.0

    def check(self) -> None:
        if self.phase not in (1, 2):
            raise InputError(f"--phase must be 1 or 2, got {self.phase}")
        if self.steps < 1 or self.batch < 1 or self.targets < 1:
            raise InputError("steps, batch and targets must be positive")
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise InputError(f"--log-every and --checkpoint-every must be at least 1, got {self.log_every} and {self.checkpoint_every}")
        if self.l2sp < 0 or self.lpips_weight < 0:
            raise InputError("loss weights must be non-negative")

    def to_dict(self) -> dict:
        return asdict(self)


def phase_defaults(phase: int) -> TrainConfig:
    """Phase 1: no anchor, no cross-time mix. Phase 2: L2-SP 1e-3, 25% cross-time, lower lr."""
    if phase == 1:
        return TrainConfig(phase=1, l2sp=0.0, cross_time=0.0)
    return TrainConfig(phase=2, steps=3_000, lr=2e-4, warmup=100, l2sp=1e-3, cross_time=0.25)


# -- losses --------------------------------------------------------------------------------


def l2sp_penalty(model: nn.Module, anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum over parameters of ||theta - theta_anchor||^2 (zero at the anchor)."""
    total = None
    for name, p in model.named_parameters():
        if name in anchor:
            d = (p - anchor[name]).pow(2).sum()
            total = d if total is None else total + d
    if total is None:
        raise InputError("L2-SP anchor has none of the model's parameters")
    return total


# The surface init's in-plane size in triangle units at the default layout density (~33K
# Gaussians on the built-in head); see relative_log_scales.
REFERENCE_IN_PLANE = 0.35


def relative_log_scales(local: LocalGaussians, model: Generator) -> torch.Tensor:
    """[..., N, 3] log-scales measured against the layout's own surface-init size.

    The anti-spike thresholds are in triangle units, and the surface init's size in triangle
    units grows as the layout gets coarser (a 5K layout starts above the 0.6 scale threshold).
    Shifting every Gaussian's log-scale so that its surface-init in-plane size reads as 0.35
    makes the hinges mean the same at every density: a Gaussian may grow to ~1.7x its initial
    size, and to a 10:1 aspect ratio, before it is penalized. Identity at the default layout.
    """
    return local.log_scale - (model.base_log_scale[:, :1] - math.log(REFERENCE_IN_PLANE))


def render_targets(model: Generator, local_batched, batch: Batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """[B*T, H, W, 3] renders of the generated Gaussians in the batch's target views."""
    t = batch.targets_per_sample
    local = local_batched.map(lambda x: x.repeat_interleave(t, 0))
    splats = deform_batched(batch.target_vertices, model.faces, model.binding, local)
    h, w = batch.target_rgb.shape[1:3]
    cams = Cameras(batch.target_K[:, None], batch.target_world_to_cam[:, None], w, h)
    return render(splats, cams, batch.background).rgb[:, 0]


def compute_loss(net: nn.Module, batch: Batch, config: TrainConfig, anchor: dict[str, torch.Tensor] | None = None, lpips: Lpips | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one batch and its terms (detached).

    ``net`` is the Generator or its DDP wrapper (the forward pass goes through it so DDP
    sees it). Every term is a mean over pixels or Gaussians of equal-sized samples, so the
    mean of per-rank losses equals the loss of the union batch.
    """
    model: Generator = net.module if hasattr(net, "module") else net  # type: ignore[assignment]
    out = net(batch.sources)
    rendered = render_targets(model, out.local, batch)
    target = batch.target_rgb
    term_l1 = l1(rendered, target)
    term_dssim = 1.0 - ssim_map(rendered, target).mean()
    loss = (1.0 - config.ssim_weight) * term_l1 + config.ssim_weight * term_dssim
    terms = {"l1": term_l1, "dssim": term_dssim}
    if config.anti_spike.enabled:
        term_spike = spike_loss(relative_log_scales(out.local, model), out.local.offset, config.anti_spike)
        loss = loss + term_spike
        terms["spike"] = term_spike
    if lpips is not None and config.lpips_weight > 0:
        term_lpips = lpips(rendered, target).mean()
        loss = loss + config.lpips_weight * term_lpips
        terms["lpips"] = term_lpips
    if anchor is not None and config.l2sp > 0:
        term_l2sp = l2sp_penalty(model, anchor)
        loss = loss + config.l2sp * term_l2sp
        terms["l2sp"] = term_l2sp
    terms = {k: v.detach() for k, v in terms.items()}
    # On the device: a float here would make the host wait for every step.
    terms["psnr"] = -10.0 * torch.log10(mse(rendered.detach().float(), target).clamp_min(1e-10))
    return loss, terms


# -- distributed set-up --------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA device is available")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def teardown_distributed() -> None:
    """Leave the process group, if one was joined; call once the run's objects are out of scope.

    The first optimizer a process builds imports torch's compiler stack lazily, and a traceback
    kept from that import holds the caller's frames (a finished run's, with its DDP wrapper and
    through it the group) until the cyclic collector runs. Collect first: a group still alive at
    interpreter shutdown has gloo's worker threads meet finalization and abort the process.
    """
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def _all_true(flag: bool, info: DistInfo) -> bool:
    if info.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(sums: dict[str, torch.Tensor], count: int, info: DistInfo) -> dict[str, float]:
    """Per-step means of the logged terms over the window and over all ranks, so a run's log
    reads the same at every world size for the same global batch (one host sync per log line)."""
    names = sorted(sums)
    values = torch.stack([sums[n].float() for n in names]) / count
    if info.world > 1:
        dist.all_reduce(values)
        values = values / info.world
    return dict(zip(names, values.tolist()))


# -- the run -------------------------------------------------------------------------------


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / max(config.warmup, 1)
    t = min((step - config.warmup) / max(config.steps - config.warmup, 1), 1.0)
    return config.lr_final + (1 - config.lr_final) * 0.5 * (1 + math.cos(math.pi * t))


def load_init(path: Path, head: HeadModel) -> tuple[Generator, dict]:
    """Phase 2's starting point: a phase-1 run folder (its fp32 checkpoint.pt, else
    generator.pt) or a generator file. Returns the model and its summary info."""
    path = Path(path)
    if path.is_dir():
        ckpt = path / CHECKPOINT
        if ckpt.is_file():
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            model = generator_from_state(state["generator"], head, str(ckpt))
            return model, json.loads(state.get("summary", "{}"))
        path = path / WEIGHTS
    data = read_generator_file(path)
    return generator_from_state(data, head, str(path)), json.loads(data.get("info", "{}") or "{}")


Log = Callable[[str], None]


def train(
    config: TrainConfig,
    model_config: GeneratorConfig,
    data: list[str | Path],
    run_dir: str | Path,
    head: HeadModel,
    init: str | Path | None = None,
    device: str = "auto",
    show_progress: bool = True,
    log: Log | None = None,
) -> dict:
    """Train (or continue training) a generator; returns the run summary.

    Args:
        model_config: the architecture of a fresh phase-1 network (phase 2 takes the
            architecture of ``init``).
        data: subject folders, or folders holding them.
        run_dir: the run folder (resumed when it holds a checkpoint of the same phase).
        init: phase 2: the phase-1 run folder or generator file (also the L2-SP anchor);
            phase 1: optional weights to start from (a warm start: fresh optimizer and steps).
    """
    config.check()
    info = setup_distributed(device)
    say = log if (log is not None and info.main) else (lambda msg: None)
    run = _Training.begin(config, model_config, data, Path(run_dir), head, init, info, say)
    step, last = _run_steps(run, show_progress, say)
    return run.summary(step, last) | {"run": str(run.folder), "finished": step >= config.steps}


@dataclass
class _Training:
    """One training command's state: what its step reads, and what its loop moves on.

    Attributes:
        folder: the run folder.
        data: the subject folders as given; ``roots`` every subject found in them (all ranks'),
            ``corpus`` this rank's share, loaded on the device.
        model: the generator; ``net`` is it or its DDP wrapper (the forward pass goes through
            ``net`` so DDP sees it).
        anchor: phase 2's L2-SP anchor (the phase-1 weights) on the device, or None.
        init_info: the summary of the run this one started from ({} for a fresh start).
        lpips: the LPIPS network when the loss has the term.
        start: the step this command starts at (a resumed run's).
        elapsed: training seconds over every command of the run, as of the last log line or
            checkpoint.
    """

    config: TrainConfig
    info: DistInfo
    folder: Path
    data: list[str | Path]
    roots: list[Path]
    corpus: Corpus
    sampler: PhaseSampler
    model: Generator
    net: nn.Module
    optimizer: torch.optim.AdamW
    anchor: dict[str, torch.Tensor] | None
    init_info: dict
    lpips: Lpips | None
    start: int
    elapsed: float

    @classmethod
    def begin(
        cls, config: TrainConfig, model_config: GeneratorConfig, data: list[str | Path], folder: Path, head: HeadModel, init: str | Path | None, info: DistInfo, say: Log
    ) -> _Training:
        """The state before this command's first step: the folder's checkpoint resumed when
        it has one, else a model to start from; this rank's subjects, optimizer and sampler."""
        if info.main:
            folder.mkdir(parents=True, exist_ok=True)
        ckpt_path = folder / CHECKPOINT
        resume = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path.is_file() else None
        if resume is not None and resume["phase"] != config.phase:
            raise InputError(f"{ckpt_path} is a phase-{resume['phase']} run; use another --out folder for phase {config.phase}")
        torch.manual_seed(config.seed)
        model, anchor_state, init_info = _starting_model(config, model_config, head, init, resume, ckpt_path)
        model = model.to(info.device)
        anchor = {k: v.to(info.device) for k, v in anchor_state.items()} if anchor_state else None
        head = head.to(info.device)

        roots = find_subjects(data)
        t_load = time.perf_counter()
        corpus = Corpus(shard(roots, info.rank, info.world), head, info.device)
        say(f"rank 0: {len(corpus)} of {len(roots)} subjects loaded in {time.perf_counter() - t_load:.1f} s ({corpus.width}x{corpus.height})")

        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
        start = 0
        elapsed = 0.0
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            start = int(resume["step"])
            elapsed = float(resume["seconds"])
        sampler = PhaseSampler(corpus.layouts(), config.phase, config.targets, config.cross_time, seed=[config.seed, info.rank, start])
        net: nn.Module = model
        if info.world > 1:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None, broadcast_buffers=False)
        lpips = None
        if config.lpips_weight > 0:
            lpips, note = load_lpips(info.device)
            if lpips is None:
                raise InputError(f"--lpips: {note}; drop --lpips")
        if info.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return cls(config, info, folder, data, roots, corpus, sampler, model, net, optimizer, anchor, init_info, lpips, start, elapsed)

    def summary(self, step: int, last: dict) -> dict:
        """The run's configuration and its numbers after ``step`` steps (``last``: the last log line)."""
        layouts = self.corpus.layouts()
        return {
            "phase": self.config.phase,
            "steps_done": step,
            "steps": self.config.steps,
            "seconds": round(self.elapsed, 1),
            "world_size": self.info.world,
            "device": torch.cuda.get_device_name(self.info.device) if self.info.device.type == "cuda" else "cpu",
            "subjects": len(self.roots),
            "data": [str(p) for p in self.data],
            "image_size": [self.corpus.width, self.corpus.height],
            "frames_per_subject": sorted({f for f, _ in layouts}),
            "cameras_per_subject": sorted({c for _, c in layouts}),
            "train_config": self.config.to_dict(),
            "model_config": self.model.config.to_dict(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "gaussians": self.model.config.gaussians,
            # The run this one started from (phase 2: the phase-1 summary), without its own "init".
            "init": {k: v for k, v in self.init_info.items() if k != "init"} if self.init_info.get("phase") else None,
            "last": last,
        }

    def write_checkpoint(self, step: int, last: dict) -> None:
        """checkpoint.pt, generator.pt and summary.json after ``step`` steps (rank 0 only)."""
        if not self.info.main:
            return
        state = {
            "phase": self.config.phase,
            "step": step,
            "seconds": self.elapsed,
            "generator": generator_state(self.model, half=False),
            "optimizer": self.optimizer.state_dict(),
            "anchor": {k: v.detach().cpu() for k, v in self.anchor.items()} if self.anchor else {},
            "init_info": json.dumps(self.init_info),
            "train_config": json.dumps(self.config.to_dict()),
            "summary": json.dumps(self.summary(step, last)),
        }
        with atomic_path(self.folder / CHECKPOINT) as scratch:
            torch.save(state, scratch)
        save_generator(self.model, self.folder / WEIGHTS, self.summary(step, last))
        (self.folder / SUMMARY).write_text(json.dumps(self.summary(step, last), indent=1))


def _starting_model(
    config: TrainConfig, model_config: GeneratorConfig, head: HeadModel, init: str | Path | None, resume: dict | None, ckpt_path: Path
) -> tuple[Generator, dict[str, torch.Tensor] | None, dict]:
    """The model a command starts from, phase 2's L2-SP anchor (on the CPU) and the summary
    of the run it started from: the run's own checkpoint (``resume``), phase 1's weights for
    phase 2, a phase-1 warm start from ``init``, or a fresh network."""
    if resume is not None:
        model = generator_from_state(resume["generator"], head, str(ckpt_path))
        return model, resume.get("anchor") or None, json.loads(resume.get("init_info", "{}"))
    if config.phase == 2:
        if init is None:
            raise InputError("phase 2 starts from phase 1: pass the phase-1 run folder or generator file with --init")
        model, init_info = load_init(Path(init), head)
        anchor = {k: v.detach().clone() for k, v in model.named_parameters()} if config.l2sp > 0 else None
        return model, anchor, init_info
    if init is not None:
        # Phase 1 warm start (e.g. a generator.pt from an earlier machine): weights only.
        model, init_info = load_init(Path(init), head)
        return model, None, init_info
    return Generator.for_head(model_config, head), None, {}


def _take_step(run: _Training, step: int) -> tuple[int, torch.Tensor, dict[str, torch.Tensor], float]:
    """Optimizer step ``step`` (0-based) on a freshly drawn batch. Returns the batch's K, the
    loss, its terms (on the device) and the host seconds spent drawing and gathering the batch."""
    config = run.config
    for g in run.optimizer.param_groups:
        g["lr"] = config.lr * _lr_factor(step, config)
    t_data = time.perf_counter()
    k, samples = run.sampler.batch(config.batch)
    batch = run.corpus.batch(samples)
    data_s = time.perf_counter() - t_data
    run.model.train()
    loss, terms = compute_loss(run.net, batch, config, run.anchor, run.lpips)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.optimizer.step()
    return k, loss, terms, data_s


@dataclass
class _LogWindow:
    """The logged terms summed on the device over the steps since the last log line."""

    began: float  # time.perf_counter() at its start
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0
    data_s: float = 0.0

    def add(self, terms: dict[str, torch.Tensor], data_s: float, device: torch.device) -> None:
        for key, value in terms.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.to(device, torch.float32)
        self.count += 1
        self.data_s += data_s


def _run_steps(run: _Training, show_progress: bool, say: Log) -> tuple[int, dict]:
    """Take steps from ``run.start`` to ``config.steps`` or the time limit; log every
    ``log_every`` steps, checkpoint every ``checkpoint_every`` and at the end. Returns the
    steps done and the last log line."""
    config, info = run.config, run.info
    bar = None
    if show_progress and info.main:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=run.start, desc=f"phase {config.phase}", unit="step", dynamic_ncols=True)
    log_file = open(run.folder / LOG, "a") if info.main else None
    t0 = time.perf_counter()
    elapsed0 = run.elapsed
    last: dict = {}
    step = run.start
    window = _LogWindow(t0)
    try:
        while step < config.steps:
            over = config.max_minutes > 0 and time.perf_counter() - t0 > config.max_minutes * 60
            if _all_true(over, info):
                say(f"time limit of {config.max_minutes} min reached at step {step}; run the same command again to continue")
                break
            k, loss, terms, data_s = _take_step(run, step)
            step += 1
            window.add({"loss": loss.detach(), **terms, "k": torch.tensor(float(k))}, data_s, info.device)
            if bar is not None:
                bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                means = mean_over_ranks(window.sums, window.count, info)
                now = time.perf_counter()
                run.elapsed = elapsed0 + now - t0
                steps_per_s = window.count / max(now - window.began, 1e-9)
                last = {key: float(f"{v:.6g}") for key, v in means.items()}  # losses fall below 1e-3
                last |= {
                    "step": step,
                    "lr": run.optimizer.param_groups[0]["lr"],
                    "seconds": round(run.elapsed, 1),
                    "steps_per_s": round(steps_per_s, 2),
                    "samples_per_s": round(steps_per_s * config.batch * info.world, 1),
                    "data_ms": round(1000 * window.data_s / window.count, 2),
                }
                if log_file is not None:
                    log_file.write(json.dumps(last) + "\n")
                    log_file.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", psnr=f"{last['psnr']:.2f}")
                window = _LogWindow(now)
            if step % config.checkpoint_every == 0 and step < config.steps:
                run.elapsed = elapsed0 + time.perf_counter() - t0
                run.write_checkpoint(step, last)
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    run.elapsed = elapsed0 + time.perf_counter() - t0
    run.write_checkpoint(step, last)
    if info.world > 1:
        dist.barrier()
    return step, last


def with_overrides(base: TrainConfig, **overrides: object) -> TrainConfig:
    """``base`` with the overrides that are not None."""
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
