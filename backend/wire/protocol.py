"""The wire protocol of the SpatialAvatar service (pure Python + numpy; no torch, no bpy).

One message is a ZeroMQ multipart message: frame 0 is a UTF-8 JSON header, frames 1..n are
raw binary buffers, one per entry of ``header["buffers"]``, in that order. Every buffer is
described by its name, its dtype (one of ``DTYPES``, always little-endian) and its shape;
the frame's length must equal the product of the shape times the item size. Nothing is ever
unpickled. docs/protocol.md describes every operation; this module only frames, checks and
unframes messages, for the service and its clients alike.

Request header::

    {"protocol": 1, "id": "<request id>", "op": "<operation>", "args": {...}, "buffers": [...]}

Reply header (one or more per request; streams number them with ``seq``)::

    {"protocol": 1, "id": "<request id>", "op": "<operation>", "status": "ok" | "error",
     "seq": 0, "final": true, "result": {...} | "error": {"code": ..., "message": ...},
     "buffers": [...], "shared": {...}}

``shared`` (optional, replies only): the buffers sit in a shared-memory slot instead of
binary frames (see ``shared_frames``); the reply then has no binary frames.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from .errors import SpatialAvatarError
from .shared_frames import SharedReadError, SlotReader

PROTOCOL_VERSION = 1

# The closed set of buffer dtypes; the byte order is part of the name and always "<".
DTYPES: tuple[str, ...] = ("<f4", "<f2", "<u1", "<u2", "<i4", "<i8")
FLOAT_DTYPES: frozenset[str] = frozenset({"<f4", "<f2"})
_NP_DTYPES: dict[str, np.dtype] = {code: np.dtype(code) for code in DTYPES}

# What an error reply to an unreadable header carries instead of the request's id and op.
UNKNOWN_ID = "-"
UNKNOWN_OP = "malformed"

_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_REQUEST_KEYS = frozenset({"protocol", "id", "op", "args", "buffers"})
_REPLY_KEYS = frozenset({"protocol", "id", "op", "status", "seq", "final", "result", "error", "buffers", "shared"})
_BUFFER_KEYS = frozenset({"name", "dtype", "shape"})


ACK = "ack"  # client -> service: reply ``seq`` of stream ``request`` arrived (credit; never answered)


class ErrorCode(StrEnum):
    """Machine-readable error codes; every error reply also carries a one-sentence message."""

    MALFORMED = "malformed"  # not a well-formed message: framing, JSON, header fields, buffer sizes
    UNSUPPORTED_VERSION = "unsupported_version"  # the header's protocol version is not this one
    UNKNOWN_OP = "unknown_op"  # no such operation
    INVALID_ARGUMENT = "invalid_argument"  # an argument or buffer has the wrong type, shape, range or content
    TOO_LARGE = "too_large"  # a size limit was exceeded
    NOT_FOUND = "not_found"  # no avatar, subject or job with that id
    NOT_AVAILABLE = "not_available"  # this service cannot do that yet (see hello's capabilities)
    INCOMPATIBLE = "incompatible"  # an avatar made on another head model
    CONFLICT = "conflict"  # the operation does not fit the current state (e.g. resume a finished job)
    BUSY = "busy"  # too many requests waiting; try again shortly
    SHUTTING_DOWN = "shutting_down"  # the service is stopping
    INTERNAL = "internal"  # a bug in the service; the message says what failed
    UNREACHABLE = "unreachable"  # client-side only: no reply after every retry


class WireError(SpatialAvatarError):
    """An error with a wire code; ``str(err)`` is the one-sentence message."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Size limits checked on every message.

    Attributes:
        max_message_bytes: header plus all buffers, bytes.
        max_header_bytes: the JSON header, bytes.
        max_buffers: binary frames per message.
        max_ndim: dimensions per buffer.
    """

    max_message_bytes: int = 512 * 2**20
    max_header_bytes: int = 64 * 2**10
    max_buffers: int = 32
    max_ndim: int = 6


@dataclass(frozen=True)
class Request:
    """A decoded request; ``arrays`` are read-only views of the received frames."""

    id: str
    op: str
    args: dict[str, Any]
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class ErrorInfo:
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Reply:
    """A decoded reply. ``seq`` numbers the replies of one request from 0; ``final`` marks the last."""

    id: str
    op: str
    status: str
    seq: int
    final: bool
    result: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    error: ErrorInfo | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def raise_for_error(self) -> Reply:
        """Self when ok; else the error as a WireError."""
        if self.error is not None:
            raise WireError(self.error.code, self.error.message)
        return self


Buffer = bytes | bytearray | memoryview


def new_request_id() -> str:
    return uuid.uuid4().hex


# -- encoding -----------------------------------------------------------------------------


def wire_dtype(dtype: np.dtype) -> str:
    """The wire name of a numpy dtype of either byte order, e.g. float32 -> "<f4"."""
    code = f"<{dtype.kind}{dtype.itemsize}"
    if code not in DTYPES:
        raise WireError(ErrorCode.INVALID_ARGUMENT, f"dtype {dtype.str} cannot travel; the wire carries {', '.join(DTYPES)}")
    return code


def _pack(arrays: Mapping[str, np.ndarray] | None, limits: Limits) -> tuple[list[dict], list[Buffer]]:
    descriptors: list[dict] = []
    frames: list[Buffer] = []
    for name, value in (arrays or {}).items():
        if not _NAME.fullmatch(name):
            raise WireError(ErrorCode.INVALID_ARGUMENT, f"buffer name {name!r} must be lower-case letters, digits and '_'")
        a = np.asarray(value)
        if a.ndim > limits.max_ndim:
            raise WireError(ErrorCode.INVALID_ARGUMENT, f"buffer '{name}' has {a.ndim} dimensions; at most {limits.max_ndim}")
        code = wire_dtype(a.dtype)
        a = np.asarray(a, dtype=np.dtype(code), order="C")  # little-endian and C order; no copy when already so
        descriptors.append({"name": name, "dtype": code, "shape": list(a.shape)})
        frames.append(memoryview(a.reshape(-1).view(np.uint8)))
    if len(frames) > limits.max_buffers:
        raise WireError(ErrorCode.TOO_LARGE, f"{len(frames)} buffers in one message; at most {limits.max_buffers}")
    return descriptors, frames


def _finish(header: dict, frames: list[Buffer], limits: Limits) -> list[Buffer]:
    raw = json.dumps(header, allow_nan=False, separators=(",", ":")).encode()
    if len(raw) > limits.max_header_bytes:
        raise WireError(ErrorCode.TOO_LARGE, f"header of {len(raw)} bytes; at most {limits.max_header_bytes}")
    total = len(raw) + sum(memoryview(f).nbytes for f in frames)
    if total > limits.max_message_bytes:
        raise WireError(ErrorCode.TOO_LARGE, f"message of {total} bytes; at most {limits.max_message_bytes}")
    return [raw, *frames]


def encode_request(
    op: str,
    args: Mapping[str, Any] | None = None,
    arrays: Mapping[str, np.ndarray] | None = None,
    request_id: str | None = None,
    limits: Limits = Limits(),
) -> tuple[str, list[Buffer]]:
    """(request id, frames) of a request; arrays of any byte order are sent little-endian."""
    request_id = request_id or new_request_id()
    descriptors, frames = _pack(arrays, limits)
    header = {"protocol": PROTOCOL_VERSION, "id": request_id, "op": op, "args": dict(args or {}), "buffers": descriptors}
    return request_id, _finish(header, frames, limits)


def encode_reply(
    request_id: str,
    op: str,
    result: Mapping[str, Any] | None = None,
    arrays: Mapping[str, np.ndarray] | None = None,
    seq: int = 0,
    final: bool = True,
    limits: Limits = Limits(),
    shared: Callable[[Sequence[Buffer]], dict[str, Any] | None] | None = None,
) -> list[Buffer]:
    """The frames of one ok reply. ``shared`` (a ``SlotPool.put``) may take the buffers into
    shared memory; when it declines, they travel as frames."""
    descriptors, frames = _pack(arrays, limits)
    slot = shared(frames) if shared is not None and frames else None
    if slot is not None:
        frames = []
    header = {
        "protocol": PROTOCOL_VERSION,
        "id": request_id,
        "op": op,
        "status": "ok",
        "seq": seq,
        "final": final,
        "result": dict(result or {}),
        "buffers": descriptors,
    } | ({"shared": slot} if slot is not None else {})
    return _finish(header, frames, limits)


def encode_error(request_id: str, op: str, code: ErrorCode | str, message: str, seq: int = 0) -> list[Buffer]:
    """The frames of an error reply (always final, never with buffers); the message starts with the op."""
    if not message.startswith(f"{op}: "):
        message = f"{op}: {message}"
    header = {
        "protocol": PROTOCOL_VERSION,
        "id": request_id,
        "op": op,
        "status": "error",
        "seq": seq,
        "final": True,
        "error": {"code": str(ErrorCode(code)), "message": message},
        "buffers": [],
    }
    return [json.dumps(header, allow_nan=False, separators=(",", ":")).encode()]


# -- decoding -----------------------------------------------------------------------------


def _malformed(message: str) -> WireError:
    return WireError(ErrorCode.MALFORMED, message)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in JSON")


def _header(frame: Buffer, limits: Limits) -> dict:
    view = memoryview(frame)
    if view.nbytes > limits.max_header_bytes:
        raise WireError(ErrorCode.TOO_LARGE, f"header of {view.nbytes} bytes; at most {limits.max_header_bytes}")
    try:
        header = json.loads(bytes(view).decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise _malformed("the header (frame 0) is not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise _malformed(f"the header (frame 0) is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(header, dict):
        raise _malformed("the header (frame 0) must be a JSON object")
    return header


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _common(header: dict, allowed: frozenset[str]) -> tuple[str, str]:
    """Check protocol, id and op and the set of keys; returns (id, op)."""
    version = header.get("protocol")
    if not _is_int(version):
        raise _malformed("header field 'protocol' must be an integer")
    if version != PROTOCOL_VERSION:
        raise WireError(ErrorCode.UNSUPPORTED_VERSION, f"this side speaks protocol {PROTOCOL_VERSION}, the message uses {version}")
    extra = sorted(set(header) - allowed)
    if extra:
        raise _malformed(f"header field {extra[0]!r} is not part of protocol {PROTOCOL_VERSION}")
    rid, op = header.get("id"), header.get("op")
    if not isinstance(rid, str) or not _ID.fullmatch(rid):
        raise _malformed("header field 'id' must be 1-64 characters of letters, digits and '_.:-'")
    if not isinstance(op, str) or not _NAME.fullmatch(op):
        raise _malformed("header field 'op' must be a lower-case name")
    return rid, op


def _described(header: dict, limits: Limits) -> list[tuple[str, np.dtype, list[int]]]:
    """(name, dtype, shape) of every buffer the header lists, checked."""
    descriptors = header.get("buffers", [])
    if not isinstance(descriptors, list):
        raise _malformed("header field 'buffers' must be a list")
    if len(descriptors) > limits.max_buffers:
        raise WireError(ErrorCode.TOO_LARGE, f"{len(descriptors)} buffers in one message; at most {limits.max_buffers}")
    described: list[tuple[str, np.dtype, list[int]]] = []
    seen: set[str] = set()
    for i, d in enumerate(descriptors):
        where = f"buffers[{i}]"
        if not isinstance(d, dict) or d.keys() != _BUFFER_KEYS:
            raise _malformed(f"{where} must be an object with exactly 'name', 'dtype' and 'shape'")
        name, dtype, shape = d["name"], d["dtype"], d["shape"]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _malformed(f"{where}.name must be a lower-case name")
        if name in seen:
            raise _malformed(f"{where}.name {name!r} appears twice")
        seen.add(name)
        np_dtype = _NP_DTYPES.get(dtype) if isinstance(dtype, str) else None
        if np_dtype is None:
            raise _malformed(f"{where}.dtype {str(dtype)[:16]!r} is not allowed; use one of {', '.join(DTYPES)} (little-endian)")
        if not isinstance(shape, list) or len(shape) > limits.max_ndim or not all(type(s) is int and s >= 0 for s in shape):
            raise _malformed(f"{where}.shape must be a list of at most {limits.max_ndim} non-negative integers")
        # An empty array holds no bytes whatever its other dimensions, so the byte count
        # alone cannot bound them; numpy refuses dimensions past its index range. Bound the
        # array the shape would describe without its zeros by the message limit.
        if _nbytes(np_dtype, [s for s in shape if s]) > limits.max_message_bytes:
            raise _malformed(f"{where}.shape {str(shape)[:80]} describes more than {limits.max_message_bytes} bytes")
        described.append((name, np_dtype, shape))
    return described


def _nbytes(dtype: np.dtype, shape: list[int]) -> int:
    return math.prod(shape) * dtype.itemsize


def _arrays(described: list[tuple[str, np.dtype, list[int]]], frames: Sequence[Buffer], check_finite: bool = True) -> dict[str, np.ndarray]:
    """Read-only arrays over the buffers' bytes (one per described buffer, in order)."""
    if len(described) != len(frames):
        raise _malformed(f"header lists {len(described)} buffers but the message has {len(frames)} binary frames")
    arrays: dict[str, np.ndarray] = {}
    for (name, np_dtype, shape), frame in zip(described, frames):
        view = memoryview(frame)
        expected = _nbytes(np_dtype, shape)
        if expected != view.nbytes:
            raise _malformed(f"buffer '{name}' should hold {expected} bytes for {np_dtype.str} {shape}, the frame has {view.nbytes}")
        try:
            a = np.frombuffer(view, dtype=np_dtype).reshape(shape)
        except (ValueError, TypeError) as exc:  # whatever numpy still refuses is the sender's error
            raise _malformed(f"buffer '{name}' cannot be read as {np_dtype.str} {str(shape)[:80]} ({exc})") from None
        a.flags.writeable = False
        if check_finite and np_dtype.kind == "f" and not bool(np.isfinite(a).all()):
            raise WireError(ErrorCode.INVALID_ARGUMENT, f"buffer '{name}' contains NaN or Inf")
        arrays[name] = a
    return arrays


