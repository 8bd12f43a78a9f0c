"""The main job, step by step: portrait -> tracking -> Stage 1 (K = 1; personalized on CUDA) ->
Stage 2 -> .blend -> Blender's render with the avatar composited -> PNG frames, GIF, MP4,
contact sheet.

Everything lands in ``DemoConfig.out``::

    portrait.png            the input (by default scikit-image's public-domain astronaut)
    subject/                the tracked portrait (a subject folder; previews/ shows the fit)
    avatar_generated.npz    Stage 1's avatar
    avatar_personalized.npz the same, personalized on the portrait (when personalization runs)
    subject_refine/         the portrait Stage 2 fits (over black; downscaled on the CPU)
    avatar.npz              after Stage 2
    demo.blend              the avatar object, its keyed FLAME performance, the set, compositing
    frames/0001.png ...     Blender's frames with the head composited
    demo.gif, demo.mp4      the same frames as an animation
    contact_sheet.png       twelve of them, numbered
    summary.json            what ran where, and the seconds per stage

The render goes through ``spatialavatar blender-render``'s code (``backend.batch``): a backend
is started on a free loopback port with a throw-away store for the scene and the render, and
stopped at the end. The .blend carries the avatar's file, so it renders again later on any
backend (``spatialavatar blender-render out/demo.blend``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend.configs import Config, SettingError, at_least
from backend.data.subject import Subject, write_frame, write_subject
from backend.gaussians.avatar import Avatar
from backend.generate.personalize import Personalization, personalize
from backend.head.model import HeadModel
from backend.refine.config import RefineConfig
from backend.refine.refine import ProgressFn
from backend.wire.errors import SpatialAvatarError

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("track", "generate", "refine", "scene", "render", "media")


@dataclass(frozen=True)
class DemoConfig(Config):
    """Everything the demo reads.

    Attributes:
        out: output folder.
        portrait: the photo; None uses scikit-image's astronaut (public domain, ships with it).
        device: "cpu" or "cuda" (tracking and Blender's own render always run on the CPU).
        frames: animation length (scene frames 1..frames).
        size: rendered frame width and height, pixels.
        fps: frames per second of the scene, GIF and MP4.
        samples: Cycles samples per pixel of the set (denoised).
        track_size: side of the tracked crop, pixels (the generator's source image).
        gpu_personalize: personalize the generated avatar on the portrait on CUDA (seconds there).
        cpu_personalize: the same on the CPU: off, because the demo's Stage 2 refines on the
            same portrait right after, and there personalization's 70 steps (about 45 s on two
            cores) would only anticipate it.
        personalize_iterations: personalization steps; None: ``Personalization.for_device``.
        gpu_iters: Stage 2 iterations on CUDA, at ``track_size``.
        cpu_iters: Stage 2 iterations on the CPU, at ``cpu_refine_size``.
        cpu_refine_size: the CPU schedule refines on a copy of the crop downscaled to this side.
        refine_background: what the portrait is composited over for refinement. The avatar ends up
            over a set, not over the photo's white: over black, any colour left outside the
            person's mask costs its full brightness, so the head keeps a cleaner edge.
        refine_max_scale: anti-spike scale threshold override (coarse layouts, e.g. a tiny generator).
        checkpoint: generator weights; None uses the shipped ones.
        flame: FLAME model path; None uses $SPATIALAVATAR_FLAME, else the built-in head.
        endpoint: backend address for the scene and render; None starts one on a free loopback port.
    """

    out: Path = Path("out")
    portrait: Path | None = None
    device: str = "cpu"
    frames: int = 48
    size: int = 384
    fps: int = 24
    samples: int = 8
    track_size: int = 512
    gpu_personalize: bool = True
    cpu_personalize: bool = False
    personalize_iterations: int | None = None
    gpu_iters: int = RefineConfig.iterations
    cpu_iters: int = 300
    cpu_refine_size: int = 256
    refine_background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    refine_max_scale: float | None = None
    checkpoint: Path | None = None
    flame: str | None = None
    endpoint: str | None = None

    def check(self) -> None:
        """Raise SettingError naming the first field the demo cannot run with."""
        at_least("frames", self.frames, 2, "the demo needs at least 2 frames")
        at_least("size", self.size, 16, "the demo needs frames of at least 16 x 16 pixels")
        for name in ("fps", "samples"):
            at_least(name, getattr(self, name), 1)
        for name in ("gpu_iters", "cpu_iters"):
            at_least(name, getattr(self, name), 1, "refinement needs at least 1 iteration")
        if self.personalize_iterations is not None:
            at_least("personalize_iterations", self.personalize_iterations, 1)
        for name in ("track_size", "cpu_refine_size"):
            at_least(name, getattr(self, name), 16, "a crop needs at least 16 x 16 pixels")
        if self.device not in ("cpu", "cuda"):
            raise SettingError("device", self.device, "must be cpu or cuda")

    @property
    def personalizes(self) -> bool:
        """Whether the generated avatar is personalized on this device."""
        return self.gpu_personalize if self.device == "cuda" else self.cpu_personalize


@dataclass
class DemoResult:
    """What the demo wrote (paths) and how long each stage took (seconds)."""

    portrait: Path
    subject: Path
    avatar: Path
    blend: Path
    frames: list[Path]
    gif: Path
    mp4: Path
    contact_sheet: Path
    gaussians: int
    personalize: str
    refine: str
    device: str
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        d = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        d["frames"] = len(self.frames)
        d["first_frame"] = str(self.frames[0])
        d["seconds"] = {k: round(v, 1) for k, v in self.seconds.items()}
        return d


Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextmanager
def _stage(name: str, seconds: dict[str, float], log: Log) -> Iterator[None]:
    log(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name} ...")
    t0 = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - t0
    log(f"      {name}: {seconds[name]:.1f} s")


def default_portrait(path: Path) -> Path:
    """Write scikit-image's astronaut (512 x 512, public domain, bundled with scikit-image) to ``path``."""
    import skimage.data

    Image.fromarray(skimage.data.astronaut()).save(path)
    return path


def refine_subject(subject: Subject, size: int, background: tuple[float, float, float], root: Path) -> Subject:
    """A copy of a square ``subject`` (tracked crops are) in ``root`` at ``size`` x ``size`` pixels
    over ``background``: images and masks resized (Lanczos), intrinsics scaled with them (pixel
    edges sit at integers, so rows 0 and 1 of K scale by the same factor)."""
    scale = size / subject.info.width
    K = subject.K.clone()
    K[..., :2, :] *= scale
    info = replace(subject.info, width=size, height=size, background=background)
    write_subject(root, info, subject.params, K, subject.world_to_cam)

    def resized(image: torch.Tensor) -> np.ndarray:  # [H, W] or [H, W, 3] in [0, 1]
        img = Image.fromarray((image.numpy() * 255 + 0.5).astype(np.uint8)).resize((size, size), Image.LANCZOS)
        return np.asarray(img) / 255.0

    for t in range(subject.num_frames):
        for c in range(subject.num_cameras):
            write_frame(root, t, c, resized(subject.image(t, c)), resized(subject.mask(t, c)[..., 0]))
    return Subject.load(root)


def free_endpoint() -> str:
    """A loopback address nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@contextmanager
def _steps_bar(desc: str, total: int) -> Iterator[ProgressFn]:
    """A progress bar on stderr and the refinement progress callback that drives it."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="it", file=sys.stderr, leave=False) as bar:

        def progress(done: int, total: int, stats: dict) -> None:
            bar.update(done - bar.n)
            bar.set_postfix(psnr=f"{stats['psnr']:.2f}")

        yield progress


def personalize_generated(avatar: Avatar, head: HeadModel, subject: Subject, config: DemoConfig, log: Log) -> tuple[Avatar, str]:
    """Generate's last step, where ``config`` turns it on for its device: the generated avatar
    refined briefly on its source (frame 0 of ``subject``). Returns the avatar and a line
    saying whether it ran."""
    if not config.personalizes:
        switch = "gpu_personalize" if config.device == "cuda" else "cpu_personalize"
        line = f"not personalized (off on {config.device}: {switch})"
        log(f"      {line}")
        return avatar, line
    settings = Personalization.for_device(config.device).with_overrides({"iterations": config.personalize_iterations})
    t0 = time.perf_counter()
    with _steps_bar("personalize", settings.iterations) as progress:
        personalized = personalize(avatar, head, subject, [(0, 0)], settings, progress=progress)
    line = f"personalized: {settings.iterations:,} steps on the portrait in {time.perf_counter() - t0:.1f} s"
    log(f"      {line}")
    return personalized, line


def _refine(avatar: Avatar, head: HeadModel, subject: Subject, config: DemoConfig, log: Log) -> tuple[Avatar, str]:
    """Stage 2 on the tracked portrait: the full schedule on CUDA, a short one on the CPU.
    Returns the refined avatar and a line saying which schedule ran."""
    from backend.refine.refine import refine

    cuda = config.device == "cuda"
    iters, size = (config.gpu_iters, subject.info.width) if cuda else (config.cpu_iters, min(config.cpu_refine_size, subject.info.width))
    target = refine_subject(subject, size, config.refine_background, config.out / "subject_refine")
    what = "full GPU schedule" if cuda else f"short CPU schedule (a CUDA machine runs {config.gpu_iters:,} at {subject.info.width} px)"
    line = f"{what}: {iters:,} iterations at {target.info.width} x {target.info.height} px"
    log(f"      refinement: {line}")
    rc = RefineConfig().with_overrides(
        {"iterations": iters, "log_every": max(1, min(100, iters // 20)), "anti_spike.max_scale": config.refine_max_scale}
    )
    with _steps_bar("refine", iters) as progress:
        result = refine(avatar, head, target, rc, progress=progress)
    return result.avatar, line


def _import_avatar(endpoint: str, path: Path) -> str:
    """Put the avatar file into the backend at ``endpoint``; returns its id."""
    from backend.wire.client import Client

    with Client(endpoint, timeout_s=120.0, retries=0) as client:
        reply = client.call("import", {"name": "demo avatar"}, {"file": np.frombuffer(path.read_bytes(), np.uint8)})
    return str(reply.result["avatar"]["id"])


def _build_scene(spec_path: Path) -> None:
    """Run ``backend.demo.scene`` in a bpy subprocess (Blender as a module: no torch in it)."""
    proc = subprocess.run([sys.executable, "-m", "backend.demo.scene", str(spec_path)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
        raise SpatialAvatarError(f"building the demo scene failed (status {proc.returncode}):\n{tail}")


def run_demo(config: DemoConfig, log: Log = _stderr) -> DemoResult:
    """Run every step of the demo (see the module doc); raises SpatialAvatarError with a message."""
    from backend.batch.blender_render import BlenderRenderJob, backend, render
    from backend.demo import media
    from backend.demo.scene import SceneSpec
    from backend.gaussians.files import save_avatar
    from backend.generate.checkpoint import load_generator
    from backend.generate.generate import generate_avatar
    from backend.head.builtin.expressions import BLINK_CLOSED
    from backend.head.registry import load_head_model

    config.check()
    if importlib.util.find_spec("bpy") is None:  # checked first: the scene comes after minutes of work
        raise SpatialAvatarError("the demo builds its .blend with Blender as a module (bpy), "
                                 "which is not installed; `make demo` installs it")
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    portrait = config.portrait or default_portrait(out / "portrait.png")
    head = load_head_model(config.flame)

    with _stage("track", seconds, log):
        from backend.tracking import TrackConfig, track
        from backend.tracking.crop import CropConfig

        track_config = TrackConfig(crop=replace(CropConfig(), size=config.track_size))
        tracked = track([portrait], out / "subject", head, track_config, warn=lambda w: log(f"      warning: {w}"))
        subject = Subject.load(tracked.root)  # track() raises when the photo shows no usable face
        log(f"      {portrait.name}: landmark error {tracked.summary()['landmark_error_iod_percent']:.2f} % of the inter-ocular distance")

    with _stage("generate", seconds, log):
        head = head.to(config.device)  # tracking is done: it fits on the CPU
        model, _ = load_generator(config.checkpoint, head)
        generated = generate_avatar(model.to(config.device), head, subject, [(0, 0)])
        save_avatar(generated, out / "avatar_generated.npz")
        log(f"      {generated.count:,} Gaussians, network {generated.meta['generate_ms']:.0f} ms")
        start, personalize_line = personalize_generated(generated, head, subject, config, log)
        if start is not generated:
            save_avatar(start, out / "avatar_personalized.npz")

    with _stage("refine", seconds, log):
        refined, refine_line = _refine(start, head, subject, config, log)
        avatar_path = save_avatar(refined, out / "avatar.npz")

    blend, frames_dir = out / "demo.blend", out / "frames"
    shutil.rmtree(frames_dir, ignore_errors=True)  # frames of an earlier, longer run would linger
    endpoint = config.endpoint or free_endpoint()
    with tempfile.TemporaryDirectory(prefix="spatialavatar-demo-store-") as store, ExitStack() as running:
        job = BlenderRenderJob(
            blend=blend, frames=(1, config.frames), out=frames_dir, endpoint=endpoint,
            store=Path(store), device=config.device, flame=config.flame,
        )
        with _stage("scene", seconds, log):
            running.enter_context(backend(job))  # started here (a free port), stopped when the render is done
            aid = _import_avatar(endpoint, avatar_path)
            rest = {name: float(v) for name, v in zip(subject.params.expr_names, subject.params.expr[0])}
            spec = SceneSpec(endpoint, aid, str(blend.resolve()), config.frames, config.size, config.samples, config.fps, BLINK_CLOSED, rest)
            _build_scene(spec.write(out / "scene.json"))
        with _stage("render", seconds, log):
            size = f"{config.size} x {config.size}"
            log(f"      Blender (Cycles, {config.samples} samples) renders {config.frames} frames at {size}; the backend draws the head")
            rendered = render(job).written
    if len(rendered) != config.frames:
        raise SpatialAvatarError(f"Blender wrote {len(rendered)} frames, {config.frames} were asked for")

    with _stage("media", seconds, log):
        images = media.read_frames(rendered)
        gif = media.write_gif(images, out / "demo.gif", config.fps)
        mp4 = media.write_mp4(images, out / "demo.mp4", config.fps)
        sheet = media.labelled_sheet(images, list(range(1, config.frames + 1)), out / "contact_sheet.png")
    seconds["total"] = time.perf_counter() - t_all

    result = DemoResult(
        portrait, subject.root, avatar_path, blend, rendered, gif, mp4, sheet, refined.count, personalize_line, refine_line,
        config.device, seconds,
    )
    (out / "summary.json").write_text(json.dumps(result.summary(), indent=1))
    return result
