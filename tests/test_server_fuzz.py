"""1,000 malformed, truncated or hostile messages at a live service: each gets a reply, and afterwards
the service still answers correctly."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.head.model import HeadModel
from backend.server.client import Client
from backend.server.protocol import decode_reply, encode_request
from tests.test_server_support import flame_buffers, front_camera, npz_buffer, reference_render, service_thread, small_avatar

SIZE = 32
# Never "shutdown" (it would end the run) nor job submissions (they would start real work).
OPS = ("hello", "list", "get", "delete", "import", "export", "deform", "render", "track", "generate", "cancel", "resume", "watch")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, head: HeadModel) -> Iterator[tuple[str, str, list[list[bytes]]]]:
    """(endpoint, avatar id, a few well-formed requests to mutate)."""
    with service_thread(tmp_path_factory.mktemp("store")) as service:
        with Client(service.endpoint, timeout_s=30) as client:
            aid = client.call("import", {}, {"file": npz_buffer(small_avatar(head, 1000))}).result["avatar"]["id"]
        K, w2c = front_camera(SIZE)
        seeds = [
            encode_request("hello")[1],
            encode_request("get", {"id": aid, "buffers": True})[1],
            encode_request(
                "render", {"avatar": aid, "width": SIZE, "height": SIZE}, flame_buffers(head, 1) | {"intrinsics": K, "world_to_cam": w2c}
            )[1],
            encode_request("deform", {"avatar": aid, "max_gaussians": 10}, flame_buffers(head, 2))[1],
            encode_request("track", {}, {"image0": np.frombuffer(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, np.uint8)})[1],
        ]
        yield service.endpoint, aid, [[bytes(f) for f in frames] for frames in seeds]


@st.composite
def hostile(draw, seeds: list[list[bytes]]) -> list[bytes]:  # type: ignore[no-untyped-def]
    """A message built to be wrong in one way (or in none, now and then)."""
    frames = list(draw(st.sampled_from(seeds)))
    header = json.loads(frames[0])
    kind = draw(st.integers(0, 11))
    if kind == 0:  # random bytes
        return draw(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
    if kind == 1:  # truncated header text
        frames[0] = frames[0][: draw(st.integers(0, len(frames[0]) - 1))]
    elif kind == 2 and len(frames) > 1:  # truncated or padded buffer
        i = draw(st.integers(1, len(frames) - 1))
        frames[i] = frames[i][: draw(st.integers(0, max(len(frames[i]) - 1, 0)))] if draw(st.booleans()) else frames[i] + b"\0" * 4
    elif kind == 3 and len(frames) > 1:  # a buffer dropped or duplicated
        frames = frames[:-1] if draw(st.booleans()) else frames + frames[-1:]
    elif kind == 4:  # a header field replaced by any JSON value
        header[draw(st.sampled_from(sorted(header) + ["extra"]))] = draw(json_values)
    elif kind == 5:  # a header field removed
        header.pop(draw(st.sampled_from(sorted(header))))
    elif kind == 6 and header["buffers"]:  # a buffer descriptor changed
        d = header["buffers"][draw(st.integers(0, len(header["buffers"]) - 1))]
        d[draw(st.sampled_from(["name", "dtype", "shape"]))] = draw(
            json_values | st.sampled_from([">f4", "<f8", "|u1", "<f2", [10**30], [-1], [0], "../x"])
        )
    elif kind == 7:  # random arguments for a random operation
        header["op"] = draw(st.sampled_from(OPS) | st.text(max_size=10))
        header["args"] = draw(
            st.dictionaries(
                st.sampled_from(["avatar", "id", "job", "width", "height", "kind", "format", "name", "x"]), json_values, max_size=4
            )
        )
    elif kind == 8 and len(frames) > 1:  # NaN or Inf inside a float buffer
        for i, d in enumerate(header["buffers"], start=1):
            if d["dtype"] == "<f4" and len(frames[i]) >= 4:
                a = np.frombuffer(frames[i], "<f4").copy()
                a[draw(st.integers(0, len(a) - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
                frames[i] = a.tobytes()
                break
    elif kind == 9:  # non-UTF-8 or non-object header
        frames[0] = draw(st.sampled_from([b"\xff" * 8, b"[]", b"null", b"1e999", b'{"protocol": Infinity}', b"{" * 5000 + b"}" * 5000]))
        return frames
    elif kind == 10:  # ids that try to escape the store
        header["op"] = draw(st.sampled_from(["get", "delete", "export", "render"]))
        header["args"] = {
            draw(st.sampled_from(["id", "avatar"])): draw(
                st.sampled_from(
                    [
                        "../../etc/passwd",
                        "/etc/passwd",
                        "av_../../x",
                        "av_0123456789abcdef/../..",
                        "av_0123456789ABCDEF",
                        "av_0123456789abcdef\n",
                    ]
                )
            )
        }
    frames[0] = json.dumps(header).encode()
    return frames


def exchange(sock: zmq.Socket, frames: list[bytes]) -> list:
    """Send one message; return every reply up to the final one (a REQ-style delimiter is stripped)."""
    sock.send_multipart(frames)
    replies = []
    while True:
        assert sock.poll(20_000), f"no reply to {[f[:60] for f in frames]}"
        got = sock.recv_multipart()
        if got and got[0] == b"":
            got = got[1:]
        reply = decode_reply(got)
        replies.append(reply)
        if reply.final:
            return replies


def test_fuzz_then_still_correct(target, head: HeadModel) -> None:
    endpoint, aid, seeds = target
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    seen: dict[str, int] = {}

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(hostile(seeds))
    def one(frames: list[bytes]) -> None:
        last = exchange(sock, frames)[-1]
        outcome = str(last.error.code) if last.error else "ok"
        seen[outcome] = seen.get(outcome, 0) + 1
        assert outcome != "internal", last.error  # every bad input is caught by a check, none by accident

    try:
        one()
    finally:
        sock.close(linger=0)
    assert sum(seen.values()) >= 1000 and seen.get("ok", 0) < 200, seen
    with Client(endpoint, timeout_s=30) as client:
        assert client.call("hello").ok
        assert aid in {a["id"] for a in client.call("list").result["avatars"]}
        avatar_npz = client.call("export", {"avatar": aid}).arrays["file"]
        from backend.gaussians.files import avatar_from_bytes

        avatar = avatar_from_bytes(avatar_npz.tobytes())
        K, w2c = front_camera(SIZE)
        buffers = flame_buffers(head, 1, seed=9)
        reply = client.call("render", {"avatar": aid, "width": SIZE, "height": SIZE}, buffers | {"intrinsics": K, "world_to_cam": w2c})
        rgba, _ = reference_render(avatar, head, buffers, SIZE)[0]
        np.testing.assert_allclose(reply.arrays["rgba"], rgba, atol=1e-5)
