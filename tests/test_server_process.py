"""The real ``spatialavatar serve`` process: kill -9 in the middle of a refinement, of an avatar
write, of a checkpoint write, with a job queued and with an import in flight; restart, nothing
acknowledged is lost and nothing half-written is listed.

A kill cannot be timed to the instruction: each test aims it at a moment (polling the store
for the scratch files a write leaves while it runs) and asserts what must hold whichever side
of the write it lands on.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from backend.head.flame_files import write_flame
from backend.head.model import HeadModel
from backend.wire.client import Client
from backend.wire.protocol import decode_reply, encode_request
from tests.test_server_support import flame_buffers, front_camera, npz_buffer, service_process, small_avatar

WAIT_S = 120.0  # generous bounds on a shared machine; they only decide when a stuck test fails


@pytest.fixture(scope="module")
def flame_copy(tmp_path_factory: pytest.TempPathFactory, head: HeadModel) -> Path:
    """The built-in head in FLAME's layout, so each service process reads it instead of building it."""
    return write_flame(head.data, tmp_path_factory.mktemp("flame"))


def test_kill9_mid_refinement_restart_loses_nothing(tmp_path: Path, head: HeadModel, flame_copy: Path) -> None:
    store = tmp_path / "store"
    with service_process(store, flame=flame_copy) as first:
        endpoint = first.endpoint
        with Client(endpoint, timeout_s=60) as client:
            aid = client.call("import", {"name": "base"}, {"file": npz_buffer(small_avatar(head, 1500))}).result["avatar"]["id"]
            synth = client.call("synthesize", {"frames": 2, "size": 32, "reference_gaussians": 1000}).result["job"]
            subject = client.call("watch", {"job": synth["id"]}).result["job"]["result"]["subject"]
            job = client.call(
                "refine", {"avatar": aid, "subject": subject, "iterations": 100_000, "checkpoint_every": 2, "max_scale": 100.0}
            ).result["job"]
            refined = job["result"]["avatar"]
            for event in client.stream("watch", {"job": job["id"]}):
                if (event.result["job"]["checkpoint"] or {}).get("iteration", 0) >= 2:
                    break
            first.kill9()

    # A client asks while the service is down; its retries reach the restarted service.
    answer: dict = {}
    waiting = Client(endpoint, timeout_s=1.0, retries=120)

    def ask() -> None:
        answer["reply"] = waiting.call("list", {"kind": "jobs"})

    asking = threading.Thread(target=ask)
    asking.start()
    time.sleep(1.0)
    with service_process(store, bind=endpoint, flame=flame_copy) as second:
        asking.join(120)
        waiting.close()
        jobs = {j["id"]: j for j in answer["reply"].result["jobs"]}
        assert jobs[job["id"]]["state"] == "interrupted" and jobs[job["id"]]["resumable"]
        assert jobs[synth["id"]]["state"] == "done"
        with Client(second.endpoint, timeout_s=60) as client:
            avatars = {a["id"] for a in client.call("list").result["avatars"]}
            assert {aid, refined} <= avatars  # the source and the refined avatar's last checkpoint
            assert client.call("get", {"id": subject})
            checkpointed = jobs[job["id"]]["checkpoint"]["iteration"]
            client.call("resume", {"job": job["id"]})
            for event in client.stream("watch", {"job": job["id"]}):
                state = event.result["job"]
                if state["state"] == "running" and state["step"] > checkpointed:
                    break
            assert client.call("cancel", {"job": job["id"]}).result["job"]["state"] == "running"
            assert client.call("watch", {"job": job["id"]}).result["job"]["state"] == "cancelled"
            assert client.call("shutdown").result == {"stopping": True}
        assert second.proc.wait(60) == 0


# -- kill -9 at chosen moments ------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout_s: float = WAIT_S, poll_s: float = 0.001) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return False


