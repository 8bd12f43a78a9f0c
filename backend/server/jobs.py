"""Long jobs: records that outlive the process, and the runner that steps them on the worker.

A job kind is a callable ``fn(args, progress, should_cancel) -> result`` (``JobFn``). It
calls ``progress(step, total, message, checkpoint=...)`` as it goes, and may poll
``should_cancel()`` between steps. Both calls are where the worker answers waiting render
and deform requests before the job goes on; ``progress`` also unwinds a cancelled job, or
one whose service is stopping, by raising ``JobCancelled``, so a kind that only reports
progress is cancellable too. ``checkpoint`` (JSON) is kept in the job record on
disk; a job that was queued or running when the service died is "interrupted", and
``resume`` runs it again with ``args.resume`` set to its last checkpoint.

A job's uploads are kept in the store under the id it makes (``params["out"]``, see
ops_jobs.py) for as long as a run of it may read them: they go when it ends any way but
resumable, when its record is deleted, and at start-up when no job can use them. Failure
messages name files relative to the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from backend.server.store import Store, check_id
from backend.wire.errors import SpatialAvatarError
from backend.wire.protocol import ErrorCode, WireError

log = logging.getLogger("spatialavatar.server")

PERSIST_INTERVAL_S = 1.0  # progress without a checkpoint is written at most this often


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # the service stopped or died while it was queued or running


ACTIVE = frozenset({JobState.QUEUED, JobState.RUNNING})


class Progress(Protocol):
    def __call__(self, step: int, total: int, message: str = "", checkpoint: dict | None = None) -> None: ...


ShouldCancel = Callable[[], bool]


@dataclass(frozen=True)
class JobArgs:
    """What a job callable gets: its id, the request's parameters, and its last checkpoint when resumed."""

    job_id: str
    params: dict[str, Any]
    resume: dict[str, Any] | None = None


JobFn = Callable[[JobArgs, Progress, ShouldCancel], dict[str, Any]]


@dataclass(frozen=True)
class JobKind:
    """A registered kind: its callable, and whether an interrupted run can be resumed."""

    fn: JobFn
    resumable: bool = True


class JobCancelled(Exception):
    """Raised from progress() to unwind a job that was cancelled or whose service is stopping.

    A kind that polls ``should_cancel`` itself raises it too; returning normally means done.
    """


