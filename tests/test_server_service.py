"""The service over real loopback sockets: every operation, errors, several clients, vanishing clients."""

from __future__ import annotations

import logging

import importlib.util
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from PIL import Image
from plyfile import PlyData

from backend.gaussians.avatar import Avatar, deform
from backend.gaussians.files import avatar_from_bytes, avatar_to_bytes
from backend.head.model import HeadModel
from backend.server.config import RequestLimits
from backend.server.service import Service
from backend.wire.client import Client, can_share
from backend.wire.protocol import ErrorCode, WireError, decode_reply, encode_request
from backend.wire.windows import full_frame
from tests.hostile_messages import connect
from tests.test_server_support import flame_buffers, front_camera, npz_buffer, reference_render, service_thread, small_avatar

SIZE = 64


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, head: HeadModel) -> Iterator[tuple[Service, Client, str, Avatar]]:
    """One service with one imported avatar for the whole module, configured with a generator
    checkpoint that does not exist (as on an install without the weights)."""
    store = tmp_path_factory.mktemp("store")
    with service_thread(store, generator=store / "missing-generator.pt") as service:
        client = Client(service.endpoint, timeout_s=30, retries=0)
        avatar = small_avatar(head)
        aid = client.call("import", {"name": "test head"}, {"file": npz_buffer(avatar)}).result["avatar"]["id"]
        try:
            yield service, client, aid, avatar
        finally:
            client.close()


def render_request(aid: str, head: HeadModel, frames: int, **args: object) -> tuple[dict, dict]:
    K, w2c = front_camera(SIZE)
    return {"avatar": aid, "width": SIZE, "height": SIZE} | args, flame_buffers(head, frames) | {"intrinsics": K, "world_to_cam": w2c}


def error_of(client: Client, op: str, args: dict | None = None, arrays: dict | None = None) -> WireError:
    with pytest.raises(WireError) as info:
        client.call(op, args, arrays)
    return info.value


def png_bytes(size: int = 32) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(buf, "PNG")
    return np.frombuffer(buf.getvalue(), np.uint8)


def test_hello_says_what_the_service_can_do(served) -> None:
    _, client, _, _ = served
    hello = client.call("hello").result
    assert hello["protocol"] == 1 and hello["device"] == "cpu" and "reference" in hello["rasterizer"]
    caps = hello["capabilities"]
    assert caps["render"]["available"] and caps["deform"]["available"] and caps["refine"]["available"]
    assert caps["track"]["available"] == (importlib.util.find_spec("mediapipe") is not None)
    assert not caps["generate"]["available"] and "generator checkpoint" in caps["generate"]["reason"]
    assert hello["head"]["name"] == "builtin-v1" and hello["secure"] is False
    limits, requests = hello["limits"], RequestLimits()
    assert (limits["max_video_frames"], limits["max_video_seconds"], limits["max_video_side"], limits["min_video_side"]) == (
        requests.max_video_frames, requests.max_video_seconds, requests.max_video_side, requests.min_video_side
    )
    assert limits["stream_window"] >= 1 and limits["stream_stall_s"] > 0


def test_hello_offers_generate_with_the_shipped_weights(tmp_path: Path) -> None:
    with service_thread(tmp_path / "store") as service, Client(service.endpoint, timeout_s=30, retries=0) as client:
        hello = client.call("hello").result
        assert hello["capabilities"]["generate"]["available"]
        assert hello["capabilities"]["generate"]["head"] == hello["head"]["name"]  # trained on the head it serves


def test_hello_refuses_generate_with_weights_of_another_head(tmp_path: Path) -> None:
    """Weights trained on another head: hello says so per head (which one they fit, how to
    train for this one), and generate is refused before any portrait is tracked."""
    from backend.generate.checkpoint import save_generator
    from backend.generate.model import Generator, preset
    from tests.test_generate_support import tiny_head

    other = save_generator(Generator.for_head(preset("tiny"), tiny_head()).eval(), tmp_path / "generator.pt")
    with service_thread(tmp_path / "store", generator=other) as service, Client(service.endpoint, timeout_s=30, retries=0) as client:
        generate = client.call("hello").result["capabilities"]["generate"]
        assert not generate["available"]
        assert f"trained on head model '{tiny_head().name}'" in generate["reason"] and "spatialavatar train --head builtin" in generate["reason"]
        with pytest.raises(WireError) as caught:
            client.call("generate", {}, {"portrait0": png_bytes()})
        assert caught.value.code == ErrorCode.NOT_AVAILABLE and "trained on head model" in str(caught.value)


