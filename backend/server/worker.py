"""The one thread that uses the device: waiting device requests first, then the job's next step.

A running job calls back after every step (jobs.Progress); the worker answers the render,
deform and export requests that are waiting at that moment, then lets the job go on. So
interactive requests wait at most one job step, and a steady stream of them cannot stop
the job from advancing.

Streams are credit-based: a stream runs at most ``window`` replies ahead of the last one
its client acknowledged (``ack``), then is parked, so the device works for nobody only that
far. A parked stream resumes when credit comes and is dropped, with a final ``busy`` reply,
when none comes for ``stall_s``: ZeroMQ's own queues cannot show a client that stopped
reading, since its I/O thread keeps draining the socket into the client's memory.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from backend.server.jobs import Jobs
from backend.server.ops import Part, encode_parts
from backend.wire.protocol import Buffer, ErrorCode, Limits, Request, encode_error
from backend.wire.shared_frames import SlotPool

log = logging.getLogger("spatialavatar.server")

IDLE_POLL_S = 0.5  # how often an idle worker looks for queued jobs without being woken


@dataclass
class Task:
    """A checked device request: where its replies go, and the lazy parts that do the work.

    ``sent`` replies have gone out; the client acknowledged those before ``acked``; a
    parked stream waits for credit since ``parked_at`` (monotonic seconds)."""

    envelope: list[bytes]
    request: Request
    parts: Iterator[Part]
    abandoned: threading.Event = field(default_factory=threading.Event)  # set when its client is gone
    replies: Iterator[list[Buffer]] | None = None
    sent: int = 0
    acked: int = 0
    parked_at: float | None = None

    @property
    def key(self) -> tuple[bytes, str]:
        """(the client's routing id, request id): what an ``ack`` names."""
        return (bytes(self.envelope[0]) if self.envelope else b"", self.request.id)


Emit = Callable[[Task, list[Buffer]], None]


class Worker:
    def __init__(
        self, jobs: Jobs, emit: Emit, limits: Limits, max_pending: int, slots: SlotPool | None = None, window: int = 16, stall_s: float = 1.0
    ) -> None:
        self._jobs = jobs
        self._emit = emit
        self._limits = limits
        self._slots = slots  # only this thread writes into them
        self._max_pending = max_pending
        self._window = window
        self._stall_s = stall_s
        # SimpleQueue: no Python-level condition to pass through, so a waiting worker wakes sooner.
        self._tasks: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._credits: queue.SimpleQueue[tuple[tuple[bytes, str], int]] = queue.SimpleQueue()
        self._streams: dict[tuple[bytes, str], Task] = {}  # started and not finished; credit goes here
        self._parked: dict[tuple[bytes, str], Task] = {}  # those waiting for credit
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spatialavatar-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, task: Task) -> bool:
        """Queue a device request; False when too many are waiting."""
        if self._tasks.qsize() >= self._max_pending:
            return False
        self._tasks.put(task)
        return True

    def credit(self, envelope: list[bytes], request_id: str, seq: int) -> None:
        """The client read reply ``seq`` of ``request_id`` (called on the service thread)."""
        self._credits.put(((bytes(envelope[0]) if envelope else b"", request_id), seq))
        # Only an idle worker needs waking (a busy one tends its streams between requests and
        # job steps); a wake-up per ack would fill the queue that max_pending counts.
        if self._tasks.empty():
            self.wake()

    def wake(self) -> None:
        """Look for queued jobs now."""
        self._tasks.put(None)

    def stop(self, timeout_s: float) -> None:
        """Interrupt the running job at its next step, refuse what is waiting, and join."""
        self._stopping.set()
        self.wake()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("worker: the running step did not end within %.0f s", timeout_s)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tend_parked()
                job = self._jobs.take_next()
                if job is not None:
                    self._jobs.run(job, self._serve_waiting, self._stopping.is_set)
                    continue
                try:
                    task = self._tasks.get(timeout=min(IDLE_POLL_S, self._stall_s / 2) if self._parked else IDLE_POLL_S)
                except queue.Empty:
                    continue
                if task is not None:
                    self._serve(task)
            except Exception:  # the worker must outlive any bug
                log.exception("worker: unexpected error")
        self._refuse_waiting()

    def _serve_waiting(self) -> None:
        """Answer the device requests waiting now; later arrivals wait for the next step."""
        self._tend_parked()
        for _ in range(self._tasks.qsize()):
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                return
            if task is not None:
                self._serve(task)

    def _serve(self, task: Task) -> None:
        """Send replies until the stream ends, its client is gone or its credit runs out (parked)."""
        if task.replies is None:
            task.replies = encode_parts(task.request, task.parts, self._limits, self._slots)
            self._streams[task.key] = task
        for frames in task.replies:
            if task.abandoned.is_set():
                break
            self._emit(task, frames)
            task.sent += 1
            if task.sent - task.acked >= self._window and not _is_final(frames):
                task.parked_at = time.monotonic()
                self._parked[task.key] = task
                return
        self._finish(task)

    def _finish(self, task: Task) -> None:
        self._streams.pop(task.key, None)
        self._parked.pop(task.key, None)
        if task.replies is not None:
            task.replies.close()

    def _tend_parked(self) -> None:
        """Apply the credit that came, resume streams that have some, drop those stalled too long."""
        while True:
            try:
                key, seq = self._credits.get_nowait()
            except queue.Empty:
                break
            task = self._streams.get(key)
            if task is not None:
                task.acked = max(task.acked, seq + 1)
        now = time.monotonic()
        for key, task in list(self._parked.items()):
            if task.abandoned.is_set():
                self._finish(task)
            elif task.sent - task.acked < self._window:
                del self._parked[key]
                task.parked_at = None
                self._serve(task)
            elif task.parked_at is not None and now - task.parked_at > self._stall_s:
                self._finish(task)
                req = task.request
                log.warning("%s: a client read none of its last %d replies for %.1f s; its stream is dropped", req.op, self._window, self._stall_s)
                message = f"{req.op}: stream dropped: none of the last {self._window} replies was acknowledged within {self._stall_s:g} s"
                self._emit(task, encode_error(req.id, req.op, ErrorCode.BUSY, message, task.sent))

    def _refuse_waiting(self) -> None:
        for task in list(self._streams.values()):
            self._finish(task)
            if not task.abandoned.is_set():
                req = task.request
                self._emit(task, encode_error(req.id, req.op, ErrorCode.SHUTTING_DOWN, f"{req.op}: the service is stopping", task.sent))
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                return
            if task is not None:
                req = task.request
                self._emit(task, encode_error(req.id, req.op, ErrorCode.SHUTTING_DOWN, f"{req.op}: the service is stopping"))


def _is_final(frames: list[Buffer]) -> bool:
    return bool(json.loads(bytes(frames[0]))["final"])
