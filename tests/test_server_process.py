"""The real ``spatialavatar serve`` process: kill -9 in the middle of a refinement, restart, nothing lost."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from backend.head.flame_files import write_flame
from backend.head.model import HeadModel
from backend.server.client import Client
from tests.test_server_support import npz_buffer, service_process, small_avatar


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
