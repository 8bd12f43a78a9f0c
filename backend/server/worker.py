"""The one thread that uses the device: waiting device requests first, then the job's next step.

A running job calls back after every step (jobs.Progress); the worker answers the render,
deform and export requests that are waiting at that moment, then lets the job go on. So
interactive requests wait at most one job step, and a steady stream of them cannot stop
the job from advancing.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from backend.server.jobs import Jobs
from backend.server.ops import Part, encode_parts
from backend.server.protocol import Buffer, ErrorCode, Limits, Request, encode_error
from backend.server.shared_frames import SlotPool

log = logging.getLogger("spatialavatar.server")

IDLE_POLL_S = 0.5  # how often an idle worker looks for queued jobs without being woken


@dataclass
class Task:
    """A checked device request: where its replies go, and the lazy parts that do the work."""

    envelope: list[bytes]
    request: Request
    parts: Iterator[Part]
    abandoned: threading.Event = field(default_factory=threading.Event)  # set when its client is gone


Emit = Callable[[Task, list[Buffer]], None]


class Worker:
    def __init__(self, jobs: Jobs, emit: Emit, limits: Limits, max_pending: int, slots: SlotPool | None = None) -> None:
        self._jobs = jobs
        self._emit = emit
        self._limits = limits
        self._slots = slots  # only this thread writes into them
        self._max_pending = max_pending
        self._tasks: queue.Queue[Task | None] = queue.Queue()
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
                job = self._jobs.take_next()
                if job is not None:
                    self._jobs.run(job, self._serve_waiting, self._stopping.is_set)
                    continue
                try:
                    task = self._tasks.get(timeout=IDLE_POLL_S)
                except queue.Empty:
                    continue
                if task is not None:
                    self._serve(task)
            except Exception:  # the worker must outlive any bug
                log.exception("worker: unexpected error")
        self._refuse_waiting()

    def _serve_waiting(self) -> None:
        """Answer the device requests waiting now; later arrivals wait for the next step."""
        for _ in range(self._tasks.qsize()):
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                return
            if task is not None:
                self._serve(task)

    def _serve(self, task: Task) -> None:
        replies = encode_parts(task.request, task.parts, self._limits, self._slots)
        try:
            for frames in replies:
                if task.abandoned.is_set():
                    break
                self._emit(task, frames)
        finally:
            replies.close()

    def _refuse_waiting(self) -> None:
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                return
            if task is not None:
                req = task.request
                self._emit(task, encode_error(req.id, req.op, ErrorCode.SHUTTING_DOWN, f"{req.op}: the service is stopping"))