def test_store_operations(served, head: HeadModel) -> None:
    _, client, aid, avatar = served
    listed = {a["id"]: a for a in client.call("list").result["avatars"]}
    assert listed[aid]["name"] == "test head" and listed[aid]["gaussians"] == avatar.count
    got = client.call("get", {"id": aid, "buffers": True})
    np.testing.assert_array_equal(got.arrays["offset"], avatar.local.offset.numpy())
    np.testing.assert_array_equal(got.arrays["face_idx"], avatar.binding.face_idx.numpy())
    np.testing.assert_array_equal(got.arrays["sh"], avatar.local.sh.numpy())
    npz = client.call("export", {"avatar": aid, "format": "npz"}).arrays["file"]
    again = avatar_from_bytes(npz.tobytes())
    torch.testing.assert_close(again.local.log_scale, avatar.local.log_scale)
    ply = client.call("export", {"avatar": aid, "format": "ply"}).arrays["file"]
    assert PlyData.read(io.BytesIO(ply.tobytes()))["vertex"].count == avatar.count
    other = client.call("import", {"name": "second"}, {"file": npz_buffer(small_avatar(head, 1000, seed=1))}).result["avatar"]["id"]
    assert client.call("delete", {"id": other}).result == {"deleted": other}
    assert other not in {a["id"] for a in client.call("list").result["avatars"]}
    assert error_of(client, "get", {"id": other}).code == ErrorCode.NOT_FOUND


def test_deform_matches_the_backend(served, head: HeadModel) -> None:
    _, client, aid, avatar = served
    buffers = flame_buffers(head, 3, seed=4)
    replies = list(client.stream("deform", {"avatar": aid, "statics": True}, buffers))
    assert [r.seq for r in replies] == [0, 1, 2] and [r.final for r in replies] == [False, False, True]
    params = head.neutral_params(3)
    for name, value in buffers.items():
        setattr(params, name, torch.from_numpy(value.copy()))
    with torch.no_grad():
        splats = deform(avatar, head, avatar.params_for(params))
    for t, r in enumerate(replies):
        np.testing.assert_allclose(r.arrays["positions"], splats.means[t].numpy(), atol=1e-6)
        np.testing.assert_allclose(r.arrays["scales"], splats.scales[t].numpy(), rtol=1e-5)
    assert "opacities" in replies[0].arrays and "opacities" not in replies[1].arrays
    small = list(client.stream("deform", {"avatar": aid, "max_gaussians": 100}, buffers))
    index = small[0].arrays["index"]
    assert index.shape == (100,) and len(np.unique(index)) == 100
    np.testing.assert_allclose(small[2].arrays["positions"], splats.means[2].numpy()[index], atol=1e-6)


def test_render_matches_the_backend_and_streams_in_order(served, head: HeadModel) -> None:
    _, client, aid, avatar = served
    args, arrays = render_request(aid, head, 3)
    replies = list(client.stream("render", args, arrays))
    assert [r.result["frame"] for r in replies] == [0, 1, 2] and replies[-1].final
    assert all(r.result["render_ms"] > 0 for r in replies)
    for r, (rgba, depth) in zip(replies, reference_render(avatar, head, arrays, SIZE)):
        np.testing.assert_allclose(r.arrays["rgba"], rgba, atol=1e-5)
        np.testing.assert_allclose(r.arrays["depth"], depth, atol=1e-5)
    assert replies[0].arrays["rgba"][..., 3].max() > 0.9  # the head is in view
    args, arrays = render_request(aid, head, 1, rgba="<u1", depth="none", background=[1.0, 1.0, 1.0])
    reply = client.call("render", args, arrays)
    assert reply.arrays["rgba"].dtype == np.uint8 and "depth" not in reply.arrays
    assert reply.arrays["rgba"][0, 0, :3].tolist() == [255, 255, 255]


