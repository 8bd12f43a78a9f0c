"""The service: one ROUTER socket, the operation table, job watchers, and the worker behind them.

The service thread reads the socket. It decodes and checks every request, answers store and
job operations itself, and hands device operations (render, deform, export) to the worker,
which sends their replies itself: a reply handed back to the service thread would wait for
two more thread wake-ups. The two threads share the socket under one lock, and the service
thread waits on the socket's own signal (edge-triggered: any use of the socket may consume
it), so the worker tells it when a send of its own has found requests waiting. A client that
disappears or stops reading loses its stream; the service goes on with everyone else.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from backend import __version__
from backend.generate.checkpoint import DEFAULT_CHECKPOINT
from backend.server.args import Args
from backend.server.config import ServiceConfig
from backend.server.engine import Engine, resolve_device
from backend.server.job_kinds import job_kinds
from backend.server.jobs import ACTIVE, Jobs
from backend.server.ops import (
    Op,
    OpContext,
    encode_parts,
    error_frames,
    op_cancel,
    op_delete,
    op_get,
    op_hello,
    op_import,
    op_list,
    op_resume,
    op_shutdown,
    start,
)
from backend.server.ops_jobs import op_generate, op_initialize, op_refine, op_synthesize, op_track
from backend.server.ops_pose import op_deform, op_export, op_render
from backend.server.store import Store, check_id
from backend.server.worker import Task, Worker
from backend.wire import operations as ops
from backend.wire.errors import SpatialAvatarError
from backend.wire.protocol import (
    ACK,
    DTYPES,
    PROTOCOL_VERSION,
    UNKNOWN_ID,
    UNKNOWN_OP,
    Buffer,
    ErrorCode,
    Request,
    WireError,
    decode_request,
    encode_error,
    encode_reply,
    salvage_id,
)
from backend.wire.security import ServerKeys, check_bind, secure_server
from backend.wire.shared_frames import SlotPool

log = logging.getLogger("spatialavatar.server")

OPS: dict[str, Op] = {
    ops.Hello.op: Op(op_hello),
    ops.List.op: Op(op_list),
    ops.Get.op: Op(op_get),
    ops.Delete.op: Op(op_delete, replay=True),
    ops.Import.op: Op(op_import, device=True, replay=True),
    ops.Export.op: Op(op_export, device=True),
    ops.Deform.op: Op(op_deform, device=True),
    ops.Render.op: Op(op_render, device=True),
    # Job submissions are idempotent already: the job table knows their request ids.
    ops.Synthesize.op: Op(op_synthesize, queues_job=True),
    ops.Initialize.op: Op(op_initialize, queues_job=True),
    ops.Refine.op: Op(op_refine, queues_job=True),
    ops.Track.op: Op(op_track, queues_job=True),
    ops.Generate.op: Op(op_generate, queues_job=True),
    ops.Cancel.op: Op(op_cancel, replay=True),
    ops.Resume.op: Op(op_resume, replay=True, queues_job=True),
    ops.Shutdown.op: Op(op_shutdown),
}
WATCH = ops.Watch.op  # a stream of job events, kept by the service thread itself
POLL_MS = 100
MIN_EVENT_INTERVAL_S = 0.1  # progress events per watcher at most this often (state changes always go)
READS_PER_TURN = 64  # requests read before the job watchers get their turn
STOP_TIMEOUT_S = 60.0


@dataclass
class _Watcher:
    envelope: list[bytes]
    request_id: str
    job: str
    seq: int = 0
    last: tuple = ()
    sent: float = 0.0


class Service:
    """Construct (binds and loads the head model), then ``serve_forever()``; ``request_stop()`` from any thread."""

    def __init__(self, config: ServiceConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        keys = ServerKeys.load(config.keys) if config.keys else None
        check_bind(config.bind, keys)
        device = resolve_device(config.device)
        self.store = Store(config.store)
        self._zmq = context or zmq.Context()
        self._own_zmq = context is None
        self._auth = None
        self._stop = threading.Event()
        # The socket is used by the service thread and the worker; so is the replay memory.
        self._lock = threading.Lock()
        self._wake_endpoint = f"inproc://spatialavatar-wake-{id(self)}"
        self._thread_sockets = threading.local()
        self._pushes: list[zmq.Socket] = []
        self._watchers: dict[tuple[bytes, str], _Watcher] = {}
        self._replay: OrderedDict[str, list[Buffer]] = OrderedDict()
        self._checked: list[Task] = []  # device requests of this turn, for the worker
        self.requests = 0
        # Encrypted binds serve other machines, which cannot map this one's memory.
        self.slots = SlotPool(config.shared_slots) if config.shared_slots > 0 and keys is None else None
        try:
            self.engine = Engine(config.flame, device, self.store, compile_player=config.compile_player)
            self.jobs = Jobs(self.store, job_kinds(self.engine, self.store, config.generator))
            self.ctx = OpContext(config, self.store, self.jobs, self.engine, self._hello(keys is not None), self.request_stop, self.slots)
            self.worker = Worker(self.jobs, self._reply, config.limits, config.max_pending, self.slots, config.stream_window, config.send_timeout_s)
            self.socket = self._zmq.socket(zmq.ROUTER)
            self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished client raises instead of being silently fed
            self.socket.setsockopt(zmq.MAXMSGSIZE, config.limits.max_message_bytes)
            self.socket.setsockopt(zmq.SNDHWM, config.send_hwm)
            self.socket.setsockopt(zmq.SNDTIMEO, int(config.send_timeout_s * 1000))
            self.socket.setsockopt(zmq.LINGER, 0)
            if keys is not None:
                self._auth = secure_server(self.socket, keys, self._zmq)
            self.socket.bind(config.bind)
            self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
            self._wake = self._zmq.socket(zmq.PULL)
            self._wake.bind(self._wake_endpoint)
        except BaseException:
            self._close_sockets()
            self.store.close()
            if self.slots is not None:
                self.slots.close()
            raise

    # -- description -----------------------------------------------------------------------

    def _hello(self, secure: bool) -> dict[str, Any]:
        head = self.engine.head
        capabilities = {op: {"available": True} for op in (*OPS, WATCH, ACK)}
        if importlib.util.find_spec("mediapipe") is None:
            capabilities["track"] = {"available": False, "reason": "tracking needs mediapipe, which is not installed with this service"}
        capabilities[ops.Generate.op] = self._generator_capability()
        lim, req = self.config.limits, self.config.requests
        return {
            "protocol": PROTOCOL_VERSION,
            "server": __version__,
            **self.engine.describe(),
            "secure": secure,
            "shared_memory": str(self.slots.folder) if self.slots is not None else None,
            "head": {
                "name": head.name,
                "fingerprint": self.engine.fingerprint,
                "shape_components": head.n_shape,
                "expression_components": head.n_expr,
                "expression_names": list(head.expr_names),
            },
            "capabilities": capabilities,
            "dtypes": list(DTYPES),
            "limits": {
                "max_message_bytes": lim.max_message_bytes,
                "max_header_bytes": lim.max_header_bytes,
                "max_buffers": lim.max_buffers,
                "max_frames": req.max_frames,
                "max_image_side": req.max_image_side,
                "max_upload_bytes": req.max_upload_bytes,
                "max_video_frames": req.max_video_frames,
                "max_video_seconds": req.max_video_seconds,
                "max_video_side": req.max_video_side,
                "min_video_side": req.min_video_side,
                "stream_window": self.config.stream_window,
                "stream_stall_s": self.config.send_timeout_s,
            },
        }

    def _generator_capability(self) -> dict[str, Any]:
        """Whether ``generate`` can run on the loaded head: the weights must be there and have
        been trained on this head. ``head`` names the head they were trained on; ``personalize``
        is what generate does when a request leaves it out (clients show it as their default)."""
        from backend.generate.checkpoint import generator_from_state, read_generator_file

        path = Path(self.config.generator or DEFAULT_CHECKPOINT)
        if not path.is_file():
            return {
                "available": False,
                "reason": "no stage-1 generator checkpoint is installed with this service (train one with `spatialavatar train`, "
                "then start the service with --generator); import an avatar or initialize one on a subject meanwhile",
            }
        try:
            weights = read_generator_file(path)
            if weights["head_fingerprint"] != self.engine.fingerprint:
                # Building the network for this head refuses it, with the message that names both
                # heads and how to train for this one; hello says the same before anyone asks.
                generator_from_state(weights, self.engine.head, str(path))
        except SpatialAvatarError as exc:
            return {"available": False, "reason": str(exc)}
        return {"available": True, "head": weights["head_name"], "personalize": ops.Generate.personalize_default}

    # -- the loop --------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        """Serve until ``request_stop()`` or a shutdown request; then interrupt the job and close."""
        self.worker.start()
        poller = zmq.Poller()
        poller.register(self.socket.getsockopt(zmq.FD), zmq.POLLIN)  # the socket's signal: "look at its events"
        poller.register(self._wake, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not self._readable():
                    events = dict(poller.poll(POLL_MS))
                    if self._wake in events:
                        while self._drain_wake():
                            pass
                for _ in range(READS_PER_TURN):
                    message = self._receive()
                    if message is None:
                        break
                    try:
                        self._handle(message)
                    except Exception:  # a bug must cost one request, not the service
                        log.exception("request handling failed")
                self._update_watchers()
                self._hand_over()
        finally:
            self.worker.stop(STOP_TIMEOUT_S)
            self._update_watchers(force=True)
            self._close_sockets()
            self.store.close()
            if self.slots is not None and not self.worker.alive:  # a worker stuck in a step may still write
                self.slots.close()

    def _readable(self) -> bool:
        """Whether requests are waiting (this also re-arms the socket's signal)."""
        with self._lock:
            return bool(self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def _receive(self) -> list[zmq.Frame] | None:
        """The next waiting request, or None. Asking the socket first is cheaper than the
        exception a receive with nothing waiting raises."""
        with self._lock:
            if not self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return None
            try:
                return self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None

    def _drain_wake(self) -> bool:
        try:
            self._wake.recv(zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _close_sockets(self) -> None:
        with self._lock:  # a worker still inside a long step may send until the socket is closed
            for sock in (getattr(self, "socket", None), getattr(self, "_wake", None), *self._pushes):
                if sock is not None:
                    sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        worker = getattr(self, "worker", None)
        # A worker still inside a long step holds its socket; terminating would wait for it.
        if self._own_zmq and (worker is None or not worker.alive):
            self._zmq.term()

    # -- requests --------------------------------------------------------------------------

    def _handle(self, message: list[zmq.Frame]) -> None:
        envelope, frames = [message[0].bytes], message[1:]
        if frames and len(frames[0]) == 0:  # a REQ client's delimiter: keep it for the reply
            envelope.append(b"")
            frames = frames[1:]
        try:
            req = decode_request(frames, self.config.limits)
        except WireError as exc:
            rid, op = salvage_id(frames) if frames else (UNKNOWN_ID, UNKNOWN_OP)
            self._send(envelope, encode_error(rid, op, exc.code, str(exc)))
            return
        self.requests += 1
        if self._stop.is_set():
            self._send(envelope, encode_error(req.id, req.op, ErrorCode.SHUTTING_DOWN, f"{req.op}: the service is stopping"))
            return
        if req.op == WATCH:
            self._watch(envelope, req)
            return
        if req.op == ACK:
            self._ack(envelope, req)
            return
        op = OPS.get(req.op)
        if op is None:
            self._send(envelope, encode_error(req.id, req.op, ErrorCode.UNKNOWN_OP, f"unknown operation '{req.op}'; hello lists them"))
            return
        if op.replay:
            with self._lock:
                replayed = self._replay.get(req.id)
            if replayed is not None:
                self._send(envelope, replayed)
                return
        try:
            parts = start(op, self.ctx, req)
        except Exception as exc:
            self._reply_once(envelope, req, op, error_frames(req.id, req.op, exc))
            return
        if op.device:
            self._checked.append(Task(envelope, req, parts))
            return
        for frames_out in encode_parts(req, parts, self.config.limits):
            self._reply_once(envelope, req, op, frames_out)
        if op.queues_job:
            self.worker.wake()

    def _hand_over(self) -> None:
        """Queue this turn's device requests for the worker. Done last before the service
        thread waits: the woken worker then finds the interpreter free, instead of waiting
        for the service thread to let go of it (a second thread wake-up)."""
        checked, self._checked = self._checked, []
        for task in checked:
            if not self.worker.submit(task):
                req = task.request
                message = f"{req.op}: {self.config.max_pending} device requests are waiting; retry shortly"
                self._send(task.envelope, encode_error(req.id, req.op, ErrorCode.BUSY, message))

    def _reply_once(self, envelope: list[bytes], req: Request, op: Op, frames: list[Buffer]) -> None:
        if op.replay:
            with self._lock:
                self._remember(req, frames)
        self._send(envelope, frames)

    def _remember(self, req: Request, frames: list[Buffer]) -> None:
        """Keep the reply of a request that must not run twice, for its retries (under the lock)."""
        self._replay[req.id] = frames
        while len(self._replay) > self.config.replay_size:
            self._replay.popitem(last=False)

    def _send(self, envelope: list[bytes], frames: list[Buffer]) -> bool:
        """False when the client is gone or has stopped reading (its reply is dropped)."""
        with self._lock:
            return self._send_locked(envelope, frames)

    def _send_locked(self, envelope: list[bytes], frames: list[Buffer]) -> bool:
        if self.socket.closed:  # a worker that outlived the service's stop
            return False
        try:
            self.socket.send_multipart([*envelope, *frames], copy=False)
            return True
        except zmq.Again:
            log.warning("a client stopped reading for %.1f s; its stream is dropped", self.config.send_timeout_s)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:  # gone clients are routine; anything else is worth a line
                log.warning("reply not sent: %s", exc)
        return False

    # -- the worker's replies --------------------------------------------------------------

    def _reply(self, task: Task, frames: list[Buffer]) -> None:
        """Called on the worker thread: send a reply of ``task`` straight to its client."""
        op = OPS.get(task.request.op)
        with self._lock:
            if op is not None and op.replay:
                self._remember(task.request, frames)
            if task.abandoned.is_set():
                return
            if not self._send_locked(task.envelope, frames):
                task.abandoned.set()
                log.info("a client is gone or not reading: the rest of its stream is skipped")
            # The send may have consumed the socket's signal for requests that came meanwhile,
            # which the service thread waits on: tell it through its wake socket instead.
            if not self.socket.closed and self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._poke()

    def _poke(self) -> None:
        """Wake the service thread (under the lock)."""
        push = getattr(self._thread_sockets, "push", None)
        if push is None:
            push = self._thread_sockets.push = self._zmq.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(self._wake_endpoint)
            self._pushes.append(push)
        try:
            push.send(b"", zmq.NOBLOCK)
        except zmq.Again:  # the service thread has wake-ups enough pending
            pass

    def _ack(self, envelope: list[bytes], req: Request) -> None:
        """Credit for a stream of this client; answered only when malformed."""
        try:
            a = Args(req)
            request_id, seq = a.str(ops.Ack.request), a.int(ops.Ack.seq)
            a.done()
        except Exception as exc:
            self._send(envelope, error_frames(req.id, req.op, exc))
            return
        self.worker.credit(envelope, request_id, seq)

    # -- job watchers ----------------------------------------------------------------------

    def _watch(self, envelope: list[bytes], req: Request) -> None:
        try:
            a = Args(req)
            jid = check_id(a.str(ops.Watch.job), "jb", "job")
            a.done()
            snapshot = self.jobs.get(jid)
        except Exception as exc:
            self._send(envelope, error_frames(req.id, req.op, exc))
            return
        watcher = _Watcher(envelope, req.id, jid)
        self._watchers[(envelope[0], req.id)] = watcher
        self._send_event(watcher, snapshot)

    def _update_watchers(self, force: bool = False) -> None:
        now = time.monotonic()
        for watcher in list(self._watchers.values()):
            try:
                snapshot = self.jobs.get(watcher.job)
            except WireError as exc:  # the job record was deleted
                self._send(watcher.envelope, encode_error(watcher.request_id, WATCH, exc.code, str(exc), watcher.seq))
                self._watchers.pop((watcher.envelope[0], watcher.request_id), None)
                continue
            state = (snapshot["state"], snapshot["step"], snapshot["message"])
            finished = snapshot["state"] not in ACTIVE
            changed = state != watcher.last and (finished or now - watcher.sent >= MIN_EVENT_INTERVAL_S)
            if force or changed or now - watcher.sent >= self.config.watch_interval_s:
                self._send_event(watcher, snapshot)

    def _send_event(self, watcher: _Watcher, snapshot: dict[str, Any]) -> None:
        final = snapshot["state"] not in ACTIVE
        frames = encode_reply(watcher.request_id, WATCH, {"job": snapshot}, None, watcher.seq, final)
        delivered = self._send(watcher.envelope, frames)
        watcher.seq += 1
        watcher.last = (snapshot["state"], snapshot["step"], snapshot["message"])
        watcher.sent = time.monotonic()
        if final or not delivered:
            self._watchers.pop((watcher.envelope[0], watcher.request_id), None)
