"""The service on a GPU: a refinement job runs its captured step on the device worker while
renders are answered between its steps."""

from __future__ import annotations

import pytest
import torch

from backend.head.model import HeadModel
from backend.wire.client import Client
from tests.test_server_support import flame_buffers, front_camera, npz_buffer, service_thread, small_avatar

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_refine_job_on_cuda_answers_renders_between_steps(tmp_path, head: HeadModel) -> None:  # type: ignore[no-untyped-def]
    with service_thread(tmp_path / "store", device="cuda") as service, Client(service.endpoint, timeout_s=120) as client:
        aid = client.call("import", {"name": "base"}, {"file": npz_buffer(small_avatar(head))}).result["avatar"]["id"]
        synth = client.call("synthesize", {"frames": 4, "size": 64, "reference_gaussians": 4000, "seed": 3}).result["job"]
        subject = client.call("watch", {"job": synth["id"]}).result["job"]["result"]["subject"]
        job = client.call(
            "refine", {"avatar": aid, "subject": subject, "iterations": 3000, "checkpoint_every": 500, "max_scale": 100.0}
        ).result["job"]
        for event in client.stream("watch", {"job": job["id"]}):  # until the captured step replays
            if event.result["job"]["step"] > 0:
                break
        K, w2c = front_camera(64)
        frames = list(
            client.stream("render", {"avatar": aid, "width": 64, "height": 64}, flame_buffers(head, 3) | {"intrinsics": K, "world_to_cam": w2c})
        )
        during = client.call("get", {"id": job["id"]}).result["job"]
        final = client.call("watch", {"job": job["id"]}).result["job"]
        assert [f.seq for f in frames] == [0, 1, 2]
        assert all(f.arrays["rgba"][..., 3].max() > 0.5 for f in frames)  # the avatar is in the frame
        assert during["state"] == "running" and during["step"] < during["total"], during
        assert final["state"] == "done", final
        refined = client.call("get", {"id": final["result"]["avatar"]}).result["avatar"]
        assert refined["gaussians"] == client.call("get", {"id": aid}).result["avatar"]["gaussians"]