def test_a_cropped_render_is_the_whole_frame_put_back_together(served, head: HeadModel) -> None:
    _, client, aid, _ = served
    args, arrays = render_request(aid, head, 2)
    # In frame 1 the head is behind the camera: an empty window.
    away = arrays["world_to_cam"][None].repeat(2, 0)
    away[1, 2, 3] = -away[1, 2, 3]
    arrays = arrays | {"world_to_cam": away}
    whole = list(client.stream("render", args, arrays))
    cropped = list(client.stream("render", args | {"crop": True}, arrays))
    x, y, w, h = cropped[0].result["window"]
    assert 0 < w * h < SIZE * SIZE and cropped[0].arrays["rgba"].shape == (h, w, 4)
    alpha = cropped[0].arrays["rgba"][..., 3]
    assert min(alpha[0].max(), alpha[-1].max(), alpha[:, 0].max(), alpha[:, -1].max()) > 0  # tight on every side
    assert cropped[1].result["window"] == [0, 0, 0, 0] and cropped[1].arrays["depth"].shape == (0, 0)
    for a, b in zip(whole, cropped):
        restored = full_frame(b.arrays, b.result, SIZE, SIZE)
        for name in ("rgba", "depth"):
            np.testing.assert_array_equal(restored[name], a.arrays[name])
    assert "leave out 'background'" in str(error_of(client, "render", args | {"crop": True, "background": [0.0, 0.0, 0.0]}, arrays))
    assert "'crop' must be true or false" in str(error_of(client, "render", args | {"crop": "yes"}, arrays))
    assert "'shared_memory' must be true or false" in str(error_of(client, "render", args | {"shared_memory": 1}, arrays))


def test_full_frame_refuses_a_window_that_does_not_fit() -> None:
    arrays = {"rgba": np.ones((2, 3, 4), np.float32)}
    assert full_frame(arrays, {}, 8, 8)["rgba"].shape == (2, 3, 4)  # no window: the whole frame already
    assert full_frame(arrays, {"window": [5, 6, 3, 2]}, 8, 8)["rgba"][6:, 5:].all()
    for window, words in (([6, 0, 3, 2], "does not fit"), ([0, 0, 2, 3], "its window"), ([0, 0, -1, 2], "non-negative"), ("x", "[x, y, w, h]")):
        with pytest.raises(WireError, match=words.replace("[", r"\[")):
            full_frame(arrays, {"window": window}, 8, 8)


@pytest.mark.parametrize(
    "op, args, arrays, code, words",
    [
        ("nope", {}, {}, ErrorCode.UNKNOWN_OP, "unknown operation 'nope'"),
        ("hello", {"path": "/etc/passwd"}, {}, ErrorCode.INVALID_ARGUMENT, "unknown argument 'path'"),
        ("render", {"avatar": "av_0123456789abcdef", "width": 8, "height": 8}, {}, ErrorCode.NOT_FOUND, "no avatar"),
        ("get", {"id": "../../etc/passwd"}, {}, ErrorCode.INVALID_ARGUMENT, "'id'"),
        ("list", {"kind": "files"}, {}, ErrorCode.INVALID_ARGUMENT, "'kind' must be one of"),
        ("import", {}, {"file": np.frombuffer(b"PK\x03\x04 not really", np.uint8)}, ErrorCode.INVALID_ARGUMENT, "the uploaded file"),
        (
            "track",
            {},
            {"image0": np.frombuffer(b"not an image", np.uint8)},
            ErrorCode.INVALID_ARGUMENT,
            "'image0' is not a decodable image",
        ),
        (
            "track",
            {},
            {"image0": png_bytes(), "video": np.frombuffer(b"\0\0\0\0ftypisom", np.uint8)},
            ErrorCode.INVALID_ARGUMENT,
            "either portraits",
        ),
        ("track", {}, {"image1": png_bytes()}, ErrorCode.INVALID_ARGUMENT, "image0, image1"),
        ("track", {}, {"video": np.frombuffer(b"\0" * 64, np.uint8)}, ErrorCode.INVALID_ARGUMENT, "not an MP4"),
        ("generate", {}, {f"portrait{i}": png_bytes() for i in range(5)}, ErrorCode.INVALID_ARGUMENT, "1 to 4 portraits"),
        ("generate", {}, {"portrait0": png_bytes(), "portrait1": png_bytes()}, ErrorCode.NOT_AVAILABLE, "generator checkpoint"),
        ("generate", {"frames": "0"}, {"portrait0": png_bytes()}, ErrorCode.INVALID_ARGUMENT, "'frames' picks views"),
        ("cancel", {"job": "jb_0123456789abcdef"}, {}, ErrorCode.NOT_FOUND, "no job"),
    ],
)
def test_bad_requests_get_a_code_and_a_sentence(served, op: str, args: dict, arrays: dict, code: ErrorCode, words: str) -> None:
    service, client, _, _ = served
    err = error_of(client, op, args, arrays)
    assert err.code == code and words in str(err)
    assert str(service.store.root) not in str(err)  # no server paths in messages