def _check_total(frames: Sequence[Buffer], limits: Limits) -> None:
    if not frames:
        raise _malformed("empty message: a header frame is needed")
    total = sum(memoryview(f).nbytes for f in frames)
    if total > limits.max_message_bytes:
        raise WireError(ErrorCode.TOO_LARGE, f"message of {total} bytes; at most {limits.max_message_bytes}")


def decode_request(frames: Sequence[Buffer], limits: Limits = Limits()) -> Request:
    """Parse and check a request (frames without the routing envelope); raises WireError."""
    _check_total(frames, limits)
    header = _header(frames[0], limits)
    rid, op = _common(header, _REQUEST_KEYS)
    args = header.get("args", {})
    if not isinstance(args, dict):
        raise _malformed("header field 'args' must be a JSON object")
    return Request(rid, op, args, _arrays(_described(header, limits), frames[1:]))


def decode_reply(frames: Sequence[Buffer], limits: Limits = Limits(), check_finite: bool = True, shared: SlotReader | None = None) -> Reply:
    """Parse and check a reply; raises WireError (an error *reply* is returned, not raised).

    ``check_finite=False`` skips the NaN/Inf scan of float buffers (framing, dtypes, shapes
    and sizes are still checked): a client that trusts its service saves a pass over every
    rendered frame, and numpy's float16 scan is slow. ``shared`` reads the buffers of a reply
    that carries them in shared memory (in place; the slot is freed when they are dropped).
    """
    _check_total(frames, limits)
    header = _header(frames[0], limits)
    rid, op = _common(header, _REPLY_KEYS)
    status, seq, final = header.get("status"), header.get("seq"), header.get("final")
    if status not in ("ok", "error"):
        raise _malformed("header field 'status' must be 'ok' or 'error'")
    if not _is_int(seq) or seq < 0:
        raise _malformed("header field 'seq' must be a non-negative integer")
    if not isinstance(final, bool):
        raise _malformed("header field 'final' must be true or false")
    described = _described(header, limits)
    buffers: Sequence[Buffer] = frames[1:]
    if "shared" in header:
        if buffers or status != "ok":
            raise _malformed("only an ok reply without binary frames may have 'shared' buffers")
        if shared is None:
            raise _malformed("the reply's buffers are in shared memory, which this side did not ask for")
        try:
            buffers = shared.read(header["shared"], [_nbytes(dtype, shape) for _, dtype, shape in described])
        except SharedReadError as exc:
            raise _malformed(f"shared buffers: {exc}") from None
    arrays = _arrays(described, buffers, check_finite)
    if status == "error":
        err = header.get("error")
        if not isinstance(err, dict) or not isinstance(err.get("message"), str) or err.get("code") not in set(ErrorCode):
            raise _malformed("an error reply needs 'error' with a known 'code' and a 'message'")
        return Reply(rid, op, status, seq, True, {}, arrays, ErrorInfo(ErrorCode(err["code"]), err["message"]))
    result = header.get("result", {})
    if not isinstance(result, dict):
        raise _malformed("header field 'result' must be a JSON object")
    return Reply(rid, op, status, seq, final, result, arrays)


def salvage_id(frames: Sequence[Buffer], limits: Limits = Limits()) -> tuple[str, str]:
    """(id, op) of a message that failed to decode, so its error reply can still be matched.

    Falls back to UNKNOWN_ID and UNKNOWN_OP for whatever the header does not give.
    """
    try:
        header = _header(frames[0], limits)
    except (WireError, IndexError, TypeError):
        return UNKNOWN_ID, UNKNOWN_OP
    rid, op = header.get("id"), header.get("op")
    return (
        rid if isinstance(rid, str) and _ID.fullmatch(rid) else UNKNOWN_ID,
        op if isinstance(op, str) and _NAME.fullmatch(op) else UNKNOWN_OP,
    )