def writing(store: Path) -> bool:
    """A write is under way: the store stages every file in tmp/, and a checkpoint as
    jobs/<id>.ckpt.partial, before renaming it into place."""
    try:
        return any(os.scandir(store / "tmp")) or any(name.endswith(".partial") for name in os.listdir(store / "jobs"))
    except FileNotFoundError:
        return False


def stored_step(store: Path, jid: str) -> int:
    """The step job ``jid``'s record on disk holds (progress is written about once a second)."""
    try:
        return int(json.loads((store / "jobs" / f"{jid}.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def render_args(size: int = 16) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(arguments, camera buffers) of a one-frame render of ``size`` pixels square."""
    K, w2c = front_camera(size)
    return {"width": size, "height": size}, {"intrinsics": K, "world_to_cam": w2c}


def assert_store_whole(client: Client, store: Path, head: HeadModel) -> dict[str, dict]:
    """Every avatar file in the store is listed, and every listed avatar loads and renders;
    no scratch or half-written file is left. Returns the avatar summaries by id."""
    avatars = {a["id"]: a for a in client.call("list").result["avatars"]}
    npz = {p.stem for p in (store / "avatars").glob("av_*.npz")}
    assert npz == set(avatars), "an avatar file in the store is not listed (unreadable?)"
    assert {p.stem for p in (store / "avatars").glob("av_*.json")} == npz
    assert not list(store.rglob("*.partial")) and not any((store / "tmp").iterdir())
    args, cams = render_args()
    for aid, summary in avatars.items():
        got = client.call("get", {"id": aid, "buffers": True})
        assert got.arrays["opacity_logit"].shape == (summary["gaussians"],)
        rgba = client.call("render", {"avatar": aid, **args}, flame_buffers(head, 1) | cams).arrays["rgba"]
        assert np.isfinite(rgba).all() and rgba[..., 3].max() > 0
    return avatars


def subject_of(client: Client, seed: int = 0) -> tuple[str, str]:
    """(job id, subject id) of a small synthetic subject, made and finished."""
    job = client.call("synthesize", {"frames": 2, "size": 32, "reference_gaussians": 1000, "seed": seed}).result["job"]
    done = client.call("watch", {"job": job["id"]}).result["job"]
    assert done["state"] == "done"
    return job["id"], done["result"]["subject"]


def watch_until(client: Client, jid: str, condition: Callable[[dict], bool]) -> dict:
    """The first event of job ``jid`` that meets ``condition``; fails if the job ends first."""
    for event in client.stream("watch", {"job": jid}):
        state = event.result["job"]
        if condition(state):
            return state
        assert state["state"] in ("queued", "running"), f"job {jid} ended first: {state['state']} {state['message']} {state['error']}"
    raise AssertionError(f"the watch of {jid} ended without a final event")


def test_kill9_during_an_avatar_write_keeps_the_store_whole(tmp_path: Path, head: HeadModel, flame_copy: Path) -> None:
    """Killed while a large import is written: after the restart the earlier avatar is there,
    the large one is there whole (when the kill came after its rename) or not at all, and it
    is there when its reply had arrived."""
    store = tmp_path / "store"
    count = 200_000  # ~18 MB: a write that lasts long enough to be caught in the middle
    big = npz_buffer(small_avatar(head, count, seed=2))
    with service_process(store, flame=flame_copy) as first:
        with Client(first.endpoint, timeout_s=60) as client:
            kept = client.call("import", {"name": "kept"}, {"file": npz_buffer(small_avatar(head, 1000))}).result["avatar"]["id"]
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(first.endpoint)
        try:
            sock.send_multipart(encode_request("import", {"name": "big"}, {"file": big}, request_id="big")[1])
            assert wait_for(lambda: writing(store) or bool(sock.poll(0)))
            first.kill9()
            # A reply that arrived before the kill acknowledged the avatar.
            acked = decode_reply(sock.recv_multipart()).result["avatar"]["id"] if sock.poll(200) else None
        finally:
            sock.close(linger=0)

    with service_process(store, flame=flame_copy) as second, Client(second.endpoint, timeout_s=60) as client:
        avatars = assert_store_whole(client, store, head)
        assert kept in avatars
        large = [a for a in avatars.values() if a["gaussians"] == count]
        assert len(large) <= 1
        if acked is not None:
            assert [a["id"] for a in large] == [acked] and avatars[acked]["name"] == "big"
        # The store takes writes again.
        again = client.call("import", {"name": "again"}, {"file": npz_buffer(small_avatar(head, 1000, seed=5))}).result["avatar"]["id"]
        assert again in {a["id"] for a in client.call("list").result["avatars"]}
        assert client.call("shutdown").result == {"stopping": True}
        assert second.proc.wait(60) == 0  # inside the block: leaving it first would stop the service itself


def test_kill9_during_a_checkpoint_write_resumes_from_a_whole_checkpoint(tmp_path: Path, head: HeadModel, flame_copy: Path) -> None:
    """Killed while a refinement writes a checkpoint (the .ckpt and the refined avatar, every
    iteration): after the restart no half-written checkpoint is left, the refined avatar of an
    acknowledged checkpoint is listed whole, and the job resumes past its checkpoint."""
    store = tmp_path / "store"
    count = 100_000  # each checkpoint writes ~30 MB
    with service_process(store, flame=flame_copy) as first, Client(first.endpoint, timeout_s=60) as client:
        aid = client.call("import", {"name": "source"}, {"file": npz_buffer(small_avatar(head, count))}).result["avatar"]["id"]
        _, sid = subject_of(client)
        job = client.call(
            "refine", {"avatar": aid, "subject": sid, "iterations": 100_000, "checkpoint_every": 1, "max_scale": 100.0}
        ).result["job"]
        refined = job["result"]["avatar"]
        seen = watch_until(client, job["id"], lambda j: (j["checkpoint"] or {}).get("iteration", 0) >= 1)
        acked = seen["checkpoint"]["iteration"]
        assert wait_for(lambda: writing(store))  # the next checkpoint is being written
        first.kill9()

    with service_process(store, flame=flame_copy) as second, Client(second.endpoint, timeout_s=60) as client:
        record = client.call("get", {"id": job["id"]}).result["job"]
        assert record["state"] == "interrupted" and record["resumable"] and "running" in record["message"]
        assert record["checkpoint"]["iteration"] >= acked
        avatars = assert_store_whole(client, store, head)
        assert {aid, refined} <= set(avatars) and avatars[refined]["gaussians"] == count
        client.call("resume", {"job": job["id"]})
        # A checkpoint that did not load would fail the job here.
        watch_until(client, job["id"], lambda j: j["state"] == "running" and j["step"] > record["checkpoint"]["iteration"])
        client.call("cancel", {"job": job["id"]})
        assert client.call("watch", {"job": job["id"]}).result["job"]["state"] == "cancelled"
        assert client.call("shutdown").result == {"stopping": True}
        assert second.proc.wait(60) == 0  # inside the block: leaving it first would stop the service itself


def test_kill9_with_jobs_queued_behind_a_running_one(tmp_path: Path, head: HeadModel, flame_copy: Path) -> None:
    """Killed while a long synthesis runs and a synthesis and an initialization wait behind
    it: after the restart all three are interrupted and resumable, each saying whether it was
    running or queued; none left a subject or avatar in the store, and the queued ones,
    resumed, finish."""
    store = tmp_path / "store"
    with service_process(store, flame=flame_copy) as first, Client(first.endpoint, timeout_s=60) as client:
        aid = client.call("import", {"name": "source"}, {"file": npz_buffer(small_avatar(head, 1500))}).result["avatar"]["id"]
        synth, sid = subject_of(client)
        running = client.call("synthesize", {"frames": 600, "size": 64, "reference_gaussians": 1000, "seed": 3}).result["job"]
        # Until a step is on disk, a restarted service reports a running job as queued.
        assert wait_for(lambda: stored_step(store, running["id"]) >= 1, poll_s=0.05)
        queued = [
            client.call("synthesize", {"frames": 2, "size": 32, "reference_gaussians": 1000, "seed": 7}).result["job"],
            client.call("initialize", {"subject": sid, "gaussians": 1000, "name": "initialized"}).result["job"],
        ]
        assert [j["state"] for j in queued] == ["queued", "queued"]
        first.kill9()

    with service_process(store, flame=flame_copy) as second, Client(second.endpoint, timeout_s=60) as client:
        jobs = {j["id"]: j for j in client.call("list", {"kind": "jobs"}).result["jobs"]}
        assert jobs[synth]["state"] == "done"
        assert jobs[running["id"]]["state"] == "interrupted" and jobs[running["id"]]["resumable"]
        assert "running" in jobs[running["id"]]["message"]
        for j in queued:
            assert jobs[j["id"]]["state"] == "interrupted" and jobs[j["id"]]["resumable"] and "queued" in jobs[j["id"]]["message"]
        made_subject, made_avatar = queued[0]["result"]["subject"], queued[1]["result"]["avatar"]
        subjects = {s["id"] for s in client.call("list", {"kind": "subjects"}).result["subjects"]}
        assert subjects == {sid}  # not the half-made one of the running job, nor the queued one's
        avatars = assert_store_whole(client, store, head)
        assert set(avatars) == {aid}
        for j in queued:
            client.call("resume", {"job": j["id"]})
        for j in queued:
            assert client.call("watch", {"job": j["id"]}).result["job"]["state"] == "done"
        assert client.call("get", {"id": made_subject}).result["subject"]["num_frames"] == 2
        assert made_avatar in assert_store_whole(client, store, head)
        assert client.call("get", {"id": running["id"]}).result["job"]["state"] == "interrupted"  # not resumed: left alone
        assert client.call("shutdown").result == {"stopping": True}
        assert second.proc.wait(60) == 0  # inside the block: leaving it first would stop the service itself


def test_kill9_with_an_import_in_flight_the_retry_is_acknowledged_and_stored(tmp_path: Path, head: HeadModel, flame_copy: Path) -> None:
    """Killed right after a client sent a large import: its retries reach the restarted service,
    and the avatar they acknowledge is stored whole. (Had the first service stored it before
    dying, unacknowledged, a second copy may exist: replies are remembered per process.)"""
    store = tmp_path / "store"
    count = 150_000
    big = npz_buffer(small_avatar(head, count, seed=3))
    with service_process(store, flame=flame_copy) as first:
        endpoint = first.endpoint
        with Client(endpoint, timeout_s=60) as client:
            kept = client.call("import", {"name": "kept"}, {"file": npz_buffer(small_avatar(head, 1000))}).result["avatar"]["id"]
        waiting = Client(endpoint, timeout_s=2.0, retries=60)
        rid = waiting.submit("import", {"name": "in flight"}, {"file": big})
        first.kill9()
    try:
        with service_process(store, bind=endpoint, flame=flame_copy) as second:
            final = None
            deadline = time.monotonic() + WAIT_S
            while final is None and time.monotonic() < deadline:
                final = next((r for r in waiting.poll(500) if r.id == rid and r.final), None)
            assert final is not None and final.ok, final
            acked = final.result["avatar"]["id"]
            with Client(second.endpoint, timeout_s=60) as client:
                avatars = assert_store_whole(client, store, head)
                assert {kept, acked} <= set(avatars) and avatars[acked]["gaussians"] == count
                assert 1 <= sum(a["gaussians"] == count for a in avatars.values()) <= 2
                assert client.call("shutdown").result == {"stopping": True}
            assert second.proc.wait(60) == 0
    finally:
        waiting.close()