def test_render_arguments_are_checked(served, head: HeadModel) -> None:
    _, client, aid, _ = served
    args, arrays = render_request(aid, head, 2)
    bent = arrays | {"world_to_cam": np.diag([1.0, 2.0, 1.0, 1.0]).astype("<f4")}
    assert "rigid transforms" in str(error_of(client, "render", args, bent))
    assert "'width' must be an integer" in str(error_of(client, "render", args | {"width": 0}, arrays))
    assert "[2, 3, 3], got [3, 3, 3]" in str(
        error_of(client, "render", args, arrays | {"intrinsics": np.eye(3, dtype="<f4")[None].repeat(3, 0)})
    )
    assert "'rotation' must have shape [2, 3]" in str(error_of(client, "render", args, arrays | {"rotation": np.zeros((2, 4), "<f4")}))


def test_an_avatar_of_another_head_model_is_refused(served, head: HeadModel) -> None:
    _, client, _, _ = served
    foreign = small_avatar(head, 1000)
    foreign.head_fingerprint = "0000000000000000"
    assert error_of(client, "import", {}, {"file": np.frombuffer(avatar_to_bytes(foreign), np.uint8)}).code == ErrorCode.INCOMPATIBLE


def test_non_blocking_poll_mode(served, head: HeadModel) -> None:
    service, _, aid, _ = served
    with Client(service.endpoint, timeout_s=30) as client:
        render_id = client.submit("render", *render_request(aid, head, 4))
        hello_id = client.submit("hello")
        got: dict[str, list] = {render_id: [], hello_id: []}
        deadline = time.monotonic() + 60
        while client.pending and time.monotonic() < deadline:
            for reply in client.poll():  # never blocks
                got[reply.id].append(reply)
            time.sleep(0.005)
        assert [r.seq for r in got[render_id]] == [0, 1, 2, 3] and got[render_id][-1].final
        assert got[hello_id][0].ok


def test_a_req_socket_works_too(served) -> None:
    service, _, _, _ = served
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(service.endpoint)
    try:
        sock.send_multipart(encode_request("hello")[1])
        assert sock.poll(10_000)
        assert decode_reply(sock.recv_multipart()).result["protocol"] == 1
    finally:
        sock.close()


