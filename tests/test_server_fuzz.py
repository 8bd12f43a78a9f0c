"""1,000 malformed, truncated or hostile messages at a live service: each gets a reply, and afterwards
the service still answers correctly. Then many clients at once (DEALER and REQ sockets on
threads of their own): mutated, oversized and many-frame messages, hostile job submissions
and hostile avatar files, with hello sampled throughout."""

from __future__ import annotations

import itertools
import json
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.gaussians.files import avatar_from_bytes
from backend.head.model import HeadModel
from backend.server.config import RequestLimits
from backend.server.service import Service
from backend.wire.client import Client
from backend.wire.protocol import ErrorCode, Limits, WireError, decode_reply, encode_request
from tests.hostile_messages import (
    ESCAPING_IDS,
    REPLY_WAIT_MS,
    Case,
    Sampler,
    Tally,
    connect,
    fuzz_cases,
    hostile_avatar_files,
    hostile_jobs,
    import_case,
    job_cases,
    outcome,
    percentile,
    receive,
    request,
    rss_mib,
    seed_requests,
    send_batches,
    send_req,
)
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
                st.sampled_from(ESCAPING_IDS)
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


# -- many clients at once -----------------------------------------------------------------

# Limits small enough to reach on the 2-core machine; the checks are the same at any size.
LOAD_LIMITS = Limits(max_message_bytes=8 * 2**20)
LOAD_REQUESTS = RequestLimits(max_upload_bytes=6 * 2**20, max_frames=16, max_gaussians=50_000)
DEALERS, REQS = 3, 2
FUZZ_PER_DEALER, FUZZ_PER_REQ, FUZZ_REQ_STYLE = 300, 200, 200


@dataclass
class Loaded:
    """A service with small limits, an avatar, a subject and a finished job in its store."""

    service: Service
    store: Path
    aid: str
    sid: str
    done_job: str
    seeds: list[list[bytes]]  # well-formed requests with exactly one reply
    stream_seeds: list[list[bytes]]  # well-formed requests with several


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, head: HeadModel) -> Iterator[Loaded]:
    store = tmp_path_factory.mktemp("loaded") / "store"
    with service_thread(store, limits=LOAD_LIMITS, requests=LOAD_REQUESTS) as service:
        with Client(service.endpoint, timeout_s=60) as client:
            aid = client.call("import", {"name": "base"}, {"file": npz_buffer(small_avatar(head, 1000))}).result["avatar"]["id"]
            job = client.call("synthesize", {"frames": 2, "size": 32, "reference_gaussians": 1000}).result["job"]
            done = client.call("watch", {"job": job["id"]}).result["job"]
            assert done["state"] == "done"
        sid = done["result"]["subject"]
        seeds, stream_seeds = seed_requests(head, aid, sid, job["id"], SIZE)
        yield Loaded(service, service.store.root, aid, sid, job["id"], seeds, stream_seeds)


