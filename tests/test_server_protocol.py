"""The wire protocol on its own: round trips, strict decoding, shared-memory replies, the loopback rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from backend.server.args import Args
from backend.wire import operations as ops
from backend.wire.operations import Flag, Float, Int, Operation, Text
from backend.wire.protocol import (
    ACK,
    DTYPES,
    ErrorCode,
    Limits,
    WireError,
    decode_reply,
    decode_request,
    encode_error,
    encode_reply,
    encode_request,
    salvage_id,
)
from backend.wire.security import check_bind, is_loopback
from backend.wire.shared_frames import SlotPool, SlotReader

BYTE_ORDERS = ("<", ">", "=")


@st.composite
def any_array(draw) -> np.ndarray:  # type: ignore[no-untyped-def]
    """An array of a wire dtype, in any byte order and memory layout, finite when floating."""
    code = draw(st.sampled_from(DTYPES))
    dtype = np.dtype(code).newbyteorder(draw(st.sampled_from(BYTE_ORDERS)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    elements = st.floats(-1e4, 1e4, width=16 if code == "<f2" else 32) if code[1] == "f" else None
    a = draw(hnp.arrays(dtype, shape, elements=elements))
    return a.T if draw(st.booleans()) else a  # Fortran order too


def _names(n: int) -> list[str]:
    return [f"b{i}" for i in range(n)]


@settings(max_examples=300, deadline=None)
@given(st.lists(any_array(), max_size=4), st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=3))
def test_request_round_trip_every_dtype_byte_order_and_shape(arrays: list[np.ndarray], args: dict) -> None:
    named = dict(zip(_names(len(arrays)), arrays))
    rid, frames = encode_request("render", args, named)
    req = decode_request([bytes(f) for f in frames])
    assert (req.id, req.op, req.args) == (rid, "render", args)
    assert list(req.arrays) == list(named)
    for name, a in named.items():
        got = req.arrays[name]
        assert got.dtype.str.replace("|", "<") == np.dtype(a.dtype).newbyteorder("<").str.replace("|", "<")
        assert got.shape == a.shape
        np.testing.assert_array_equal(got, a)


@settings(max_examples=100, deadline=None)
@given(st.lists(any_array(), max_size=3), st.integers(0, 1000), st.booleans())
def test_reply_round_trip(arrays: list[np.ndarray], seq: int, final: bool) -> None:
    named = dict(zip(_names(len(arrays)), arrays))
    reply = decode_reply([bytes(f) for f in encode_reply("abc", "deform", {"frame": 3}, named, seq, final)])
    assert (reply.id, reply.op, reply.ok, reply.seq, reply.final, reply.result) == ("abc", "deform", True, seq, final, {"frame": 3})
    for name, a in named.items():
        np.testing.assert_array_equal(reply.arrays[name], a)


def test_error_reply_round_trip() -> None:
    reply = decode_reply(encode_error("abc", "get", ErrorCode.NOT_FOUND, "no avatar av_0"))
    assert not reply.ok and reply.final
    assert reply.error is not None and reply.error.code == ErrorCode.NOT_FOUND
    with pytest.raises(WireError, match="get: no avatar av_0"):
        reply.raise_for_error()


def _request(header: dict, *buffers: bytes) -> list[bytes]:
    return [json.dumps(header).encode(), *buffers]


GOOD = {"protocol": 1, "id": "r1", "op": "render", "args": {}, "buffers": [{"name": "expr", "dtype": "<f4", "shape": [2]}]}
F8 = np.zeros(2, "<f4").tobytes()


@pytest.mark.parametrize(
    "frames, code, words",
    [
        ([], ErrorCode.MALFORMED, "empty message"),
        ([b"\xff\xfe"], ErrorCode.MALFORMED, "UTF-8"),
        ([b"{not json"], ErrorCode.MALFORMED, "not valid JSON"),
        ([b"[1, 2]"], ErrorCode.MALFORMED, "JSON object"),
        ([b'{"protocol": NaN}'], ErrorCode.MALFORMED, "NaN is not allowed"),
        (_request(GOOD | {"protocol": 2}, F8), ErrorCode.UNSUPPORTED_VERSION, "speaks protocol 1"),
        (_request(GOOD | {"protocol": True}, F8), ErrorCode.MALFORMED, "'protocol'"),
        (_request(GOOD | {"id": "../x y"}, F8), ErrorCode.MALFORMED, "'id'"),
        (_request(GOOD | {"op": "Render"}, F8), ErrorCode.MALFORMED, "'op'"),
        (_request(GOOD | {"extra": 1}, F8), ErrorCode.MALFORMED, "'extra'"),
        (_request(GOOD | {"args": []}, F8), ErrorCode.MALFORMED, "'args'"),
        (_request(GOOD), ErrorCode.MALFORMED, "1 buffers but the message has 0"),
        (_request(GOOD, F8[:-1]), ErrorCode.MALFORMED, "buffer 'expr' should hold 8 bytes"),
        (_request(GOOD | {"buffers": [{"name": "expr", "dtype": ">f4", "shape": [2]}]}, F8), ErrorCode.MALFORMED, "buffers[0].dtype"),
        (_request(GOOD | {"buffers": [{"name": "expr", "dtype": "<f8", "shape": [1]}]}, F8), ErrorCode.MALFORMED, "buffers[0].dtype"),
        (_request(GOOD | {"buffers": [{"name": "expr", "dtype": "<f4", "shape": [-2]}]}, F8), ErrorCode.MALFORMED, "buffers[0].shape"),
        (_request(GOOD | {"buffers": [{"name": "expr", "dtype": "<f4", "shape": [2**62, 2**62]}]}, F8), ErrorCode.MALFORMED, "buffers[0].shape"),
        (_request(GOOD | {"buffers": [{"name": "expr", "dtype": "<f4", "shape": [0, 10**30]}]}, b""), ErrorCode.MALFORMED, "buffers[0].shape"),
        (_request(GOOD | {"buffers": [{"name": "EXPR", "dtype": "<f4", "shape": [2]}]}, F8), ErrorCode.MALFORMED, "buffers[0].name"),
        (_request(GOOD, np.array([np.nan, 0], "<f4").tobytes()), ErrorCode.INVALID_ARGUMENT, "'expr' contains NaN"),
        (_request(GOOD, np.array([np.inf, 0], "<f4").tobytes()), ErrorCode.INVALID_ARGUMENT, "'expr' contains NaN or Inf"),
    ],
)
def test_decode_refuses_with_one_sentence_naming_the_field(frames: list[bytes], code: ErrorCode, words: str) -> None:
    with pytest.raises(WireError) as info:
        decode_request(frames)
    assert info.value.code == code
    assert words in str(info.value)


SHAPE_DIMS = [0, 1, 2, 7, 2**31, 2**62, 2**63, 2**64 + 3, 10**30, -1, -(2**63)]


@pytest.mark.parametrize("dtype", ["<f4", "|u1"])
def test_any_buffer_shape_decodes_or_is_refused_as_a_wire_error(dtype: str) -> None:
    """Every shape of one to three dimensions drawn from huge, negative, zero and overflowing
    values, with an empty and an 8-byte frame: decoding a request or a reply either succeeds
    with that shape or raises a WireError (which both sides answer or report), never
    anything else."""
    shapes = [[a] for a in SHAPE_DIMS] + [[a, b] for a in SHAPE_DIMS for b in SHAPE_DIMS] + [[0, a, b] for a in SHAPE_DIMS for b in SHAPE_DIMS]
    for shape in shapes:
        buffers = [{"name": "expr", "dtype": dtype, "shape": shape}]
        reply = {"protocol": 1, "id": "r1", "op": "render", "status": "ok", "seq": 0, "final": True, "result": {}, "buffers": buffers}
        for decode, header in ((decode_request, GOOD | {"buffers": buffers}), (decode_reply, reply)):
            for frame in (b"", b"\0" * 8):
                try:
                    decoded = decode(_request(header, frame))
                except WireError as exc:
                    assert exc.code in (ErrorCode.MALFORMED, ErrorCode.TOO_LARGE), (shape, exc)
                    continue
                assert list(decoded.arrays["expr"].shape) == shape


def test_size_limits() -> None:
    small = Limits(max_message_bytes=1000, max_header_bytes=200, max_buffers=2)
    with pytest.raises(WireError) as info:
        decode_request(_request(GOOD, b"\0" * 2000), small)
    assert info.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(WireError) as info:
        encode_request("render", {"text": "x" * 300}, limits=small)
    assert info.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(WireError) as info:
        encode_request("render", arrays={n: np.zeros(1, "<f4") for n in "abc"}, limits=small)
    assert info.value.code == ErrorCode.TOO_LARGE


def test_encode_refuses_dtypes_off_the_wire() -> None:
    for bad in (np.zeros(2, np.float64), np.zeros(2, bool), np.array(["a"])):
        with pytest.raises(WireError, match="cannot travel"):
            encode_request("x", arrays={"a": bad})


def test_salvage_id_of_broken_messages() -> None:
    header = dict(GOOD)
    assert salvage_id(_request(header)) == ("r1", "render")
    assert salvage_id([b"garbage"]) == ("-", "malformed")
    assert salvage_id(_request(header | {"id": 5, "op": "../"})) == ("-", "malformed")


class _Op(Operation):
    op = "render"
    width = Int(lo=1, hi=4096)
    flag = Flag(False)
    name = Text()
    scale = Float(None, "anti_spike.max_scale", lo=1e-3, hi=1e3)


def test_args_accessors_name_the_field() -> None:
    _, frames = encode_request("render", {"width": 0, "name": "x", "flag": "yes", "path": "/etc/passwd"}, {"expr": np.zeros((2, 3), "<f4")})
    a = Args(decode_request([bytes(f) for f in frames]))
    with pytest.raises(WireError, match="render: argument 'width' must be an integer in \\[1, 64\\], got 0"):
        a.int(_Op.width, hi=64)  # a limit of the service narrows the spec's range
    with pytest.raises(WireError, match="argument 'flag' must be true or false"):
        a.bool(_Op.flag)
    with pytest.raises(WireError, match="buffer 'expr' must have shape \\[\\*, 4\\]"):
        a.array("expr", ("<f4",), [(None, 4)])
    assert a.str(_Op.name) == "x"
    assert a.float(_Op.scale) is None  # absent: the configuration decides
    with pytest.raises(WireError, match="unknown argument 'path'"):
        a.done()


def test_operation_specs_build_requests_and_name_their_settings() -> None:
    assert _Op.width.name == "width" and set(_Op.specs()) == {"width", "flag", "name", "scale"}
    assert _Op.args(width=3, name="x", scale=None) == {"width": 3, "name": "x"}
    with pytest.raises(TypeError, match="render has no argument 'widht'"):
        _Op.args(widht=3)
    assert _Op.settings({"scale": 2.0}) == {"anti_spike.max_scale": 2.0}
    assert _Op.setting_names() == {"anti_spike.max_scale": "scale"}
    # Every operation the service answers has a spec class, and every class an operation.
    from backend.server.service import OPS, WATCH

    specs = {c.op for c in vars(ops).values() if isinstance(c, type) and issubclass(c, Operation) and c is not Operation}
    assert specs == {*OPS, WATCH, ACK}


@pytest.mark.parametrize(
    "endpoint, loopback",
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.0.0.2:*", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc://spatialavatar.sock", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://192.168.1.10:5555", False),
        ("tcp://eth0:5555", False),
        ("tcp://example.org:5555", False),
        ("nonsense", False),
    ],
)
def test_loopback_rule(endpoint: str, loopback: bool) -> None:
    assert is_loopback(endpoint) is loopback
    if loopback:
        check_bind(endpoint, None)
    else:
        with pytest.raises(Exception, match="refusing to bind"):
            check_bind(endpoint, None)


def test_shared_memory_replies_round_trip_and_refuse_what_does_not_fit() -> None:
    pool, reader = SlotPool(max_slots=2), SlotReader()
    try:
        rgba, depth = np.random.default_rng(0).random((5, 7, 4), np.float32), np.arange(35, dtype="<f4").reshape(5, 7)
        frames = encode_reply("r1", "render", {"frame": 0}, {"rgba": rgba, "depth": depth}, shared=pool.put)
        assert len(frames) == 1  # the buffers are in the slot
        header = json.loads(bytes(frames[0]))
        reply = decode_reply(frames, shared=reader)
        np.testing.assert_array_equal(reply.arrays["rgba"], rgba)
        np.testing.assert_array_equal(reply.arrays["depth"], depth)
        assert not reply.arrays["rgba"].flags.writeable
        # While the reply's arrays are held, its slot is not written again: another one is used.
        second = encode_reply("r2", "render", {}, {"rgba": rgba}, shared=pool.put)
        assert json.loads(bytes(second[0]))["shared"]["path"] != header["shared"]["path"]
        decode_reply(second, shared=reader)  # read and let go: that slot is free again
        np.testing.assert_array_equal(reply.arrays["rgba"], rgba)
        # Once they are gone, the slot is free: the next reply reuses it with a new generation.
        del reply
        again = json.loads(bytes(encode_reply("r3", "render", {}, {"rgba": rgba}, shared=pool.put)[0]))["shared"]
        assert again["path"] == header["shared"]["path"] and again["generation"] == header["shared"]["generation"] + 1
        with pytest.raises(WireError, match="read too late"):
            decode_reply(frames, shared=reader)  # the first reply's slot now holds the second
        with pytest.raises(WireError, match="did not ask for"):
            decode_reply(frames)
        for bad, words in (
            ({"path": "/etc/passwd"} | {k: header["shared"][k] for k in ("generation", "offsets")}, "does not name a frame slot"),
            (header["shared"] | {"offsets": [64, 1 << 40]}, "outside its slot"),
            (header["shared"] | {"offsets": [64]}, "one offset per buffer"),
            (header["shared"] | {"extra": 1}, "exactly"),
        ):
            forged = [json.dumps(header | {"shared": bad}).encode()]
            with pytest.raises(WireError, match=words):
                decode_reply(forged, shared=reader)
        with pytest.raises(WireError, match="only an ok reply without binary frames"):
            decode_reply([frames[0], b"\0" * 4], shared=reader)
        # Requests never name shared memory: the service maps no file a client names.
        _, request = encode_request("render", {}, {})
        with pytest.raises(WireError, match="'shared' is not part of protocol"):
            decode_request([json.dumps(json.loads(bytes(request[0])) | {"shared": header["shared"]}).encode()])
    finally:
        reader.close()
        pool.close()
    assert not pool.folder.exists()


def test_buffers_made_in_a_reserved_slot_are_published_without_a_copy() -> None:
    pool, reader = SlotPool(max_slots=1), SlotReader()
    try:
        rgba, depth = np.random.default_rng(1).random((5, 7, 4), np.float32), np.arange(35, dtype="<f4").reshape(5, 7)
        lent = pool.reserve([rgba.nbytes, depth.nbytes])
        made = {"rgba": lent[0].view("<f4").reshape(rgba.shape), "depth": lent[1].view("<f4").reshape(depth.shape)}
        made["rgba"][:], made["depth"][:] = rgba, depth
        frames = encode_reply("r1", "render", {}, made, shared=pool.put)
        reply = decode_reply(frames, shared=reader)
        np.testing.assert_array_equal(reply.arrays["rgba"], rgba)
        np.testing.assert_array_equal(reply.arrays["depth"], depth)
        # In place: the reply reads the very bytes that were lent (no copy went elsewhere).
        made["depth"][0, 0] = -1.0
        assert reply.arrays["depth"][0, 0] == -1.0
        # The only slot is held by that reply: nothing to lend, and replies travel inline.
        assert pool.reserve([16]) is None
        assert encode_reply("r2", "render", {}, {"rgba": rgba}, shared=pool.put)[1:] != []
        del reply
        # A reservation that the next reply does not use lapses: that reply is copied in.
        assert pool.reserve([rgba.nbytes]) is not None
        copied = decode_reply(encode_reply("r3", "render", {}, {"rgba": rgba + 1}, shared=pool.put), shared=reader)
        np.testing.assert_array_equal(copied.arrays["rgba"], rgba + 1)
    finally:
        reader.close()
        pool.close()


def test_a_new_slot_pool_removes_the_folders_of_dead_services() -> None:
    live = SlotPool(max_slots=1)
    root = live.folder.parent
    dead = root / "spatialavatar-frames-999999999-x1"  # beyond any pid this system hands out
    dead.mkdir()
    (dead / "slot-0").write_bytes(b"\0" * 64)
    try:
        fresh = SlotPool(max_slots=1)
        fresh.close()
        assert not dead.exists() and live.folder.exists()  # a live service's folder stays
    finally:
        live.close()
        shutil.rmtree(dead, ignore_errors=True)


def test_a_slot_held_past_its_lease_is_replaced_not_rewritten() -> None:
    pool, reader = SlotPool(max_slots=1, lease_s=0.0), SlotReader()
    try:
        first = np.arange(16, dtype="<f4")
        frames = encode_reply("r1", "render", {}, {"rgba": first}, shared=pool.put)
        old = Path(json.loads(bytes(frames[0]))["shared"]["path"])
        held = decode_reply(frames, shared=reader)
        second = encode_reply("r2", "render", {}, {"rgba": first + 1}, shared=pool.put)  # the only slot is held: replaced
        new = Path(json.loads(bytes(second[0]))["shared"]["path"])
        assert new != old and new.exists() and not old.exists()
        np.testing.assert_array_equal(held.arrays["rgba"], first)  # the holder still sees its own frame
        np.testing.assert_array_equal(decode_reply(second, shared=reader).arrays["rgba"], first + 1)
    finally:
        reader.close()
        pool.close()