def test_several_clients_at_once(served, head: HeadModel) -> None:
    service, _, aid, _ = served
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with Client(service.endpoint, timeout_s=60) as client:
                for _ in range(3):
                    assert client.call("hello").ok
                    frames = list(client.stream("render", *render_request(aid, head, 2)))
                    assert [f.seq for f in frames] == [0, 1]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def _long_stream(service: Service, aid: str, head: HeadModel, rcvhwm: int = 1000) -> zmq.Socket:
    """A raw socket that asked for a 200-frame 256x256 render and read one frame."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.connect(service.endpoint)
    K, w2c = front_camera(256)
    args = {"avatar": aid, "width": 256, "height": 256}
    sock.send_multipart(encode_request("render", args, flame_buffers(head, 200) | {"intrinsics": K, "world_to_cam": w2c})[1])
    assert sock.poll(30_000)
    assert decode_reply(sock.recv_multipart()).seq == 0
    return sock


def test_a_client_that_vanishes_mid_stream_does_not_wedge_the_service(served, head: HeadModel, caplog: pytest.LogCaptureFixture) -> None:
    service, client, aid, _ = served
    caplog.set_level(logging.INFO, logger="spatialavatar.server")
    _long_stream(service, aid, head).close(linger=0)
    assert client.call("hello").ok
    assert client.call("render", *render_request(aid, head, 1)).final
    # The abandoned 200-frame stream was cut short rather than rendered to the end.
    assert "the rest of its stream is skipped" in caplog.text


def test_a_client_that_stops_reading_loses_its_stream(tmp_path: Path, head: HeadModel, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="spatialavatar.server")
    # A window as long as the stream: the stream cannot park for want of acknowledgements
    # (the other way a stream is dropped, tested below) before its 200 frames (39 MB) have
    # overrun ZeroMQ's queue and the loopback socket's buffers. With the default 16 frames
    # (3 MB), buffers that grow large enough took them all, and it parked instead.
    with service_thread(tmp_path / "store", send_hwm=2, send_timeout_s=0.2, stream_window=200) as service, Client(service.endpoint, timeout_s=30) as client:
        aid = client.call("import", {}, {"file": npz_buffer(small_avatar(head, 1000))}).result["avatar"]["id"]
        stuck = _long_stream(service, aid, head, rcvhwm=1)
        try:
            assert client.call("render", *render_request(aid, head, 1)).final
            assert "stopped reading" in caplog.text  # its stream was dropped, not waited on
        finally:
            stuck.close(linger=0)


def _raw_render(endpoint: str, args: dict, arrays: dict) -> list[list[zmq.Frame]]:
    """Every reply of one render request, undecoded, from a bare DEALER that never frees a slot."""
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        _, frames = encode_request("render", args, arrays)
        sock.send_multipart(frames)
        replies = []
        while not replies or not json.loads(replies[-1][0].bytes)["final"]:
            assert sock.poll(30_000), "no reply"
            replies.append(sock.recv_multipart(copy=False))
        return replies


def test_shared_memory_renders_equal_socket_renders(served, head: HeadModel) -> None:
    service, client, aid, _ = served
    hello = client.call("hello").result
    assert can_share(hello) and not can_share({"shared_memory": "/no/such/folder"}) and not can_share({"shared_memory": None})
    args, arrays = render_request(aid, head, 3)
    inline = list(client.stream("render", args, arrays))
    for crop in (False, True):
        shared = list(client.stream("render", args | {"shared_memory": True, "crop": crop}, arrays))
        for a, b in zip(inline, shared):
            restored = full_frame(b.arrays, b.result, SIZE, SIZE)
            for name in ("rgba", "depth"):
                np.testing.assert_array_equal(restored[name], a.arrays[name])
    # The buffers did skip the socket: a header and no binary frame.
    raw = _raw_render(service.endpoint, args | {"shared_memory": True}, arrays)
    assert all(len(r) == 1 and "shared" in json.loads(r[0].bytes) for r in raw)
    assert len(list(service.slots.folder.iterdir())) <= service.config.shared_slots


def test_when_every_slot_is_taken_frames_travel_inline(tmp_path: Path, head: HeadModel) -> None:
    with service_thread(tmp_path / "store", shared_slots=2) as service:
        client = Client(service.endpoint, timeout_s=30, retries=0)
        try:
            aid = client.call("import", {"name": "head"}, {"file": npz_buffer(small_avatar(head))}).result["avatar"]["id"]
            args, arrays = render_request(aid, head, 3)
            raw = _raw_render(service.endpoint, args | {"shared_memory": True}, arrays)  # never frees its slots
            assert ["shared" in json.loads(r[0].bytes) for r in raw] == [True, True, False]
            assert len(raw[2]) == 3  # header, rgba, depth
            expected = list(client.stream("render", args, arrays))
            assert decode_reply(raw[2]).arrays["rgba"].tobytes() == expected[2].arrays["rgba"].tobytes()
        finally:
            client.close()
    assert not service.slots.folder.exists()  # the service removes its slots when it stops


def test_a_reply_the_client_cannot_read_fails_its_request() -> None:
    """A stand-in service (a bare ROUTER) answers with shared buffers in a slot that is not
    there, as a service on another machine would: the request fails with the reason instead
    of waiting out its timeout and retrying."""
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as router:
        router.setsockopt(zmq.LINGER, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        with Client(f"tcp://127.0.0.1:{port}", timeout_s=60, retries=0) as client:
            rid = client.submit("render", {"shared_memory": True})
            assert router.poll(10_000)
            ident = router.recv_multipart()[0]
            header = {"protocol": 1, "id": rid, "op": "render", "status": "ok", "seq": 0, "final": True, "result": {},
                      "buffers": [{"name": "rgba", "dtype": "<f4", "shape": [1]}],
                      "shared": {"path": "/nowhere/spatialavatar-frames-1-x/slot-0", "generation": 1, "offsets": [64]}}
            router.send_multipart([ident, json.dumps(header).encode()])
            replies: list = []
            while not replies:  # the client's own timeout (60 s) would end it with "no reply from"
                replies = client.poll(100)
            assert replies[0].error is not None and replies[0].error.code == ErrorCode.MALFORMED
            assert "bad reply" in replies[0].error.message and "cannot map" in replies[0].error.message
            assert client.pending == []


EMPTY_BUT_HUGE = [{"name": "expr", "dtype": "<f4", "shape": [0, 10**30]}]


def test_a_buffer_of_zero_size_but_huge_shape_is_answered_malformed(served) -> None:
    """Over a real DEALER socket: the descriptor holds no bytes, so only its dimensions can
    be wrong; the service answers malformed (it used to send nothing) and keeps serving."""
    service, client, _, _ = served
    sock = connect(service.endpoint)
    try:
        header = {"protocol": 1, "id": "huge1", "op": "hello", "args": {}, "buffers": EMPTY_BUT_HUGE}
        sock.send_multipart([b"", json.dumps(header).encode(), b""])
        assert sock.poll(10_000), "no reply to a malformed buffer descriptor"
        reply = decode_reply(sock.recv_multipart()[1:])
        assert reply.id == "huge1" and reply.error is not None and reply.error.code == ErrorCode.MALFORMED
        assert "buffers[0].shape" in reply.error.message
    finally:
        sock.close()
    assert client.call("hello").result["protocol"] == 1


def test_a_reply_with_a_zero_size_but_huge_buffer_fails_its_request() -> None:
    """A stand-in service (a bare ROUTER) answers with such a descriptor: the client fails
    the request as malformed at once instead of raising from its poll or waiting it out."""
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as router:
        router.setsockopt(zmq.LINGER, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        with Client(f"tcp://127.0.0.1:{port}", timeout_s=60, retries=0) as client:
            rid = client.submit("hello")
            assert router.poll(10_000)
            ident = router.recv_multipart()[0]
            header = {"protocol": 1, "id": rid, "op": "hello", "status": "ok", "seq": 0, "final": True, "result": {}, "buffers": EMPTY_BUT_HUGE}
            router.send_multipart([ident, json.dumps(header).encode(), b""])
            replies: list = []
            while not replies:
                replies = client.poll(100)
            assert replies[0].error is not None and replies[0].error.code == ErrorCode.MALFORMED
            assert "buffers[0].shape" in replies[0].error.message and client.pending == []


def test_a_default_socket_that_reads_nothing_gets_a_window_then_a_dropped_stream(tmp_path: Path, head: HeadModel, caplog: pytest.LogCaptureFixture) -> None:
    """Default service settings and a raw DEALER with default options (its I/O thread
    drains the socket whether or not the program reads): a 200-frame render runs at most
    one window of replies ahead of acknowledgements, then is dropped with a final 'busy'
    reply, and the service goes on serving."""
    caplog.set_level(logging.INFO, logger="spatialavatar.server")
    with service_thread(tmp_path / "store") as service, Client(service.endpoint, timeout_s=60) as client:
        window = client.call("hello").result["limits"]["stream_window"]
        aid = client.call("import", {}, {"file": npz_buffer(small_avatar(head, 1000))}).result["avatar"]["id"]
        sock = connect(service.endpoint)
        try:
            K, w2c = front_camera(32)
            sock.send_multipart(encode_request("render", {"avatar": aid, "width": 32, "height": 32}, flame_buffers(head, 200) | {"intrinsics": K, "world_to_cam": w2c})[1])
            replies = []
            while not replies or not replies[-1].final:
                assert sock.poll(30_000), f"no final reply after {len(replies)} replies"
                replies.append(decode_reply(sock.recv_multipart()))
        finally:
            sock.close()
        assert len(replies) == window + 1 and [r.seq for r in replies] == list(range(window + 1))
        assert replies[-1].error is not None and replies[-1].error.code == ErrorCode.BUSY and "stream dropped" in replies[-1].error.message
        assert "its stream is dropped" in caplog.text
        assert client.call("render", *render_request(aid, head, 1)).final


def test_a_reading_client_gets_a_stream_longer_than_the_window(served, head: HeadModel) -> None:
    """The client library acknowledges each reply, so a 40-frame stream arrives whole."""
    _, client, aid, _ = served
    window = client.call("hello").result["limits"]["stream_window"]
    frames = 40
    assert frames > 2 * window
    replies = list(client.stream("render", *render_request(aid, head, frames)))
    assert [r.seq for r in replies] == list(range(frames)) and replies[-1].final and all(r.error is None for r in replies)
