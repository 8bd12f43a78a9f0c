"""Hostile messages for the service (no tests here): random mutations of well-formed requests,
job submissions that must be refused, avatar files that ``import`` must refuse, and the
clients that send them (DEALER and REQ senders that check every reply, a hello sampler).

Shared by tests/test_server_fuzz.py and tests/benchmarks/bench_server_load.py. Everything is
built from a seeded ``random.Random``, so a failing run can be repeated, and works from any
thread (unlike Hypothesis, whose ``given`` runs on one thread).
"""

from __future__ import annotations

import io
import itertools
import json
import random
import struct
import threading
import time
import traceback
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from PIL import Image

from backend.gaussians.files import avatar_arrays
from backend.head.model import HeadModel
from backend.wire.protocol import UNKNOWN_ID, ErrorCode, Limits, Reply, decode_reply, encode_request, salvage_id
from tests.test_server_support import small_avatar

# Never "shutdown" (it would end the run), "ack" (never answered, by design) nor job
# submissions (a random one that happened to be valid would start real work): those that
# must be refused are crafted below instead.
FUZZ_OPS = ("hello", "list", "get", "delete", "import", "export", "deform", "render", "track", "generate", "cancel", "resume", "watch")
NEVER_SENT_OPS = frozenset({"shutdown", "ack", "synthesize", "initialize", "refine"})
REFUSED = frozenset({"malformed", "invalid_argument", "too_large", "not_found", "not_available", "conflict", "unknown_op"})
FILE_REFUSED = frozenset({"invalid_argument", "incompatible"})
NO_SUCH_AVATAR, NO_SUCH_SUBJECT, NO_SUCH_JOB = "av_0123456789abcdef", "sb_0123456789abcdef", "jb_0123456789abcdef"
ESCAPING_IDS = (
    "../../etc/passwd",
    "/etc/passwd",
    "av_../../x",
    "av_0123456789abcdef/../..",
    "av_0123456789ABCDEF",
    "av_0123456789abcdef\n",
)


@dataclass(frozen=True)
class Case:
    """One message to send. ``allowed``: outcomes its final reply may have ("ok" or an error
    code); None means anything but "internal". ``single``: exactly one reply must come."""

    label: str
    frames: list[bytes]
    allowed: frozenset[str] | None = None
    single: bool = True



def lying_sh_header(arrays: dict[str, np.ndarray]) -> bytes:
    """An avatar .npz whose 'sh' header claims 4M x 16 x 3 floats (768 MiB) over a member of
    a few bytes: a reader that trusts headers allocates it all."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key, value in arrays.items():
            with zf.open(f"{key}.npy", "w") as f:
                if key == "sh":
                    np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (4_000_000, 16, 3)})
                    f.write(b"\0" * 64)
                else:
                    np.lib.format.write_array(f, value)
    return buf.getvalue()

def outcome(reply: Any) -> str:
    """ "ok" or the reply's error code."""
    return str(reply.error.code) if reply.error is not None else "ok"


def reply_id(frames: Sequence[bytes]) -> str:
    """The id the service's replies to ``frames`` (as sent, after the routing id) will carry:
    it strips one leading empty frame (a REQ delimiter), then salvages what it can."""
    body = list(frames[1:]) if frames and len(frames[0]) == 0 else list(frames)
    return salvage_id(body)[0] if body else UNKNOWN_ID


# A hostile sender keeps no limits: messages past the service's are built all the same.
UNLIMITED = Limits(max_message_bytes=2**40, max_header_bytes=2**40, max_buffers=2**20)


def request(op: str, args: Mapping[str, Any] | None = None, arrays: Mapping[str, np.ndarray] | None = None, rid: str = "") -> list[bytes]:
    """The frames of a request, as bytes, whatever their size."""
    return [bytes(f) for f in encode_request(op, args, arrays, request_id=rid or None, limits=UNLIMITED)[1]]


# -- random mutations ---------------------------------------------------------------------

_TEXTS = ("", "a", "é", "\u0000", "../x", "av_", "null", " " * 3, "ok", "x" * 40, "\ud7ff\u2028", "NaN")


