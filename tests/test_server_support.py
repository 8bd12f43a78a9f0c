"""Helpers for the service tests (no tests here): services in a thread or a subprocess, small avatars.

Every service started here is stopped on the way out, whatever the test did.
"""

from __future__ import annotations

import queue
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from backend.gaussians.avatar import Avatar, deform
from backend.gaussians.files import avatar_to_bytes
from backend.gaussians.surface import surface_avatar
from backend.head.model import HeadModel
from backend.render.camera import Cameras, intrinsics, look_at
from backend.render.rasterize import render
from backend.server.config import ServiceConfig
from backend.server.service import Service

REPO = Path(__file__).resolve().parents[1]
LOOPBACK_ANY_PORT = "tcp://127.0.0.1:*"
START_TIMEOUT_S = 90.0


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def service_thread(store: Path, **overrides: object) -> Iterator[Service]:
    """A service on a free loopback port, served by a thread of this process."""
    config = ServiceConfig(**{"bind": LOOPBACK_ANY_PORT, "store": store, "device": "cpu"} | overrides)  # type: ignore[arg-type]
    service = Service(config)
    thread = threading.Thread(target=service.serve_forever, name="test-service", daemon=True)
    thread.start()
    try:
        yield service
    finally:
        service.request_stop()
        thread.join(60)
        if thread.is_alive():
            raise RuntimeError("the service thread did not stop")


class ServiceProcess:
    """``python -m backend serve`` as a child process; ``endpoint`` once it listens."""

    def __init__(
        self, store: Path, bind: str = LOOPBACK_ANY_PORT, device: str = "cpu", flame: Path | None = None, extra: Sequence[str] = ()
    ) -> None:
        head = ["--flame", str(flame)] if flame else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backend", "serve", "--bind", bind, "--store", str(store), "--device", device, *head, *extra],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, args=(lines,), daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                self.stop()
                raise RuntimeError("the service did not start:\n" + "".join(self.log)) from None
            found = re.search(r"listening on (\S+)", line)
            if found:
                self.endpoint = found.group(1)
                return
            if self.proc.poll() is not None:
                raise RuntimeError("the service exited:\n" + "".join(self.log))

    def _drain(self, lines: queue.Queue[str]) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            lines.put(line)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


@contextmanager
def service_process(store: Path, bind: str = LOOPBACK_ANY_PORT, device: str = "cpu", flame: Path | None = None) -> Iterator[ServiceProcess]:
    """``flame``: a head model in FLAME's file layout; a built-in head written once that way
    (``write_flame``) loads far faster than it is built, and has the same fingerprint."""
    proc = ServiceProcess(store, bind, device, flame)
    try:
        yield proc
    finally:
        proc.stop()


def small_avatar(head: HeadModel, count: int = 2000, seed: int = 0) -> Avatar:
    """A surface avatar with random colours and identity: cheap to render on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    shape = torch.randn(head.n_shape, generator=gen) * 0.5
    return surface_avatar(head, shape, count, lambda f, b: torch.rand(f.shape[0], 3, generator=gen), meta={"test": True})


def npz_buffer(avatar: Avatar) -> np.ndarray:
    """The avatar's .npz as the [n] uint8 buffer ``import`` takes."""
    return np.frombuffer(avatar_to_bytes(avatar), np.uint8)


def front_camera(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(intrinsics [3, 3], world_to_cam [4, 4]) float32 of a camera 0.75 m in front of the face."""
    K = intrinsics(size, size, focal_px=2.0 * size)
    w2c = look_at((0.0, 0.02, 0.75), (0.0, 0.0, 0.0))
    return K.numpy().astype("<f4"), w2c.numpy().astype("<f4")


def flame_buffers(head: HeadModel, frames: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random but plausible per-frame FLAME parameters as wire buffers ([T, k] float32)."""
    rng = np.random.default_rng(seed)
    return {
        "expr": (rng.normal(size=(frames, head.n_expr)) * 0.5).astype("<f4"),
        "jaw_pose": np.abs(rng.normal(size=(frames, 3)) * 0.1).astype("<f4"),
        "rotation": (rng.normal(size=(frames, 3)) * 0.1).astype("<f4"),
    }


def reference_render(avatar: Avatar, head: HeadModel, buffers: dict[str, np.ndarray], size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rgba [H, W, 4] premultiplied, depth [H, W]) per frame, computed without the service."""
    params = head.neutral_params(len(buffers["expr"]))
    for name, value in buffers.items():
        setattr(params, name, torch.from_numpy(value.copy()))
    K, w2c = front_camera(size)
    cams = Cameras(torch.from_numpy(K)[None], torch.from_numpy(w2c)[None], size, size)
    out = []
    with torch.no_grad():
        splats = deform(avatar, head, avatar.params_for(params))
        for t in range(params.batch_size):
            r = render(splats.frame(t), cams, torch.zeros(3))
            out.append((torch.cat([r.rgb[0], r.alpha[0]], -1).numpy(), r.depth[0, ..., 0].numpy()))
    return out