@dataclass
class JobRecord:
    """One job as stored in STORE/jobs/<id>.json and reported by ``job``."""

    id: str
    kind: str
    params: dict[str, Any]
    request_id: str
    state: str = JobState.QUEUED
    step: int = 0
    total: int = 0
    message: str = ""
    checkpoint: dict[str, Any] | None = None
    result: dict[str, Any] = field(default_factory=dict)
    error: dict[str, str] | None = None
    resumable: bool = False
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Jobs:
    """The job table. The service thread submits, cancels and reads; the worker runs."""

    def __init__(self, store: Store, kinds: dict[str, JobKind]) -> None:
        self._store = store
        self.kinds = kinds
        self._lock = threading.Lock()
        self._records: dict[str, JobRecord] = {}
        self._cancel: set[str] = set()
        for raw in store.job_records():
            try:
                rec = JobRecord(**raw)
            except TypeError:
                log.error("jobs: skipping a job record with unknown fields (%s)", raw.get("id"))
                continue
            if rec.state in ACTIVE:
                rec.message = f"the service stopped while this job was {rec.state}"
                rec.state = JobState.INTERRUPTED
                rec.resumable = rec.kind in kinds and kinds[rec.kind].resumable
                store.put_job(rec.to_json())
            self._records[rec.id] = rec
        store.prune_inputs({rec.params["out"] for rec in self._records.values() if rec.resumable and "out" in rec.params})

    # -- the service thread ----------------------------------------------------------------

    def submit(self, kind: str, params: dict[str, Any], request_id: str, result: dict[str, Any] | None = None) -> dict[str, Any]:
        """Queue a job; the same request id (a client's retry) returns the job already made.

        ``result`` holds what is known up front, such as the id the new avatar will have.
        """
        with self._lock:
            for rec in self._records.values():
                if rec.request_id == request_id:
                    return rec.to_json()
            rec = JobRecord(self._store.new_id("jb"), kind, params, request_id, result=dict(result or {}))
            self._store.put_job(rec.to_json())
            self._records[rec.id] = rec
            return rec.to_json()

    def by_request(self, request_id: str) -> dict[str, Any] | None:
        """The job a request id already made, if any (a retried submission)."""
        with self._lock:
            return next((r.to_json() for r in self._records.values() if r.request_id == request_id), None)

    def _get(self, jid: str) -> JobRecord:
        rec = self._records.get(check_id(jid, "jb", "job"))
        if rec is None:
            raise WireError(ErrorCode.NOT_FOUND, f"no job {jid}")
        return rec

    def get(self, jid: str) -> dict[str, Any]:
        with self._lock:
            return self._get(jid).to_json()

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.to_json() for r in sorted(self._records.values(), key=lambda r: r.created)]

    def cancel(self, jid: str) -> dict[str, Any]:
        with self._lock:
            rec = self._get(jid)
            if rec.state == JobState.QUEUED:
                self._finish(rec, JobState.CANCELLED, "cancelled before it started")
            elif rec.state == JobState.RUNNING:
                self._cancel.add(jid)
            else:
                raise WireError(ErrorCode.CONFLICT, f"job {jid} is {rec.state}; only queued or running jobs can be cancelled")
            return rec.to_json()

    def resume(self, jid: str) -> dict[str, Any]:
        with self._lock:
            rec = self._get(jid)
            if rec.state != JobState.INTERRUPTED or not rec.resumable:
                raise WireError(ErrorCode.CONFLICT, f"job {jid} is {rec.state}; only interrupted, resumable jobs can be resumed")
            rec.state, rec.message, rec.resumable = JobState.QUEUED, "resumed", False
            self._touch(rec, persist=True)
            return rec.to_json()

    def forget(self, jid: str) -> None:
        """Delete a finished job's record."""
        with self._lock:
            rec = self._get(jid)
            if rec.state in ACTIVE:
                raise WireError(ErrorCode.CONFLICT, f"job {jid} is {rec.state}; cancel it before deleting it")
            self._drop_inputs(rec)
            self._store.delete_job(jid)
            del self._records[jid]

    def uses(self, thing_id: str) -> str | None:
        """The id of an active job whose parameters or result name ``thing_id``, if any."""
        with self._lock:
            for rec in self._records.values():
                if rec.state in ACTIVE and thing_id in (*rec.params.values(), *rec.result.values()):
                    return rec.id
        return None

    # -- the worker ------------------------------------------------------------------------

    def _touch(self, rec: JobRecord, persist: bool) -> None:
        now = time.time()
        if persist or now - rec.updated >= PERSIST_INTERVAL_S:
            rec.updated = now
            self._store.put_job(rec.to_json())

    def _finish(self, rec: JobRecord, state: JobState, message: str, error: dict[str, str] | None = None) -> None:
        rec.state, rec.message, rec.error = state, message, error
        rec.resumable = state == JobState.INTERRUPTED and self.kinds[rec.kind].resumable
        self._cancel.discard(rec.id)
        self._touch(rec, persist=True)
        if not rec.resumable:
            self._drop_inputs(rec)

    def _drop_inputs(self, rec: JobRecord) -> None:
        if rec.params.get("out"):
            self._store.delete_inputs(rec.params["out"])

    def take_next(self) -> JobRecord | None:
        """The oldest queued job, now marked running."""
        with self._lock:
            queued = [r for r in self._records.values() if r.state == JobState.QUEUED]
            if not queued:
                return None
            rec = min(queued, key=lambda r: r.created)
            rec.state, rec.message = JobState.RUNNING, "started"
            self._touch(rec, persist=True)
            return rec

    def run(self, rec: JobRecord, between_steps: Callable[[], None], stopping: Callable[[], bool]) -> None:
        """Run ``rec`` to its end on this thread; ``between_steps`` runs at every progress call."""

        def should_cancel() -> bool:
            between_steps()
            return rec.id in self._cancel or stopping()

        def progress(step: int, total: int, message: str = "", checkpoint: dict | None = None) -> None:
            with self._lock:
                rec.step, rec.total, rec.message = int(step), int(total), message
                if checkpoint is not None:
                    rec.checkpoint = checkpoint
                self._touch(rec, persist=checkpoint is not None)
            between_steps()
            if should_cancel():
                raise JobCancelled

        args = JobArgs(rec.id, dict(rec.params), rec.checkpoint)
        try:
            result = self.kinds[rec.kind].fn(args, progress, should_cancel)
        except JobCancelled:
            with self._lock:
                if rec.id in self._cancel:
                    self._finish(rec, JobState.CANCELLED, "cancelled")
                else:
                    self._finish(rec, JobState.INTERRUPTED, "the service stopped during this job")
            return
        except Exception as exc:
            code, message = self._failure(rec, exc)
            with self._lock:
                self._finish(rec, JobState.FAILED, message, {"code": code, "message": message})
            return
        with self._lock:
            rec.result.update(result)
            self._finish(rec, JobState.DONE, "done")

    def _failure(self, rec: JobRecord, exc: Exception) -> tuple[str, str]:
        """The error code and message a job that raised ``exc`` fails with."""
        if isinstance(exc, WireError):
            code, message = exc.code, str(exc)
        elif isinstance(exc, SpatialAvatarError):
            code, message = ErrorCode.INVALID_ARGUMENT, str(exc)
        else:  # a bug: the job fails, the service keeps serving
            log.error("job %s (%s) failed", rec.id, rec.kind, exc_info=exc)
            code, message = ErrorCode.INTERNAL, f"{rec.kind} failed: {type(exc).__name__}: {exc}"
        return code, self._store.relative(message)