def json_value(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value: scalars of awkward sizes and kinds, short lists and objects."""
    pick = rng.randrange(9 if depth < 2 else 6)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, 10**30, -(10**30), rng.randrange(-1000, 1000)])
    if pick == 3:
        return rng.choice([0.5, -0.0, 1e308, -1e-308, rng.uniform(-1e6, 1e6)])
    if pick in (4, 5):
        return rng.choice(_TEXTS) if rng.random() < 0.5 else "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(20)))
    if pick in (6, 7):
        return [json_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(("a", "id", "op", "", "x" * 8)): json_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def mutate(rng: random.Random, seed: Sequence[bytes], rid: str) -> list[bytes]:
    """A copy of the well-formed request ``seed`` with id ``rid``, made wrong in one way (or
    in none, now and then). The op never becomes one of ``NEVER_SENT_OPS``."""
    frames = list(seed)
    header = json.loads(frames[0])
    header["id"] = rid
    kind = rng.randrange(13)
    if kind == 0:  # random bytes
        return [rng.randbytes(rng.randrange(65)) for _ in range(rng.randrange(1, 5))]
    if kind == 1:  # truncated header text
        raw = json.dumps(header).encode()
        return [raw[: rng.randrange(len(raw))], *frames[1:]]
    if kind == 2 and len(frames) > 1:  # truncated or padded buffer
        i = rng.randrange(1, len(frames))
        frames[i] = frames[i][: rng.randrange(max(len(frames[i]), 1))] if rng.random() < 0.5 else frames[i] + b"\0" * 4
    elif kind == 3 and len(frames) > 1:  # a buffer dropped or duplicated
        frames = frames[:-1] if rng.random() < 0.5 else frames + frames[-1:]
    elif kind == 4:  # a header field replaced by any JSON value
        header[rng.choice(sorted(header) + ["extra"])] = json_value(rng)
    elif kind == 5:  # a header field removed
        header.pop(rng.choice(sorted(header)))
    elif kind == 6 and header["buffers"]:  # a buffer descriptor changed
        d = rng.choice(header["buffers"])
        d[rng.choice(["name", "dtype", "shape"])] = rng.choice(
            [json_value(rng), ">f4", "<f8", "|u1", "<f2", "O", [10**30], [-1], [0], [2**62, 2**62], "../x", [1] * 7]
        )
    elif kind == 7:  # random arguments for a random operation
        header["op"] = rng.choice(FUZZ_OPS) if rng.random() < 0.8 else rng.choice(["", "Hello", "x" * 70, "nope", "render "])
        keys = ["avatar", "id", "job", "width", "height", "kind", "format", "name", "buffers", "x"]
        header["args"] = {rng.choice(keys): json_value(rng) for _ in range(rng.randrange(5))}
    elif kind == 8 and len(frames) > 1:  # NaN or Inf inside a float buffer
        for i, d in enumerate(header["buffers"], start=1):
            if d["dtype"] == "<f4" and len(frames[i]) >= 4:
                a = np.frombuffer(frames[i], "<f4").copy()
                a[rng.randrange(len(a))] = rng.choice([np.nan, np.inf, -np.inf])
                frames[i] = a.tobytes()
                break
    elif kind == 9:  # non-UTF-8, non-object or absurd header
        return [
            rng.choice([b"\xff" * 8, b"[]", b"null", b"1e999", b'{"protocol": Infinity}', b"{" * 5000 + b"}" * 5000, b'"' * 3]),
            *frames[1:],
        ]
    elif kind == 10:  # ids that try to escape the store
        header["op"] = rng.choice(["get", "delete", "export", "render", "watch", "cancel"])
        header["args"] = {rng.choice(["id", "avatar", "job"]): rng.choice(ESCAPING_IDS)}
    elif kind == 11:  # another protocol version
        header["protocol"] = rng.choice([0, 2, -1, 10**20, "1", 1.0])
    if isinstance(header.get("op"), str) and header["op"] in NEVER_SENT_OPS:
        header["op"] = "hello"
    frames[0] = json.dumps(header).encode()
    return frames


# -- images -------------------------------------------------------------------------------


def png_bytes(width: int = 64, height: int = 64, seed: int = 0) -> bytes:
    """A decodable PNG of noise (no face in it)."""
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A few hundred bytes whose header claims ``width`` x ``height`` pixels: the size must be
    refused from the header, before anything is decoded."""
    data = bytearray(png_bytes(1, 1))
    ihdr = 8  # the IHDR chunk follows the signature: length, type, 13 bytes of data, CRC
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21])))
    return bytes(data)