def large_cases(loaded: Loaded, head: HeadModel) -> list[Case]:
    """Messages at and just past each limit of the loaded service, one after another."""
    lim, req = LOAD_LIMITS, LOAD_REQUESTS
    aid, n = loaded.aid, itertools.count()
    bad, big = frozenset({"invalid_argument"}), frozenset({"too_large"})

    def rid() -> str:
        return f"large-{next(n)}"

    def header_of(size: int) -> list[bytes]:
        same = rid()
        frames = request("hello", {"pad": ""}, rid=same)
        return request("hello", {"pad": "x" * (size - len(frames[0]))}, rid=same)

    K, w2c = front_camera(SIZE)
    cams = {"intrinsics": K, "world_to_cam": w2c}
    tiny = {f"b{i}": np.zeros(1, np.uint8) for i in range(lim.max_buffers + 1)}
    third = lim.max_message_bytes // 3 + 1
    fits = small_avatar(head, 45_000, seed=3)  # its .npz just under max_upload_bytes
    too_many = small_avatar(head, 60_000, seed=4)  # under max_upload_bytes, over max_gaussians
    assert len(npz_buffer(fits)) < req.max_upload_bytes and len(npz_buffer(too_many)) < req.max_upload_bytes
    at_header = header_of(lim.max_header_bytes)
    assert len(at_header[0]) == lim.max_header_bytes
    return [
        Case("header at the limit", at_header, bad),
        Case("header one byte over", header_of(lim.max_header_bytes + 1), big),
        Case("three frames over the message limit", request("hello", {}, {c: np.zeros(third, np.uint8) for c in "abc"}, rid()), big),
        Case("upload at the limit", request("import", {}, {"file": np.ones(req.max_upload_bytes, np.uint8)}, rid()), bad),
        Case("upload one byte over", request("import", {}, {"file": np.ones(req.max_upload_bytes + 1, np.uint8)}, rid()), big),
        Case("avatar near the upload limit", request("import", {"name": "large"}, {"file": npz_buffer(fits)}, rid()), frozenset({"ok"})),
        Case("avatar over max_gaussians", request("import", {"name": "hostile-many"}, {"file": npz_buffer(too_many)}, rid()), bad),
        Case("as many buffers as allowed", request("hello", {}, dict(list(tiny.items())[: lim.max_buffers]), rid()), bad),
        Case("one buffer too many", request("hello", {}, tiny, rid()), big),
        Case("2000 frames, none described", [request("hello", rid=rid())[0]] + [b""] * 2000, frozenset({"malformed"})),
        Case("a frame more than described", request("hello", {}, {"a": np.zeros(1, np.uint8)}, rid()) + [b"x"], frozenset({"malformed"})),
        Case(
            "a buffer described near the limit, sent short",
            [
                json.dumps(
                    {
                        "protocol": 1,
                        "id": rid(),
                        "op": "hello",
                        "buffers": [{"name": "a", "dtype": "<f4", "shape": [lim.max_message_bytes // 8]}],
                    }
                ).encode(),
                b"\0" * 64,
            ],
            frozenset({"malformed"}),
        ),
        Case(
            "max_frames frames",
            request("render", {"avatar": aid, "width": 8, "height": 8}, flame_buffers(head, req.max_frames) | cams, rid()),
            frozenset({"ok"}),
            single=False,
        ),
        Case(
            "one frame over max_frames",
            request("render", {"avatar": aid, "width": 8, "height": 8}, flame_buffers(head, req.max_frames + 1) | cams, rid()),
            bad,
        ),
        Case(
            "a side over max_image_side",
            request("render", {"avatar": aid, "width": req.max_image_side + 1, "height": 8}, flame_buffers(head, 1) | cams, rid()),
            bad,
        ),
        # 700 x 700 float RGBA + depth is 9.3 MiB: rendered, then too large to send.
        Case(
            "a reply over the message limit",
            request("render", {"avatar": aid, "width": 700, "height": 700}, flame_buffers(head, 1) | cams, rid()),
            big,
        ),
    ]


def send_oversized_frame_and_acks(endpoint: str, tally: Tally) -> str:
    """A frame past max_message_bytes (ZeroMQ drops that connection, unanswered) and hostile
    stream acknowledgements (answered only when malformed), each from a socket of its own;
    what the oversized frame got back ("dropped" or an error code)."""
    sock = connect(endpoint)
    try:
        sock.send_multipart(request("hello", {}, {"a": np.zeros(LOAD_LIMITS.max_message_bytes + 1, np.uint8)}, "oversized"))
        got = "dropped"
        if sock.poll(3_000):
            reply = receive(sock)
            got = outcome(reply)
            if got != "too_large":
                tally.fail(f"an oversized frame was answered {got}")
    finally:
        sock.close(linger=0)
    sock = connect(endpoint)
    try:
        acks = [
            {"request": "nope", "seq": 0},
            {"request": "x" * 200, "seq": 1},
            {"request": "r", "seq": -1},
            {"seq": 0},
            {"request": "r", "seq": 10**30},
            {"request": 5, "seq": 0},
            {"request": "r", "seq": 0, "extra": 1},
        ]
        for i, args in enumerate(acks):
            sock.send_multipart(request("ack", args, rid=f"ack-{i}"))
        sock.send_multipart(request("hello", rid="after-acks"))
        while True:  # replies come in request order: whatever precedes hello's is an ack's
            if not sock.poll(REPLY_WAIT_MS):
                raise AssertionError("no reply to the hello after the acks")
            reply = receive(sock)
            tally.reply(reply)
            if reply.id == "after-acks":
                if not reply.ok:
                    tally.fail(f"hello after acks: {reply.error}")
                break
            if reply.ok or not reply.id.startswith("ack-"):
                tally.fail(f"an ack was answered {reply.id} {outcome(reply)}")
    finally:
        sock.close(linger=0)
    return got


def test_concurrent_hostile_clients_all_answered_then_still_correct(
    loaded: Loaded, head: HeadModel, record_property: Callable[[str, object], None]
) -> None:
    """DEALER, REQ and REQ-framed DEALER clients on threads of their own send mutated,
    well-formed, oversized and many-frame messages, hostile job submissions and hostile avatar
    files at once, while another socket samples hello. Every message is answered (REQ: exactly
    once, with its id; DEALER: one final reply per request id), none is ``internal`` or names
    the store's path, each crafted case gets its code, no refused job is queued and no refused
    upload kept, and afterwards the service answers hello, list and render correctly."""
    aid, sid = loaded.aid, loaded.sid
    ids = itertools.count()

    def rid() -> str:
        return f"r{next(ids)}"

    K, w2c = front_camera(SIZE)
    cams = {"intrinsics": K, "world_to_cam": w2c}
    good_import = npz_buffer(small_avatar(head, 1000, seed=11))
    jobs = job_cases(hostile_jobs(aid, sid, loaded.done_job), rid)
    files = [
        import_case(label, data, allowed, rid(), f"hostile-{i}")
        for i, (label, data, allowed) in enumerate(hostile_avatar_files(head, LOAD_REQUESTS.max_gaussians))
    ]

    def well_formed(streams: bool) -> list[Case]:
        # busy (too many device requests waiting) is a fair answer to a well-formed device request.
        ok, device_ok = frozenset({"ok"}), frozenset({"ok", "busy"})
        out = [
            Case("hello", request("hello", rid=rid()), ok),
            Case("get", request("get", {"id": aid}, rid=rid()), ok),
            Case(
                "render", request("render", {"avatar": aid, "width": SIZE, "height": SIZE}, flame_buffers(head, 1) | cams, rid()), device_ok
            ),
            Case("import", request("import", {"name": "fuzz-good"}, {"file": good_import}, rid()), device_ok),
        ]
        if streams:
            three = request("render", {"avatar": aid, "width": SIZE, "height": SIZE}, flame_buffers(head, 3) | cams, rid())
            out.append(Case("render x3", three, device_ok, single=False))
        return out

    # Each client thread: random mutations, its share of the crafted cases, a few well-formed.
    plans: list[tuple[str, list[Case]]] = []
    counts = {f"dealer{i}": FUZZ_PER_DEALER for i in range(DEALERS)} | {f"req{i}": FUZZ_PER_REQ for i in range(REQS)}
    counts["req-framed"] = FUZZ_REQ_STYLE
    for i, (name, count) in enumerate(counts.items()):
        rng = random.Random(1000 + i)
        streams = name.startswith("dealer")  # only DEALERs may get several replies to one request
        cases = fuzz_cases(rng, loaded.seeds, loaded.stream_seeds if streams else [], count, rid)
        cases += jobs[i :: len(counts)] + files[i :: len(counts)] + well_formed(streams)
        rng.shuffle(cases)
        plans.append((name, cases))
    large = large_cases(loaded, head)

    tally = Tally(loaded.store)
    sampler = Sampler(loaded.service.endpoint, rss_mib)
    endpoint = loaded.service.endpoint
    rss_before = rss_mib()
    sampling = threading.Thread(target=sampler.run, name="sampler", daemon=True)
    sampling.start()
    threads = []
    for name, cases in plans:
        if name.startswith("dealer"):
            threads.append(tally.run(name, lambda c=cases: send_batches(endpoint, c, tally, batch=8, delimiter=False)))
        elif name == "req-framed":
            threads.append(tally.run(name, lambda c=cases: send_batches(endpoint, c, tally, batch=4, delimiter=True)))
        else:
            threads.append(tally.run(name, lambda c=cases: send_req(endpoint, c, tally)))
    threads.append(tally.run("large", lambda: send_batches(endpoint, large, tally, batch=1, delimiter=False)))
    oversized: dict[str, str] = {}
    threads.append(tally.run("oversized", lambda: oversized.setdefault("got", send_oversized_frame_and_acks(endpoint, tally))))

    # Meanwhile, one well-formed cheap job, cancelled at once: it must end cancelled (or done,
    # when it finished first), and be the only job the load made.
    with Client(endpoint, timeout_s=60) as client:
        cheap = client.call("synthesize", {"frames": 2, "size": 32, "reference_gaussians": 1000, "seed": 5}).result["job"]
        try:
            client.call("cancel", {"job": cheap["id"]})
        except WireError as exc:
            assert exc.code == ErrorCode.CONFLICT  # it was done already
        cheap_end = client.call("watch", {"job": cheap["id"]}).result["job"]
    for thread in threads:
        thread.join(300)
    hung = [t.name for t in threads if t.is_alive()]
    sampler.stop.set()
    sampling.join(REPLY_WAIT_MS / 1000 + 5)
    rss_after = rss_mib()

    stats = {
        "messages_sent": tally.sent,
        "final_replies": tally.finals,
        "outcomes": dict(tally.outcomes),
        "oversized_frame": oversized.get("got"),
        "hello_samples": len(sampler.hello_ms),
        "hello_ms_p50": round(percentile(sampler.hello_ms, 50), 2),
        "hello_ms_p99": round(percentile(sampler.hello_ms, 99), 2),
        "rss_mib_before": round(rss_before, 1),
        "rss_mib_max_during": round(max(sampler.rss_mib, default=float("nan")), 1),
        "rss_mib_after": round(rss_after, 1),
    }
    for key, value in stats.items():
        record_property(key, value)
    print("hostile load:", json.dumps(stats))

    assert not hung, f"threads still waiting: {hung}"
    assert not tally.failures, "\n".join(tally.failures[:20])
    assert tally.outcomes["internal"] == 0
    # Every message got its final reply: the senders checked them one by one; these are the sums
    # (the finals also count the answers to malformed acks).
    expected = sum(len(c) for _, c in plans) + len(large)
    assert tally.sent == expected and tally.finals >= expected, (tally.sent, tally.finals, expected)
    assert sampler.unanswered == 0 and not sampler.wrong and sampler.hello_ms, (sampler.unanswered, sampler.wrong[:5])
    assert cheap_end["state"] in ("cancelled", "done"), cheap_end

    with Client(endpoint, timeout_s=60) as client:
        hello = client.call("hello").result
        assert hello["protocol"] == 1 and hello["limits"]["max_message_bytes"] == LOAD_LIMITS.max_message_bytes
        # No refused submission made a job, and no refused upload was kept.
        assert {j["id"] for j in client.call("list", {"kind": "jobs"}).result["jobs"]} == {loaded.done_job, cheap["id"]}
        assert not any(loaded.service.store.inputs_dir.iterdir())
        avatars = client.call("list").result["avatars"]
        assert not [a["name"] for a in avatars if a["name"].startswith("hostile-")]
        assert {"base", "large"} <= {a["name"] for a in avatars}  # "large" was acknowledged ok
        for summary in avatars:  # every stored avatar is whole
            got = client.call("get", {"id": summary["id"], "buffers": True})
            assert got.arrays["face_idx"].shape == (summary["gaussians"],)
        avatar = avatar_from_bytes(client.call("export", {"avatar": aid}).arrays["file"].tobytes())
        buffers = flame_buffers(head, 1, seed=9)
        reply = client.call("render", {"avatar": aid, "width": SIZE, "height": SIZE}, buffers | cams)
        rgba, _ = reference_render(avatar, head, buffers, SIZE)[0]
        np.testing.assert_allclose(reply.arrays["rgba"], rgba, atol=1e-5)
