"""The add-on's side of the ZeroMQ service: one Lazy Pirate ``Client`` from the shared wire modules.

The built extension carries ``backend/wire`` as its ``wire`` subpackage (see build.py); a
development checkout imports the same folder from ``backend.wire``.
Use ``call`` for blocking work (operators in background mode, the connection test) and
``submit`` + ``poll`` from a timer in the UI, which never waits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    from .wire import client as wire_client
    from .wire import errors as wire_errors
    from .wire import operations as wire_operations
    from .wire import protocol as wire_protocol
    from .wire import security as wire_security
    from .wire.environment import DEFAULT_ENDPOINT
except ImportError:  # a development checkout: the same modules, from the backend package
    from backend.wire import client as wire_client
    from backend.wire import errors as wire_errors
    from backend.wire import operations as wire_operations
    from backend.wire import protocol as wire_protocol
    from backend.wire import security as wire_security
    from backend.wire.environment import DEFAULT_ENDPOINT

UserError = wire_errors.SpatialAvatarError  # WireError, ServiceUnavailable and key-file errors alike
WireError = wire_protocol.WireError
ServiceUnavailable = wire_client.ServiceUnavailable
Reply = wire_protocol.Reply


@dataclass(frozen=True)
class Settings:
    """What the preferences say about reaching the backend."""

    endpoint: str = DEFAULT_ENDPOINT
    timeout_s: float = 10.0
    retries: int = 1
    key_dir: str = ""


def _keys(key_dir: str):
    if not key_dir:
        return None
    return wire_security.ClientKeys.from_dir(Path(key_dir))


def open_client(settings: Settings) -> wire_client.Client:
    return wire_client.Client(settings.endpoint, timeout_s=settings.timeout_s, retries=settings.retries, keys=_keys(settings.key_dir))


def hello(settings: Settings) -> dict[str, Any]:
    """The backend's hello result (blocking); raises WireError / ServiceUnavailable."""
    with open_client(settings) as c:
        return c.call(wire_operations.Hello.op).result


def neutral_args(avatar_id: str, gaussians: int, max_points: int = 0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Arguments and buffers of a ``deform`` of one zero frame with ``statics``: the avatar in its
    neutral pose with colours and opacities. ``max_points`` > 0 asks for an evenly spread subset
    (at most the avatar's ``gaussians``); the service picks the same subset for every frame."""
    subset = int(max_points) if 0 < max_points < gaussians else None
    return wire_operations.Deform.args(avatar=avatar_id, statics=True, max_gaussians=subset), {"expr": np.zeros((1, 1), np.float32)}


def neutral_gaussians(settings: Settings, avatar_id: str, max_points: int = 0) -> dict[str, np.ndarray]:
    """Blocking ``get`` + ``deform`` (see ``neutral_args``): positions, scales, rotations, opacities, colors."""
    with open_client(settings) as c:
        gaussians = int(c.call(wire_operations.Get.op, wire_operations.Get.args(id=avatar_id)).result["avatar"]["gaussians"])
        return c.call(wire_operations.Deform.op, *neutral_args(avatar_id, gaussians, max_points)).arrays


def describe(info: dict[str, Any]) -> str:
    """One line for the status bar: version, device, head model."""
    head = info.get("head") or {}
    device = info.get("device_name") or info.get("device", "?")
    return f"SpatialAvatar {info.get('server', '?')} on {device} ({info.get('rasterizer', '?')}), head {head.get('name', 'none')}"


class Session:
    """A long-lived client for timers: ``submit`` returns at once; ``pump`` hands finished replies to callbacks.

    ``on_unreachable`` hears the message of every request that got no reply after all its
    retries, whoever sent it, so one place learns that the backend is gone.
    """

    def __init__(self, settings: Settings, on_unreachable: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.client = open_client(settings)
        self.on_unreachable = on_unreachable
        self._callbacks: dict[str, Callable[[Reply], None]] = {}

    def submit(
        self,
        op: str,
        args: dict | None = None,
        arrays: dict | None = None,
        on_reply: Callable[[Reply], None] | None = None,
        timeout_s: float | None = None,
    ) -> str:
        """Send a request now; ``on_reply`` gets each of its replies from ``pump``. ``timeout_s``
        overrides the preferences' silence limit for slow requests (a large render on a CPU)."""
        rid = self.client.submit(op, args, arrays, timeout_s=timeout_s)
        if on_reply is not None:
            self._callbacks[rid] = on_reply
        return rid

    def pump(self) -> int:
        """Deliver what has arrived, never waiting; returns the number of replies handled."""
        replies = self.client.poll()
        for r in replies:
            if self.on_unreachable is not None and r.error is not None and r.error.code == wire_protocol.ErrorCode.UNREACHABLE:
                self.on_unreachable(r.error.message)
            cb = self._callbacks.get(r.id)
            if r.final:
                self._callbacks.pop(r.id, None)
            if cb is not None:
                cb(r)
        return len(replies)

    @property
    def busy(self) -> bool:
        return bool(self.client.pending)

    def close(self) -> None:
        self.client.close()
        self._callbacks.clear()
