"""Jobs over the wire: progress events, results, cancel, and renders answered while a job runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from backend.head.model import HeadModel
from backend.wire.client import Client
from backend.wire.protocol import ErrorCode, WireError, decode_reply, encode_request
from tests.test_server_support import flame_buffers, front_camera, npz_buffer, service_thread, small_avatar

SUBJECT = {"frames": 3, "size": 32, "reference_gaussians": 1000, "seed": 3}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, head: HeadModel) -> Iterator[tuple[Client, str, str]]:
    """(client, avatar id, subject id) of a service with one avatar and one small synthetic subject."""
    with service_thread(tmp_path_factory.mktemp("store")) as service, Client(service.endpoint, timeout_s=60) as client:
        aid = client.call("import", {"name": "base"}, {"file": npz_buffer(small_avatar(head))}).result["avatar"]["id"]
        job = client.call("synthesize", SUBJECT).result["job"]
        final = client.call("watch", {"job": job["id"]}).result["job"]
        assert final["state"] == "done", final
        yield client, aid, final["result"]["subject"]


def test_job_reports_progress_and_its_result(served) -> None:
    client, _, subject = served
    job = client.call("initialize", {"subject": subject, "gaussians": 1000, "name": "fitted"}).result["job"]
    assert job["state"] == "queued" and job["result"]["avatar"].startswith("av_")
    events = [r.result["job"] for r in client.stream("watch", {"job": job["id"]})]
    steps = [e["step"] for e in events]
    assert steps == sorted(steps) and events[-1]["state"] == "done"
    assert events[-1]["step"] == events[-1]["total"] == SUBJECT["frames"] + 1
    info = client.call("get", {"id": job["result"]["avatar"], "buffers": True}).result["avatar"]
    assert info["name"] == "fitted" and info["gaussians"] == 1000
    assert len(info["meta"]["fit"]["psnr"]) == SUBJECT["frames"] and info["meta"]["fit"]["psnr_mean"] > 10
    with pytest.raises(WireError) as err:
        client.call("cancel", {"job": job["id"]})
    assert err.value.code == ErrorCode.CONFLICT
    assert job["id"] in {j["id"] for j in client.call("list", {"kind": "jobs"}).result["jobs"]}


def test_a_retried_submission_makes_one_job(served) -> None:
    client, aid, subject = served
    _, frames = encode_request(
        "refine", {"avatar": aid, "subject": subject, "iterations": 2, "max_scale": 100.0}, request_id="retried-refine"
    )
    jobs = []
    for _ in range(2):  # what a Lazy Pirate retry does: the same request on a fresh socket
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(client.endpoint)
        try:
            sock.send_multipart(frames)
            assert sock.poll(30_000)
            jobs.append(decode_reply(sock.recv_multipart()).result["job"]["id"])
        finally:
            sock.close()
    assert jobs[0] == jobs[1]
    assert client.call("watch", {"job": jobs[0]}).result["job"]["state"] == "done"


def test_render_is_answered_while_a_refinement_runs(served, head: HeadModel) -> None:
    client, aid, subject = served
    job = client.call(
        "refine", {"avatar": aid, "subject": subject, "iterations": 100_000, "checkpoint_every": 2, "max_scale": 100.0}
    ).result["job"]
    jid = job["id"]
    try:
        for event in client.stream("watch", {"job": jid}):  # until it is really running
            if event.result["job"]["step"] > 0:
                break
        K, w2c = front_camera(32)
        frames = list(
            client.stream(
                "render", {"avatar": aid, "width": 32, "height": 32}, flame_buffers(head, 3) | {"intrinsics": K, "world_to_cam": w2c}
            )
        )
        during = client.call("get", {"id": jid}).result["job"]
        assert [f.seq for f in frames] == [0, 1, 2]
        assert during["state"] == "running" and during["step"] < during["total"], during
    finally:
        cancelled = client.call("cancel", {"job": jid}).result["job"]
    assert cancelled["id"] == jid
    final = client.call("watch", {"job": jid}).result["job"]
    assert final["state"] == "cancelled" and not final["resumable"]
    with pytest.raises(WireError) as err:
        client.call("resume", {"job": jid})
    assert err.value.code == ErrorCode.CONFLICT


def test_a_job_running_when_the_service_died_says_running_even_before_its_first_step(tmp_path: Path) -> None:
    """The record's state, not its step count, tells whether a job was running: a job killed
    in its first second (no step saved yet) used to be reported as having been queued."""
    from backend.server.jobs import JobRecord, JobState
    from backend.server.store import Store

    store = Store(tmp_path / "store")
    running = JobRecord(id="jb_" + "1" * 16, kind="synthesize", params={}, request_id="r1", state=JobState.RUNNING, step=0)
    queued = JobRecord(id="jb_" + "2" * 16, kind="synthesize", params={}, request_id="r2", state=JobState.QUEUED)
    for rec in (running, queued):
        store.put_job(rec.to_json())
    store.close()
    with service_thread(tmp_path / "store") as service, Client(service.endpoint, timeout_s=60) as client:
        jobs = {j["id"]: j for j in client.call("list", {"kind": "jobs"}).result["jobs"]}
    assert jobs[running.id]["state"] == "interrupted" and jobs[running.id]["message"].endswith("was running")
    assert jobs[queued.id]["state"] == "interrupted" and jobs[queued.id]["message"].endswith("was queued")
