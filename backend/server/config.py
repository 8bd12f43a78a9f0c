"""The service's configuration: one frozen dataclass, filled by ``spatialavatar serve``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from backend.wire.environment import DEFAULT_ENDPOINT
from backend.wire.protocol import Limits

STORE_ENV = "SPATIALAVATAR_STORE"


def default_store() -> Path:
    """$SPATIALAVATAR_STORE, else spatialavatar/store under the user's data folder."""
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV])
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "spatialavatar" / "store"


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on what one request may ask for (beyond the protocol's byte limits).

    Attributes:
        max_frames: FLAME frames per deform or render request.
        max_image_side: render width and height, pixels.
        max_upload_bytes: one uploaded file (portrait, video, avatar .npz).
        max_image_pixels: decoded portrait size, pixels (guards against decompression bombs).
        max_gaussians: Gaussians of a new avatar.
        max_video_frames: frames of an uploaded video (the tracker reads every one of them).
        max_video_seconds: length of an uploaded video.
        max_video_side: width and height of an uploaded video's frames, pixels.
        min_video_side: width and height of an uploaded video's frames, pixels; the tracker's
            smallest frame (``backend.tracking.images.MIN_IMAGE_SIDE``).
    """

    max_frames: int = 1024
    max_image_side: int = 4096
    max_upload_bytes: int = 256 * 2**20
    max_image_pixels: int = 40_000_000
    max_gaussians: int = 1_000_000
    max_video_frames: int = 36_000  # ten minutes at 60 fps
    max_video_seconds: float = 600.0
    max_video_side: int = 4096
    min_video_side: int = 64


@dataclass(frozen=True)
class ServiceConfig:
    """Attributes:
    bind: ZeroMQ endpoint; loopback unless ``keys`` is set (tcp://127.0.0.1:* picks a free port).
    store: folder of avatars, subjects and job records.
    device: "auto" (CUDA when present), "cuda" or "cpu".
    flame: head model (FLAME folder or file); None for $SPATIALAVATAR_FLAME or the built-in head.
    generator: stage-1 generator checkpoint; None for the one `spatialavatar generate` uses by default.
    keys: CurveZMQ key folder (``spatialavatar keys``); None for no encryption (loopback only).
    limits: message size limits.
    requests: what one request may ask for.
    max_pending: device requests waiting for the worker before new ones get "busy".
    send_timeout_s: how long a stream waits for a client that stopped reading (no ``ack``
        of its replies, or a full socket) before the stream is dropped.
    send_hwm: replies queued per client.
    stream_window: replies a stream may run ahead of the last one its client acknowledged.
    watch_interval_s: a job watcher hears from the service at least this often.
    replay_size: final replies remembered for clients that retry a non-idempotent request.
    shared_slots: shared-memory slots for the render replies of clients on this machine that
        ask for them (``shared_memory``); 0 turns it off. Never used with ``keys``.
    compile_player: fuse each avatar's posing with torch.compile (``PlayerConfig.compile``,
        CUDA): a frame about a quarter faster, but the first render of each batch size
        compiles for about 10 s (less once the disk cache holds its kernels).
    """

    bind: str = DEFAULT_ENDPOINT
    store: Path = field(default_factory=default_store)
    device: str = "auto"
    flame: str | None = None
    generator: Path | None = None
    keys: Path | None = None
    limits: Limits = Limits()
    requests: RequestLimits = RequestLimits()
    max_pending: int = 64
    send_timeout_s: float = 1.0
    send_hwm: int = 256
    stream_window: int = 16
    watch_interval_s: float = 1.0
    replay_size: int = 256
    shared_slots: int = 8
    compile_player: bool = False