def u8(data: bytes) -> np.ndarray:
    """Bytes as the [n] uint8 buffer uploads travel in."""
    return np.frombuffer(data, np.uint8)


# -- job submissions that must be refused -------------------------------------------------


def hostile_jobs(aid: str, sid: str, done_job: str) -> list[tuple[str, str, dict, dict, frozenset[str]]]:
    """(label, op, args, buffers, allowed codes) of job submissions with one defect each,
    given an avatar ``aid``, a subject ``sid`` and a finished job ``done_job`` in the store.
    None of them may be queued."""
    bad, missing = frozenset({"invalid_argument"}), frozenset({"not_found"})
    png = u8(png_bytes())
    junk = u8(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    bomb = u8(png_bomb())
    fake_video = u8(b"\0\0\0\x18ftypmp42" + b"\0" * 200)
    out: list[tuple[str, str, dict, dict, frozenset[str]]] = []

    def add(op: str, args: dict, arrays: dict | None = None, allowed: frozenset[str] = bad) -> None:
        out.append((f"{op} {json.dumps(args)[:60]} {sorted(arrays or {})}", op, args, arrays or {}, allowed))

    for args in (
        {"frames": 0},
        {"frames": 601},
        {"size": 31},
        {"size": 4096},
        {"views": 0},
        {"views": 17},
        {"seed": -1},
        {"seed": 2**31},
        {"reference_gaussians": 999},
        {"reference_gaussians": 10**9},
        {"frames": True},
        {"frames": 1.5},
        {"frames": "1"},
        {"frames": [1]},
        {"frames": {"n": 1}},
        {"frames": 1, "store": "../elsewhere"},
        {"frames": 1, "out": NO_SUCH_SUBJECT},
    ):
        add("synthesize", args)
    add("synthesize", {"frames": 1}, {"x": np.zeros(4, np.uint8)})
    for args in (
        {},
        {"subject": "../../etc"},
        {"subject": aid},
        {"subject": sid, "gaussians": 0},
        {"subject": sid, "gaussians": 10**7},
        {"subject": sid, "gaussians": "many"},
        {"subject": sid, "frame": -1},
        {"subject": sid, "camera": -1},
        {"subject": sid, "frame": 99},
        {"subject": sid, "camera": 7},
        {"subject": sid, "name": 7},
        {"subject": sid, "name": "x" * 500},
        {"subject": sid, "name": "a\u0000b"},
        {"subject": sid, "out": NO_SUCH_AVATAR},
    ):
        add("initialize", args)
    add("initialize", {"subject": NO_SUCH_SUBJECT}, allowed=missing)
    base = {"avatar": aid, "subject": sid}
    for extra in (
        {"iterations": 0},
        {"iterations": 10**7},
        {"checkpoint_every": 0},
        {"max_scale": 0},
        {"max_scale": 1e9},
        {"max_scale": "big"},
        {"preset": "fast"},
        {"avatar": sid},
        {"avatar": aid.upper()},
        {"name": {}},
        {"resume": True},
        {"out": NO_SUCH_AVATAR},
        {"subject": None, "avatar": aid},
    ):
        add("refine", base | extra)
    add("refine", {"subject": sid})
    add("refine", base | {"avatar": NO_SUCH_AVATAR}, allowed=missing)
    add("refine", base | {"subject": NO_SUCH_SUBJECT}, allowed=missing)
    add("track", {})
    add("track", {}, {"image0": junk})
    add("track", {}, {"image1": png})
    add("track", {}, {"image0": bomb}, frozenset({"too_large"}))
    add("track", {}, {"image0": png.astype("<f4")})
    add("track", {}, {"image0": png.reshape(-1, 1)})
    add("track", {}, {"image0": png[:0]})
    add("track", {}, {"image0": png, "video": fake_video})
    add("track", {}, {"video": fake_video})
    add("track", {}, {"video": junk})
    add("track", {"size": 10}, {"image0": png})
    add("track", {"max_frames": 0}, {"image0": png})
    add("track", {"path": "/etc"}, {"image0": png})
    add("generate", {})
    add("generate", {}, {"portrait1": png})
    add("generate", {}, {f"portrait{i}": png for i in range(5)})
    add("generate", {}, {"portrait0": junk})
    add("generate", {}, {"portrait0": bomb}, frozenset({"too_large"}))
    add("generate", {"subject": sid}, {"portrait0": png})
    add("generate", {"frames": "0"}, {"portrait0": png})
    add("generate", {"subject": NO_SUCH_SUBJECT}, allowed=missing)
    add("generate", {"subject": sid, "frames": "99"})
    add("generate", {"subject": sid, "frames": "0:99"})
    add("generate", {"subject": sid, "frames": "abc"})
    add("generate", {"subject": sid, "name": 5})
    add("generate", {"subject": "../" + sid})
    add("resume", {"job": NO_SUCH_JOB}, allowed=missing)
    add("resume", {"job": done_job}, allowed=frozenset({"conflict"}))
    add("resume", {"job": 5})
    add("cancel", {"job": done_job}, allowed=frozenset({"conflict"}))
    add("cancel", {"job": "../jobs"})
    return out


# -- avatar files that import must refuse -------------------------------------------------


def _npz(arrays: Mapping[str, np.ndarray], compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _zip(members: Sequence[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore", UserWarning)  # a repeated name is the point of one case
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=True)
    return buf.getvalue()


def hostile_avatar_files(head: HeadModel, max_gaussians: int) -> list[tuple[str, bytes, frozenset[str]]]:
    """(label, file bytes, allowed codes) of avatar files ``import`` must refuse, on a service
    whose ``requests.max_gaussians`` is ``max_gaussians`` (the file checks of
    tests/test_avatar_file_checks.py, plus bombs, broken zips and another head model)."""
    from tests.test_avatar_file_checks import SPOILT

    good = avatar_arrays(small_avatar(head, count=1000, seed=7))
    files: list[tuple[str, bytes, frozenset[str]]] = []
    for case, spoil, _ in SPOILT:
        arrays = {k: v.copy() for k, v in good.items()}  # the spoilers change arrays in place
        spoil(head)(arrays)
        files.append((case, _npz(arrays), FILE_REFUSED))

    def changed(label: str, **update: np.ndarray) -> None:
        files.append((label, _npz(good | update), FILE_REFUSED))

    changed("another head model", head_fingerprint=np.array("0" * 16))
    changed("another format", format=np.array("other.format"))
    changed("version 2", version=np.array(2, "<i8"))
    changed("NaN in bary", bary=np.where(np.arange(len(good["bary"]))[:, None] == 0, np.nan, good["bary"]).astype("<f4"))
    changed("Gaussian count mismatch", sh=np.zeros((1001, *good["sh"].shape[1:]), "<f4"))
    files.append(
        (
            "object array (a pickle)",
            _zip(
                [(f"{k}.npy", _npy(v)) for k, v in good.items() if k != "meta"] + [("meta.npy", _npy(np.array([{"a": 1}], dtype=object)))]
            ),
            FILE_REFUSED,
        )
    )
    files.append(
        (
            "a member outside the archive",
            _zip([(f"{k}.npy", _npy(v)) for k, v in good.items()] + [("../../evil.npy", _npy(np.zeros(2)))]),
            FILE_REFUSED,
        )
    )
    files.append(
        ("a member twice", _zip([(f"{k}.npy", _npy(v)) for k, v in good.items()] + [("bary.npy", _npy(good["bary"]))]), FILE_REFUSED)
    )
    # Decompression bombs: zeros that inflate far past what the file is, in an unknown member
    # and in a known one whose header is over the limits; and a header that lies about its data.
    files.append(("bomb in an unknown member", _npz(good | {"junk": np.zeros(8 * 2**20, "<f4")}, compressed=True), FILE_REFUSED))
    files.append(
        (
            "bomb past max_gaussians",
            _npz(good | {"opacity_logit": np.zeros(max(4 * max_gaussians, 16 * 2**20), "<f4")}, compressed=True),
            FILE_REFUSED,
        )
    )
    files.append(("a header that lies about its data", lying_sh_header(good), FILE_REFUSED))
    whole = _npz(good)
    files.append(("truncated", whole[: len(whole) // 2], FILE_REFUSED))
    files.append(("not a zip", b"hello, this is not an avatar", FILE_REFUSED))
    files.append(("empty", b"", frozenset({"invalid_argument"})))
    return files


def seed_requests(head: HeadModel, aid: str, sid: str, done_job: str, size: int) -> tuple[list[list[bytes]], list[list[bytes]]]:
    """(well-formed requests with exactly one reply, well-formed requests with several) to mutate."""
    from tests.test_server_support import flame_buffers, front_camera

    K, w2c = front_camera(size)
    cams = {"intrinsics": K, "world_to_cam": w2c}
    seeds = [
        request("hello"),
        request("list"),
        request("list", {"kind": "jobs"}),
        request("get", {"id": aid, "buffers": True}),
        request("get", {"id": sid}),
        request("watch", {"job": done_job}),  # a finished job: one final reply
        request("export", {"avatar": aid}),
        request("render", {"avatar": aid, "width": size, "height": size}, flame_buffers(head, 1) | cams),
        request("track", {}, {"image0": u8(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)}),
    ]
    streams = [
        request("render", {"avatar": aid, "width": size, "height": size, "rgba": "<u1"}, flame_buffers(head, 3) | cams),
        request("deform", {"avatar": aid, "max_gaussians": 10}, flame_buffers(head, 2)),
    ]
    return seeds, streams


def fuzz_cases(
    rng: random.Random, seeds: Sequence[list[bytes]], streams: Sequence[list[bytes]], count: int, rid: Callable[[], str]
) -> list[Case]:
    """``count`` mutations of the seeds (15% of them of a stream's, when ``streams`` are given)."""
    out = []
    for _ in range(count):
        from_stream = bool(streams) and rng.random() < 0.15
        out.append(Case("fuzz", mutate(rng, rng.choice(streams if from_stream else seeds), rid()), None, single=not from_stream))
    return out


def import_case(label: str, data: bytes, allowed: frozenset[str], rid: str, name: str) -> Case:
    """An ``import`` of ``data`` under display name ``name``."""
    return Case(f"import: {label}", request("import", {"name": name}, {"file": u8(data)}, rid), allowed)


def job_cases(jobs: Sequence[tuple[str, str, dict, dict, frozenset[str]]], rid: Callable[[], str]) -> list[Case]:
    """The hostile job submissions as cases, each with a fresh request id."""
    return [Case(f"job: {label}", request(op, args, arrays, rid()), allowed) for label, op, args, arrays, allowed in jobs]


# -- clients ------------------------------------------------------------------------------

REPLY_WAIT_MS = 120_000  # generous: the machine may be shared; a missing reply still fails, only later


class Tally:
    """What every thread saw, under one lock; failures are kept, not raised, so that every
    thread runs to its end and the caller reports them all."""

    def __init__(self, store: Path) -> None:
        self._lock = threading.Lock()
        self._store = str(store)
        self.sent = 0
        self.finals = 0
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []

    def send(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        sock.send_multipart(frames)
        with self._lock:
            self.sent += 1

    def reply(self, reply: Reply) -> None:
        with self._lock:
            if reply.final:
                self.finals += 1
                self.outcomes[outcome(reply)] += 1
            if reply.error is not None and reply.error.code == ErrorCode.INTERNAL:
                self.failures.append(f"internal reply: {reply.error.message}")
            if reply.error is not None and self._store in reply.error.message:
                self.failures.append(f"a reply names the store's path: {reply.error.message}")

    def check(self, case: Case, reply: Reply, replies: int) -> None:
        got = outcome(reply)
        if case.allowed is not None and got not in case.allowed:
            self.fail(f"{case.label}: {got} ({reply.error.message if reply.error else ''}), expected one of {sorted(case.allowed)}")
        if case.single and replies != 1:
            self.fail(f"{case.label}: {replies} replies, expected exactly one")

    def fail(self, message: str) -> None:
        with self._lock:
            self.failures.append(message)

    def run(self, name: str, fn: Callable[[], None]) -> threading.Thread:
        def body() -> None:
            try:
                fn()
            except Exception:  # reported by the caller, with every other failure
                self.fail(f"{name}: {traceback.format_exc()}")

        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        return thread


def connect(endpoint: str, kind: int = zmq.DEALER) -> zmq.Socket:
    """A socket of ``kind`` connected to ``endpoint``, closing without delay."""
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def receive(sock: zmq.Socket) -> Reply:
    """The next reply, its REQ delimiter (if any) stripped."""
    frames = sock.recv_multipart()
    return decode_reply(frames[1:] if frames and frames[0] == b"" else frames)


def send_batches(endpoint: str, cases: Sequence[Case], tally: Tally, batch: int, delimiter: bool, wait_ms: int = REPLY_WAIT_MS) -> None:
    """A DEALER that keeps ``batch`` requests in flight; with ``delimiter`` it frames them
    as a REQ socket would. Every request must get its final reply, and no id any other."""
    sock = connect(endpoint)
    try:
        for start in range(0, len(cases), batch):
            chunk = cases[start : start + batch]
            sent = [([b""] if delimiter else []) + case.frames for case in chunk]
            want = Counter(reply_id(frames) for frames in sent)
            # Hostile messages may share an id (often "-"); only unique ids name their case.
            mine = {reply_id(frames): case for frames, case in zip(sent, chunk) if want[reply_id(frames)] == 1}
            for frames in sent:
                tally.send(sock, frames)
            finals: Counter[str] = Counter()
            seqs: dict[str, list[int]] = {}
            while finals != want:
                if not sock.poll(wait_ms):
                    raise AssertionError(f"no final reply to {dict(want - finals)}")
                reply = receive(sock)
                tally.reply(reply)
                if reply.id not in want or finals[reply.id] >= want[reply.id]:
                    raise AssertionError(f"a reply nobody waits for: {reply.id} {reply.op} seq {reply.seq}")
                seqs.setdefault(reply.id, []).append(reply.seq)
                if reply.final:
                    finals[reply.id] += 1
                    if reply.id in mine:
                        tally.check(mine[reply.id], reply, len(seqs[reply.id]))
                        if seqs[reply.id] != list(range(len(seqs[reply.id]))):
                            tally.fail(f"{mine[reply.id].label}: replies numbered {seqs[reply.id]}")
    finally:
        sock.close(linger=0)


def send_req(endpoint: str, cases: Sequence[Case], tally: Tally, wait_ms: int = REPLY_WAIT_MS) -> None:
    """A real REQ socket: one request, then its one reply, which must carry that request's id
    (a second reply to an earlier request would arrive here instead)."""
    sock = connect(endpoint, zmq.REQ)
    try:
        for case in cases:
            tally.send(sock, case.frames)
            if not sock.poll(wait_ms):
                raise AssertionError(f"{case.label}: no reply")
            reply = decode_reply(sock.recv_multipart())
            tally.reply(reply)
            if reply.id != reply_id([b"", *case.frames]) or not reply.final:
                raise AssertionError(f"{case.label}: got {reply.id} seq {reply.seq} final {reply.final}")
            tally.check(case, reply, 1)
    finally:
        sock.close(linger=0)


@dataclass
class Sampler:
    """hello round trips from a socket of its own, and the service's resident memory
    (``rss``, MiB), sampled until ``stop`` is set."""

    endpoint: str
    rss: Callable[[], float]
    stop: threading.Event = field(default_factory=threading.Event)
    hello_ms: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)
    unanswered: int = 0
    wrong: list[str] = field(default_factory=list)
    wait_ms: int = REPLY_WAIT_MS

    def run(self) -> None:
        sock = connect(self.endpoint)
        try:
            for i in itertools.count():
                if self.stop.is_set():
                    return
                self.rss_mib.append(self.rss())
                t0 = time.perf_counter()
                sock.send_multipart(request("hello", rid=f"sample-{i}"))
                if not sock.poll(self.wait_ms):
                    self.unanswered += 1
                    sock.close(linger=0)
                    sock = connect(self.endpoint)
                    continue
                reply = receive(sock)
                self.hello_ms.append((time.perf_counter() - t0) * 1000)
                if not reply.ok or reply.id != f"sample-{i}" or reply.result.get("protocol") != 1:
                    self.wrong.append(f"{reply.id} {outcome(reply)}")
                self.stop.wait(0.02)
        finally:
            sock.close(linger=0)


def rss_mib(pid: int | str = "self") -> float:
    """Resident memory of a process, MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, NaN for no values."""
    return float(np.percentile(values, q)) if values else float("nan")
