"""The client library of the service (pure Python + pyzmq + numpy: no torch, no bpy).

Two ways to use one ``Client``:

- blocking, for scripts, the CLI and background renders: ``call(op, ...)`` returns the
  final reply, ``stream(op, ...)`` yields every reply of a stream in order;
- non-blocking, for Blender timers: ``submit(op, ...)`` returns a request id at once, and
  ``poll()`` returns whatever replies have arrived, never waiting.

Both follow the Lazy Pirate pattern: a request that hears nothing for ``timeout_s`` is sent
again on a fresh socket, at most ``retries`` times; after that it ends with an error reply
of code ``unreachable`` (``poll``) or a ``ServiceUnavailable`` (blocking calls). Retries are
safe: the service answers a repeated request id of a non-idempotent operation with its
first reply, and a repeated stream starts again from the beginning, where the replies
already seen are skipped here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from .environment import DEFAULT_ENDPOINT
from .protocol import ACK, Buffer, ErrorCode, ErrorInfo, Limits, Reply, WireError, decode_reply, encode_request, salvage_id
from .security import ClientKeys, secure_client
from .shared_frames import SlotReader


class ServiceUnavailable(WireError):
    """No reply after every retry: the service is down, unreachable, or refused the connection."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNREACHABLE, message)


@dataclass
class _Pending:
    op: str
    frames: list[Buffer]
    timeout_s: float
    deadline: float
    attempts: int = 1
    next_seq: int = 0


def can_share(hello: Mapping[str, Any]) -> bool:
    """True when a service's hello offers shared memory in a folder that this machine has and
    this user may open: then its render requests may ask for ``shared_memory`` (not through a
    tunnel to another host, nor to a service run by another user)."""
    folder = hello.get("shared_memory")
    return isinstance(folder, str) and os.path.isdir(folder) and os.access(folder, os.R_OK | os.W_OK | os.X_OK)


