"""Hostile avatar files: everything that would break later is refused when the file enters,
naming the field, and nothing is inflated past what the headers allow.

The same files go through the real service's ``import`` (a service thread on loopback) and
come back as ``invalid_argument``, while the service keeps answering.
"""

from __future__ import annotations

import io
import json
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from backend.gaussians.files import FileLimits, avatar_arrays, avatar_from_bytes, check_fits_head, load_avatar
from backend.head.model import HeadModel
from backend.wire.client import Client
from backend.wire.errors import InputError
from backend.wire.protocol import ErrorCode, WireError, decode_reply, encode_request
from tests.hostile_messages import lying_sh_header
from tests.test_server_support import npz_buffer, service_thread, small_avatar


def _npz(arrays: dict[str, np.ndarray], compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _with(head: HeadModel, change: Callable[[dict[str, np.ndarray]], None]) -> bytes:
    arrays = avatar_arrays(small_avatar(head, count=1000))
    change(arrays)
    return _npz(arrays)


def _set(key: str, value: np.ndarray) -> Callable[[dict[str, np.ndarray]], None]:
    return lambda arrays: arrays.__setitem__(key, value)


# (case, how the file is spoilt, words the error must hold); each held a file that was
# accepted before and then failed inside render, deform, get or export.
SPOILT: list[tuple[str, Callable[[HeadModel], Callable[[dict[str, np.ndarray]], None]], str]] = [
    ("face index out of range", lambda h: lambda a: a["face_idx"].__setitem__(0, 10**6), "'face_idx'"),
    ("negative face index", lambda h: lambda a: a["face_idx"].__setitem__(0, -1), "'face_idx'"),
    ("static offset of the wrong length", lambda h: _set("static_offset", np.zeros((7, 3), "<f4")), "'static_offset'"),
    ("identity of the wrong length", lambda h: _set("shape", np.zeros(3, "<f4")), "'shape'"),
    ("SH degree 4", lambda h: lambda a: a.__setitem__("sh", np.zeros((a["sh"].shape[0], 25, 3), "<f4")), "SH degree 4"),
    ("NaN in the metadata", lambda h: _set("meta", np.array('{"a": NaN}')), "'meta'"),
    ("metadata larger than a reply header", lambda h: _set("meta", np.array(json.dumps({"a": "x" * 40_000}))), "'meta'"),
    ("version not a scalar", lambda h: _set("version", np.array([1, 1], "<i8")), "'version'"),
    ("texel outside the layout", lambda h: lambda a: a["texel"].__setitem__(0, [0, 10**6]), "'texel'"),
    ("unknown array", lambda h: _set("extra", np.zeros(4, "<f4")), "unknown"),
    ("metadata not an object", lambda h: _set("meta", np.array("[1, 2]")), "'meta'"),
    ("text where numbers belong", lambda h: _set("bary", np.array("abc")), "'bary'"),
]


def _refusal(head: HeadModel, data: bytes) -> str:
    with pytest.raises(InputError) as info:
        avatar = avatar_from_bytes(data, "upload")
        check_fits_head(avatar, head.data, "upload")
    return str(info.value)


@pytest.mark.parametrize("case, spoil, words", SPOILT, ids=[c for c, _, _ in SPOILT])
def test_a_spoilt_file_is_refused_naming_the_field(head: HeadModel, case: str, spoil: Callable, words: str) -> None:
    assert words in _refusal(head, _with(head, spoil(head)))


def test_a_good_file_passes_every_check(head: HeadModel, tmp_path: Path) -> None:
    avatar = small_avatar(head, count=1000)
    path = tmp_path / "a.npz"
    path.write_bytes(_npz(avatar_arrays(avatar)))
    loaded = load_avatar(path)
    check_fits_head(loaded, head.data, str(path))
    assert loaded.count == 1000 and loaded.meta == avatar.meta


def _peak_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
    except InputError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_a_decompression_bomb_is_refused_before_it_inflates(head: HeadModel) -> None:
    """A few hundred kB that inflate an unused 256 MiB array, and a header that declares a
    huge array over a small member: both refused, with a peak far below what they claim."""
    arrays = avatar_arrays(small_avatar(head, count=1000))
    bomb = _npz(arrays | {"junk": np.zeros(64 * 2**20, "<f4")}, compressed=True)
    assert len(bomb) < 2**20
    assert _peak_bytes(lambda: avatar_from_bytes(bomb)) < 16 * 2**20
    with pytest.raises(InputError, match="unknown member"):
        avatar_from_bytes(bomb)

    liar = lying_sh_header(arrays)
    assert _peak_bytes(lambda: avatar_from_bytes(liar, limits=FileLimits(max_gaussians=1000))) < 16 * 2**20
    with pytest.raises(InputError, match="'sh'"):
        avatar_from_bytes(liar, limits=FileLimits(max_gaussians=1000))
    with pytest.raises(InputError, match="truncated or corrupt|'sh'|other arrays"):
        avatar_from_bytes(liar)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, head: HeadModel) -> Iterator[tuple[object, Client]]:
    with service_thread(tmp_path_factory.mktemp("store")) as service:
        client = Client(service.endpoint, timeout_s=60, retries=0)
        try:
            yield service, client
        finally:
            client.close()


@pytest.mark.parametrize("case, spoil, words", SPOILT, ids=[c for c, _, _ in SPOILT])
def test_import_answers_invalid_argument_and_stores_nothing(served, head: HeadModel, case: str, spoil: Callable, words: str) -> None:
    _, client = served
    before = client.call("list").result
    with pytest.raises(WireError) as info:
        client.call("import", {"name": case}, {"file": np.frombuffer(_with(head, spoil(head)), np.uint8)})
    assert info.value.code == ErrorCode.INVALID_ARGUMENT and words in str(info.value)
    assert client.call("list").result == before


def test_hello_is_answered_while_an_import_is_read(served, head: HeadModel) -> None:
    """A large import and a hello sent right after it on one socket: the hello's reply comes
    first, because the import is read on the worker, not on the thread that answers."""
    service, client = served
    big = npz_buffer(small_avatar(head, count=200_000, seed=1))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(service.endpoint)  # type: ignore[attr-defined]
    try:
        sock.send_multipart([b"", *encode_request("import", {"name": "big"}, {"file": big}, request_id="imp")[1]])
        sock.send_multipart([b"", *encode_request("hello", request_id="hi")[1]])
        order = []
        for _ in range(2):
            assert sock.poll(120_000)
            order.append(decode_reply(sock.recv_multipart()[1:]).id)
        assert order == ["hi", "imp"]
    finally:
        sock.close()
