"""Batch renders of a .blend with its avatars composited: ``spatialavatar blender-render``.

What it does, in order:

1. Ask ``hello`` at the endpoint. When nothing answers, start ``python -m backend serve`` there
   (and only then: it stops only the backend it started).
2. Run Blender on the file: a ``blender`` executable (``--blender PATH``, else one on PATH) as
   ``blender -b --addons MODULE FILE [-o DIR/] [-s A -e B] -a``; without one, the same render through the
   ``bpy`` module in a ``python -c`` subprocess, with the add-on registered from this checkout.
   Either way the add-on finds the backend through ``$SPATIALAVATAR_ENDPOINT``.
3. Report the frames Blender wrote (its ``Saved: '...'`` lines). A Blender that exits non-zero
   (the add-on stops a render whose avatars cannot be drawn) is an error naming its last lines.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from backend.wire.client import Client, ServiceUnavailable
from backend.wire.environment import ANIMATION_ENV, DEFAULT_ENDPOINT, ENDPOINT_ENV
from backend.wire.errors import SpatialAvatarError

ROOT = Path(__file__).resolve().parents[2]
ADDON_MODULE = "bl_ext.user_default.spatialavatar"  # the extension installed from disk into the default repository
_SAVED = re.compile(r"Saved: '(.+?)'")

# The render through the bpy module: the add-on from this checkout, then Blender's own animation render.
BPY_SCRIPT = """
import sys
blend, start, end, out, root = sys.argv[1:6]
sys.path.insert(0, root)
from backend.batch import bpy_process
bpy_process.end_without_teardown()
import bpy
import blender_addon
blender_addon.register()
bpy.ops.wm.open_mainfile(filepath=blend)
scene = bpy.context.scene
if start:
    scene.frame_start, scene.frame_end = int(start), int(end)
if out:
    scene.render.filepath = out
bpy.ops.render.render(animation=True)
bpy_process.exit(0)
"""


@dataclass(frozen=True)
class BlenderRenderJob:
    """One batch render.

    Attributes:
        blend: the .blend file.
        frames: (first, last) scene frames, inclusive; None renders the file's own range.
        out: output folder (frames named by number, as Blender names them); None keeps the file's path.
        blender: Blender executable; None looks for ``blender`` on PATH, then falls back to bpy.
        endpoint: where the backend answers or is started.
        store, device, flame: for a backend started here (``spatialavatar serve`` flags).
        start_timeout_s: how long a started backend may take to listen.
        hello_timeout_s: how long to wait for a running backend's answer.
    """

    blend: Path
    frames: tuple[int, int] | None = None
    out: Path | None = None
    blender: Path | None = None
    endpoint: str = DEFAULT_ENDPOINT
    store: Path | None = None
    device: str = "auto"
    flame: str | None = None
    start_timeout_s: float = 180.0
    hello_timeout_s: float = 2.0


@dataclass
class BlenderRenderResult:
    written: list[Path] = field(default_factory=list)
    started_backend: bool = False
    runner: str = ""
    seconds: float = 0.0


def parse_frames(spec: str) -> tuple[int, int]:
    """``"A..B"`` or ``"A"`` -> (A, B); raises SpatialAvatarError naming ``--frames``."""
    m = re.fullmatch(r"\s*(-?\d+)\s*(?:\.\.\s*(-?\d+)\s*)?", spec)
    if not m:
        raise SpatialAvatarError(f"--frames must be A..B or A (scene frame numbers), got {spec!r}")
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) is not None else first
    if last < first:
        raise SpatialAvatarError(f"--frames {spec}: the last frame comes before the first")
    return first, last


def backend_answers(endpoint: str, timeout_s: float) -> bool:
    """Whether a SpatialAvatar service answers ``hello`` at ``endpoint``."""
    try:
        with Client(endpoint, timeout_s=timeout_s, retries=0) as c:
            c.call("hello")
    except ServiceUnavailable:
        return False
    return True


@contextmanager
def backend(job: BlenderRenderJob) -> Iterator[bool]:
    """A backend at ``job.endpoint`` for the duration; yields whether it was started here (and
    is then stopped on the way out)."""
    if backend_answers(job.endpoint, job.hello_timeout_s):
        yield False
        return
    cmd = [sys.executable, "-m", "backend", "serve", "--bind", job.endpoint, "--device", job.device]
    cmd += ["--store", str(job.store)] if job.store else []
    cmd += ["--flame", job.flame] if job.flame else []
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def drain() -> None:  # keeps reading, so the service never blocks on a full pipe
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            lines.put(line)

    threading.Thread(target=drain, daemon=True).start()
    try:
        deadline = time.monotonic() + job.start_timeout_s
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise SpatialAvatarError(f"the backend started at {job.endpoint} did not listen within {job.start_timeout_s:g} s") from None
            if "listening on" in line:
                break
            if proc.poll() is not None:
                raise SpatialAvatarError(f"the backend could not start at {job.endpoint}: {''.join(log[-5:]).strip()}")
        yield True
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def blender_command(job: BlenderRenderJob) -> tuple[list[str], str]:
    """The command that renders ``job`` and what runs it ("blender PATH" or "bpy")."""
    exe = str(job.blender) if job.blender else shutil.which("blender")
    out = f"{job.out}{os.sep}" if job.out else ""
    if exe:
        cmd = [exe, "-b", "--addons", ADDON_MODULE, str(job.blend)]  # add-ons before the file that needs them
        cmd += ["-o", out] if out else []
        cmd += ["-s", str(job.frames[0]), "-e", str(job.frames[1])] if job.frames else []
        return [*cmd, "-a"], f"blender {exe}"
    start, end = (str(f) for f in job.frames) if job.frames else ("", "")
    return [sys.executable, "-c", BPY_SCRIPT, str(job.blend), start, end, out, str(ROOT)], "bpy"


_BLEND_MAGIC = (b"BLENDER", b"\x1f\x8b", b"\x28\xb5\x2f\xfd")  # plain, gzip, zstd


def _is_blend(path: Path) -> bool:
    """Whether ``path`` starts like a .blend, so Blender is not started on any other file."""
    with path.open("rb") as f:
        head = f.read(7)
    return head.startswith(_BLEND_MAGIC)


def render(job: BlenderRenderJob, echo: bool = False) -> BlenderRenderResult:
    """Render ``job`` (see the module doc); ``echo`` copies Blender's output to stderr."""
    if not job.blend.is_file():
        raise SpatialAvatarError(f"{job.blend}: no such .blend file")
    if not _is_blend(job.blend):
        raise SpatialAvatarError(f"{job.blend}: not a .blend file (Blender saves them plain, gzip- or zstd-compressed)")
    if job.blender is not None and not (job.blender.is_file() and os.access(job.blender, os.X_OK)):
        raise SpatialAvatarError(f"--blender {job.blender}: not an executable file")
    if job.out:
        job.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cmd, runner = blender_command(job)
    result = BlenderRenderResult(runner=runner)
    with backend(job) as started:
        result.started_backend = started
        env = os.environ | {ENDPOINT_ENV: job.endpoint, ANIMATION_ENV: "1"}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            if echo:
                sys.stderr.write(line)
            tail = (tail + [line])[-12:]
            if saved := _SAVED.search(line):
                result.written.append(Path(saved.group(1)))
        if proc.wait() != 0:
            raise SpatialAvatarError(f"Blender ({runner}) stopped with status {proc.returncode}:\n{''.join(tail).rstrip()}")
    result.seconds = time.perf_counter() - t0
    return result
