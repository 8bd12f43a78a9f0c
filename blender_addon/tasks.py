"""Background work on the service, followed without ever waiting (no bpy here).

A ``Task`` is a chain of steps. A *job* step submits an operation that queues a service job
(``generate``, ``track``, ``refine``) and follows it through ``watch``; a plain step sends
one request (e.g. ``deform`` to fetch the new avatar's points). Each step builds its request
from the results of the steps before it, so "track a video, then refine on that subject"
is two job steps. Everything goes through ``connection.Session.submit``/``pump``: the
add-on's timer pumps, and a test can pump the same way.

A job outlives the connection: when the backend stops answering, the task is ``LOST``
and ``follow_again`` watches its job anew once the backend is back. A job the service
marked interrupted and resumable (it stopped or died meanwhile) ends the task as
``INTERRUPTED``; ``resume`` queues that job again and follows it like a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import connection

ops = connection.wire_operations

# Terminal states, and the job states the service reports (docs/protocol.md, "Job record").
DONE, FAILED, CANCELLED, INTERRUPTED = "done", "failed", "cancelled", "interrupted"
ENDED = (DONE, FAILED, CANCELLED, INTERRUPTED)
LOST = "lost"  # not ended: the job may still run on a backend that stopped answering


@dataclass(frozen=True)
class Request:
    """One request to the service: operation, JSON arguments, named arrays."""

    op: str
    args: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """``build`` makes the request from the results so far.

    ``job``: the reply holds a job record to follow; its final ``result`` joins the results.
    ``keep``: for a plain step, the results key its reply's ``result`` is kept under.
    """

    build: Callable[[dict[str, Any]], Request]
    job: bool = True
    keep: str | None = None


# Called once the last step succeeded, with the merged job results and that step's reply;
# returns the line the panel shows. Exceptions of the kinds in ``FINISH_ERRORS`` fail the task.
Finish = Callable[[dict[str, Any], connection.Reply], str]
FINISH_ERRORS = (ValueError, KeyError, RuntimeError)


@dataclass
class Progress:
    """What the panel shows of a task."""

    state: str = "submitting"  # submitting, queued, running, fetching, LOST, or one of ENDED
    step: int = 0
    total: int = 0
    message: str = ""

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total > 0 else 0.0


class Task:
    """A chain of steps on one ``connection.Session``; call ``start`` once, then pump the session."""

    def __init__(self, label: str, steps: list[Step], finish: Finish) -> None:
        self.label = label
        self.steps = steps
        self.finish = finish
        self.progress = Progress()
        self.results: dict[str, Any] = {}
        self.job_id: str | None = None
        self._index = 0
        self._cancel_requested = False
        self._session: connection.Session | None = None

    @property
    def ended(self) -> bool:
        return self.progress.state in ENDED

    def start(self, session: connection.Session) -> None:
        self._session = session
        self._send()

    def follow_again(self, session: connection.Session) -> None:
        """The backend answers again: watch the lost job anew (its first reply says how it
        stands: still running, ended meanwhile, or interrupted by a restart)."""
        if self.progress.state != LOST:
            return
        self._session = session
        self._about_job(ops.Watch, self._on_watch)

    def resume(self, session: connection.Session) -> None:
        """Queue the interrupted job again and follow it as when it was submitted."""
        if self.progress.state != INTERRUPTED:
            return
        self._session = session
        self._cancel_requested = False
        self.progress = Progress(message=f"resuming job {self.job_id}")
        self._about_job(ops.Resume, self._on_first_reply)

    def cancel(self) -> None:
        """Ask the service to cancel the running job; the final ``watch`` reply ends the task."""
        if self.ended or self._cancel_requested:
            return
        self._cancel_requested = True
        if self.job_id is not None:
            self._about_job(ops.Cancel, self._on_cancel_reply)
        elif not self.steps[self._index].job:
            self._end(CANCELLED, f"{self.label} cancelled")  # a plain request: its late reply is ignored
        else:
            self.progress.message = "cancelling once the service has queued the job"

    # -- the chain ---------------------------------------------------------------------------

    def _submit(self, request: Request, on_reply: Callable[[connection.Reply], None]) -> None:
        assert self._session is not None
        try:
            self._session.submit(request.op, request.args, request.arrays, on_reply=on_reply)
        except connection.UserError as e:  # e.g. a message over the size limit
            self._end(FAILED, f"{self.label} failed: {e}")

    def _about_job(self, operation: type[ops.Watch | ops.Cancel | ops.Resume], on_reply: Callable[[connection.Reply], None]) -> None:
        """Send ``operation`` (watch, cancel or resume) for the task's job."""
        self._submit(Request(operation.op, operation.args(job=self.job_id)), on_reply)

    def _send(self) -> None:
        step = self.steps[self._index]
        try:
            request = step.build(self.results)
        except FINISH_ERRORS as e:
            self._end(FAILED, f"{self.label} failed: {e}")
            return
        self.job_id = None
        self.progress.state = "submitting" if step.job else "fetching"
        self._submit(request, self._on_first_reply)

    def _on_first_reply(self, reply: connection.Reply) -> None:
        if self.ended:
            return
        if reply.error is not None:
            self._end(FAILED, f"{self.label} failed: {reply.error.message}")
            return
        if not self.steps[self._index].job:
            self._next(reply)
            return
        record = reply.result["job"]
        self.job_id = record["id"]
        self._show(record)
        if self._cancel_requested:
            self._about_job(ops.Cancel, self._on_cancel_reply)
        self._about_job(ops.Watch, self._on_watch)

    def _on_watch(self, reply: connection.Reply) -> None:
        if self.ended:
            return
        if reply.error is not None and reply.error.code == connection.wire_protocol.ErrorCode.UNREACHABLE:
            self._end(LOST, f"{self.label}: lost the backend while following job {self.job_id} ({reply.error.message})")
            return
        if reply.error is not None:  # e.g. a backend at this address that does not know the job
            self._end(FAILED, f"{self.label} failed: {reply.error.message}")
            return
        record = reply.result["job"]
        self._show(record)
        if not reply.final:
            return
        state = record["state"]
        if state == DONE:
            self.results.update(record.get("result") or {})
            self._next(reply)
        elif state == CANCELLED:
            self._end(CANCELLED, f"{self.label} cancelled")
        elif state == FAILED:
            self._end(FAILED, f"{self.label} failed: {(record.get('error') or {}).get('message', record.get('message', ''))}")
        elif state == INTERRUPTED and record.get("resumable"):
            self._end(INTERRUPTED, f"{self.label}: job {self.job_id} was interrupted ({record.get('message', '')}); resume it")
        else:
            self._end(FAILED, f"{self.label}: job {self.job_id} was {state} ({record.get('message', '')})")

    def _on_cancel_reply(self, reply: connection.Reply) -> None:
        # A conflict means the job ended first; the watch stream says how, so only
        # an unreachable backend is worth a word here.
        if reply.error is not None and reply.error.code == connection.wire_protocol.ErrorCode.UNREACHABLE and not self.ended:
            self._end(FAILED, f"{self.label}: could not cancel ({reply.error.message})")

    def _next(self, reply: connection.Reply) -> None:
        keep = self.steps[self._index].keep
        if keep:
            self.results[keep] = reply.result
        self._index += 1
        if self._index < len(self.steps):
            if self._cancel_requested:
                self._end(CANCELLED, f"{self.label} cancelled")
            else:
                self._send()
            return
        try:
            message = self.finish(self.results, reply)
        except FINISH_ERRORS as e:
            self._end(FAILED, f"{self.label} failed: {e}")
            return
        self._end(DONE, message)

    def _show(self, record: dict[str, Any]) -> None:
        self.progress.state = record.get("state", self.progress.state)
        self.progress.step = int(record.get("step") or 0)
        self.progress.total = int(record.get("total") or 0)
        self.progress.message = record.get("message") or ""

    def _end(self, state: str, message: str) -> None:
        self.progress.state = state
        self.progress.message = message