class Client:
    """A connection to the service that survives service restarts; use it from one thread.

    Args:
        endpoint: the service's ZeroMQ endpoint.
        timeout_s: silence after which a request is sent again (per reply, for streams).
        retries: sends after the first before a request counts as unreachable.
        keys: CurveZMQ keys when the service runs with ``--keys``.
        limits: size limits for messages both ways.
        check_finite: scan the service's float buffers for NaN/Inf too (off: the service
            checks what it is sent and renders only validated avatars; the scan costs a
            pass over every frame).
        context: a ZeroMQ context to share; default the process-wide one.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timeout_s: float = 15.0,
        retries: int = 2,
        keys: ClientKeys | None = None,
        limits: Limits = Limits(),
        check_finite: bool = False,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.check_finite = check_finite
        self.timeout_s = timeout_s
        self.retries = retries
        self.limits = limits
        self._keys = keys
        self._zmq = context or zmq.Context.instance()
        self._pending: dict[str, _Pending] = {}
        self._ready: list[Reply] = []
        self._socket: zmq.Socket | None = None
        self._shared = SlotReader()
        self._connect()

    def _connect(self) -> None:
        sock = self._zmq.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        if self._keys is not None:
            secure_client(sock, self._keys)
        sock.connect(self.endpoint)
        self._socket = sock

    def _reset(self) -> None:
        """A fresh socket (and identity): the old one may be stuck on a dead service."""
        if self._socket is not None:
            self._socket.close(linger=0)
        self._connect()

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        self._pending.clear()
        self._shared.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- non-blocking ----------------------------------------------------------------------

    def submit(
        self,
        op: str,
        args: Mapping[str, Any] | None = None,
        arrays: Mapping[str, np.ndarray] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> str:
        """Send a request and return its id without waiting."""
        if self._socket is None:
            raise WireError(ErrorCode.UNREACHABLE, "this client is closed")
        rid, frames = encode_request(op, args, arrays, limits=self.limits)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        self._pending[rid] = _Pending(op, frames, timeout, time.monotonic() + timeout)
        self._socket.send_multipart(frames, copy=False)
        return rid

    def poll(self, wait_ms: int = 0) -> list[Reply]:
        """Replies that have arrived, oldest first, waiting up to ``wait_ms`` for the first
        (0: not at all, for timers); retries are handled here."""
        self._pump(wait_ms)
        ready, self._ready = self._ready, []
        return ready

    def forget(self, request_id: str) -> None:
        """Stop caring about a request; its replies, if any still come, are dropped."""
        self._pending.pop(request_id, None)

    @property
    def pending(self) -> list[str]:
        """Ids of requests still waiting for their final reply."""
        return list(self._pending)

    # -- blocking --------------------------------------------------------------------------

    def stream(
        self,
        op: str,
        args: Mapping[str, Any] | None = None,
        arrays: Mapping[str, np.ndarray] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Iterator[Reply]:
        """Every reply of one request, in order; raises WireError on an error reply and
        ServiceUnavailable when the service stays silent. Leaving early stops the stream."""
        rid = self.submit(op, args, arrays, timeout_s=timeout_s)
        finished = False
        try:
            while True:
                for reply in self._take(rid):
                    if reply.error is not None and reply.error.code == ErrorCode.UNREACHABLE:
                        raise ServiceUnavailable(reply.error.message)
                    yield reply.raise_for_error()
                    if reply.final:
                        finished = True
                        return
        finally:
            if not finished and rid in self._pending:
                # A fresh socket tells the service this stream has no reader any more.
                self.forget(rid)
                self._reset()
                self._resend_all()

    def call(
        self,
        op: str,
        args: Mapping[str, Any] | None = None,
        arrays: Mapping[str, np.ndarray] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Reply:
        """The final reply of a request (the last one of a stream)."""
        for reply in self.stream(op, args, arrays, timeout_s=timeout_s):
            if reply.final:
                return reply
        raise ServiceUnavailable(f"{op}: the reply stream ended without a final reply")

    # -- the machinery ---------------------------------------------------------------------

    def _take(self, rid: str) -> list[Reply]:
        """Replies of ``rid``, waiting until at least one is there (retries included)."""
        while True:
            mine = [r for r in self._ready if r.id == rid]
            if mine:
                self._ready = [r for r in self._ready if r.id != rid]
                return mine
            pending = self._pending.get(rid)
            if pending is None:
                raise WireError(ErrorCode.UNREACHABLE, f"request {rid} was forgotten before its final reply")
            self._pump(int(min(max(0.0, pending.deadline - time.monotonic()), 0.5) * 1000) + 1)

    def _pump(self, wait_ms: int) -> None:
        """Receive what has arrived (waiting up to ``wait_ms`` for the first), then retry or fail expired requests."""
        assert self._socket is not None
        if self._socket.poll(wait_ms, zmq.POLLIN):
            while True:
                try:
                    frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._file(frames)
        self._expire()

    def _file(self, frames: list[zmq.Frame]) -> None:
        try:
            reply = decode_reply(frames, self.limits, self.check_finite, self._shared)
        except WireError as exc:
            # A broken reply to a request of ours fails that request; anything else is dropped.
            rid, _ = salvage_id(frames, self.limits)
            failed = self._pending.pop(rid, None)
            if failed is not None:
                self._ready.append(Reply(rid, failed.op, "error", failed.next_seq, True, error=ErrorInfo(exc.code, f"{failed.op}: bad reply: {exc}")))
            return
        pending = self._pending.get(reply.id)
        if pending is None or reply.seq < pending.next_seq:
            return  # a reply to a forgotten request, or one seen before a retry
        pending.next_seq = reply.seq + 1
        pending.deadline = time.monotonic() + pending.timeout_s
        if reply.final:
            del self._pending[reply.id]
        else:
            self._acknowledge(reply)
        self._ready.append(reply)

    def _acknowledge(self, reply: Reply) -> None:
        """Tell the service a stream's reply arrived: it runs a stream only a window of
        replies ahead of the last acknowledged one (its credit; no reply comes to this)."""
        assert self._socket is not None
        _, frames = encode_request(ACK, {"request": reply.id, "seq": reply.seq}, limits=self.limits)
        self._socket.send_multipart(frames, copy=False)

    def _expire(self) -> None:
        now = time.monotonic()
        expired = [rid for rid, p in self._pending.items() if p.deadline <= now]
        if not expired:
            return
        for rid in expired:
            p = self._pending[rid]
            if p.attempts > self.retries:
                del self._pending[rid]
                message = f"{p.op}: no reply from {self.endpoint} after {p.attempts} attempts of {p.timeout_s:g} s"
                self._ready.append(Reply(rid, p.op, "error", p.next_seq, True, error=ErrorInfo(ErrorCode.UNREACHABLE, message)))
            else:
                p.attempts += 1
        self._reset()
        self._resend_all()

    def _resend_all(self) -> None:
        """Send every pending request again on the current socket; streams restart from seq 0."""
        assert self._socket is not None
        now = time.monotonic()
        for p in self._pending.values():
            p.deadline = now + p.timeout_s
            self._socket.send_multipart(p.frames, copy=False)
