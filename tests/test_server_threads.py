"""The device worker sends its replies itself while the service thread reads the same socket:
a real ``spatialavatar serve`` process on loopback, with requests arriving while it streams."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from backend.head.flame_files import write_flame
from backend.head.model import HeadModel
from backend.wire.client import Client
from backend.wire.protocol import Reply, decode_reply, encode_request
from tests.test_server_support import ServiceProcess, flame_buffers, front_camera, npz_buffer, service_process, small_avatar

WAIT_MS = 60_000  # only decides when a stuck test fails
SIZE = 32


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, head: HeadModel) -> Iterator[tuple[ServiceProcess, str]]:
    flame = write_flame(head.data, tmp_path_factory.mktemp("flame"))
    with service_process(tmp_path_factory.mktemp("store"), flame=flame) as service, Client(service.endpoint, timeout_s=60) as client:
        aid = client.call("import", {"name": "threads"}, {"file": npz_buffer(small_avatar(head, 1000))}).result["avatar"]["id"]
        yield service, aid


def _dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _receive(sock: zmq.Socket) -> Reply:
    assert sock.poll(WAIT_MS), "no reply"
    return decode_reply(sock.recv_multipart())


def test_requests_that_come_while_the_worker_streams_are_all_answered(served, head: HeadModel) -> None:
    """Each of the worker's sends may take the socket's signal that a request came in; every
    request must still be read and answered, and the stream must arrive whole and in order."""
    service, aid = served
    frames = 40
    K, w2c = front_camera(SIZE)
    stream: list[Reply] = []
    errors: list[BaseException] = []

    def watch_stream() -> None:
        try:
            with Client(service.endpoint, timeout_s=60) as client:
                args = {"avatar": aid, "width": SIZE, "height": SIZE}
                stream.extend(client.stream("render", args, flame_buffers(head, frames) | {"intrinsics": K, "world_to_cam": w2c}))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    streaming = threading.Thread(target=watch_stream)
    streaming.start()
    sock = _dealer(service.endpoint)
    asked: list[str] = []
    answered: list[str] = []
    try:
        # Requests one after another for as long as the stream runs, and one after it ended.
        while True:
            running = streaming.is_alive()
            rid, message = encode_request("hello", request_id=f"h{len(asked)}")
            asked.append(rid)
            sock.send_multipart(message)
            reply = _receive(sock)
            assert reply.ok and reply.final
            answered.append(reply.id)
            if not running:
                break
        streaming.join(WAIT_MS / 1000)
    finally:
        sock.close(linger=0)
    assert not errors, errors
    assert answered == asked
    assert [r.seq for r in stream] == list(range(frames)) and stream[-1].final
    assert all(r.arrays["rgba"].shape == (SIZE, SIZE, 4) for r in stream)


def test_a_retried_import_gets_the_reply_the_worker_sent(served, head: HeadModel) -> None:
    """The worker remembers the replies of requests that must not run twice, the service
    thread answers their retries from that memory: the same avatar, stored once."""
    service, _ = served
    sock = _dealer(service.endpoint)
    try:
        _, message = encode_request("import", {"name": "retried"}, {"file": npz_buffer(small_avatar(head, 1000, seed=3))}, request_id="imp-retried")
        sock.send_multipart(message)
        first = _receive(sock)
        sock.send_multipart(message)  # what a Lazy Pirate retry sends after its timeout
        again = _receive(sock)
        _, listing = encode_request("list", {"kind": "avatars"})
        sock.send_multipart(listing)
        avatars = _receive(sock).result["avatars"]
    finally:
        sock.close(linger=0)
    assert first.ok and again.ok
    assert again.result["avatar"]["id"] == first.result["avatar"]["id"]
    assert [a["name"] for a in avatars].count("retried") == 1

