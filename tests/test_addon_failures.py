"""Failures the artist can meet, in real Blender against a real backend subprocess on the CPU:
no generator checkpoint, bad files, a backend that answers with an error, no backend at all,
and a backend killed in the middle of a job. Each gives a clear report, and Blender stays
usable (another operator runs afterwards). A backend that comes back is found by the
heartbeat alone, and a job its death interrupted is resumed from the sidebar.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

from backend.head.model import HeadModel
from backend.wire.client import Client
from tests.addon_support import draw_panels, free_port, pump, set_prefs, start_backend
from tests.test_server_support import ServiceProcess, npz_buffer, small_avatar

pytestmark = pytest.mark.blender

REFINE_ITERATIONS = 10  # several seconds on a CPU: killed mid-way, yet quick to finish once resumed


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("backend")
    proc = start_backend(tmp / "store", "--generator", str(tmp / "missing.pt"))  # as if no generator checkpoint were installed
    yield proc
    proc.stop()


def _connect(bpy, addon, endpoint: str, timeout_s: float = 60.0) -> None:
    bpy.ops.wm.read_homefile(use_empty=True)
    addon.runtime.RUNTIME.tasks.clear()
    set_prefs(bpy, endpoint, timeout_s)
    assert bpy.ops.spatialavatar.test_connection() == {"FINISHED"}


def _add(bpy, paths: list[Path]):
    return bpy.ops.spatialavatar.portrait_add(directory=str(paths[0].parent), files=[{"name": p.name} for p in paths])


def _avatar_object(bpy, endpoint: str, head: HeadModel):
    with Client(endpoint, timeout_s=60.0, retries=0) as c:
        aid = c.call("import", {"name": "probe"}, {"file": npz_buffer(small_avatar(head, 1500))}).result["avatar"]["id"]
    assert bpy.ops.spatialavatar.load_avatar(avatar=aid, object_name="Probe") == {"FINISHED"}
    return bpy.data.objects["Probe"]


def test_generate_without_a_generator_is_reported(addon, backend: ServiceProcess, portrait: Path) -> None:
    import bpy

    _connect(bpy, addon, backend.endpoint)
    assert _add(bpy, [portrait]) == {"FINISHED"}
    with pytest.raises(RuntimeError, match="The backend cannot generate: no stage-1 generator checkpoint"):
        bpy.ops.spatialavatar.generate()
    # The service says the same when asked anyway (e.g. the hello the panel saw is stale).
    buffers = addon.media_files.portrait_buffers([str(portrait)])
    task = addon.workflows.generate_task("Anyway", buffers, False, 100, None)
    addon.runtime.RUNTIME.start(task, addon.preferences.settings())
    pump(addon, lambda: task.ended)
    assert task.progress.state == "failed"
    assert task.progress.message.startswith("Generate Anyway failed: generate: no stage-1 generator checkpoint")
    assert "Anyway" not in bpy.data.objects


def test_bad_files_are_reported(addon, backend: ServiceProcess, portrait: Path, head: HeadModel, tmp_path: Path) -> None:
    import bpy

    _connect(bpy, addon, backend.endpoint)
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(RuntimeError, match="Portrait not added: notes.png: not an image"):
        _add(bpy, [text])
    with pytest.raises(RuntimeError, match="Portrait not added: missing.jpg: no such file"):
        _add(bpy, [tmp_path / "missing.jpg"])
    copies = []
    for i in range(5):
        copies.append(tmp_path / f"p{i}.png")
        copies[-1].write_bytes(portrait.read_bytes())
    with pytest.raises(RuntimeError, match="5 portraits picked, room for 4"):
        _add(bpy, copies)
    assert _add(bpy, copies[:4]) == {"FINISHED"}
    assert not bpy.ops.spatialavatar.portrait_add.poll()  # the button is off, with a message why
    props = bpy.context.scene.spatialavatar
    props.portraits.add().filepath = str(copies[4])  # e.g. a script added a fifth
    with pytest.raises(RuntimeError, match=r"Cannot generate: pick 1 to 4 portraits \(got 5\)"):
        bpy.ops.spatialavatar.generate()
    props.portraits[0].filepath = str(tmp_path / "gone.png")
    props.portraits.remove(4)
    with pytest.raises(RuntimeError, match="Cannot generate: gone.png: no such file"):
        bpy.ops.spatialavatar.generate()

    obj = _avatar_object(bpy, backend.endpoint, head)
    bpy.context.view_layer.objects.active = obj
    with pytest.raises(RuntimeError, match="Cannot refine: notes.png: not an image"):
        bpy.ops.spatialavatar.refine(directory=str(tmp_path), files=[{"name": "notes.png"}])
    corrupt = tmp_path / "flame_param.npz"
    corrupt.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(RuntimeError, match="flame_param.npz: not a readable .npz file"):
        bpy.ops.spatialavatar.import_flame(filepath=str(corrupt))
    assert addon.runtime.RUNTIME.tasks == []  # nothing was sent


def test_an_error_answer_is_reported(addon, backend: ServiceProcess, head: HeadModel, tmp_path: Path) -> None:
    import bpy

    _connect(bpy, addon, backend.endpoint)
    obj = _avatar_object(bpy, backend.endpoint, head)
    obj[addon.avatars.AVATAR_ID] = "av_0000000000000000"  # an avatar the backend does not have
    bpy.context.view_layer.objects.active = obj
    with pytest.raises(RuntimeError, match="Could not export av_0000000000000000: .*av_0000000000000000"):
        bpy.ops.spatialavatar.export_avatar(filepath=str(tmp_path / "x.ply"), format="ply")
    assert not (tmp_path / "x.ply").exists()
    bpy.context.scene.spatialavatar.live_preview = True
    pump(addon, lambda: not addon.runtime.RUNTIME.preview.waiting)
    assert "av_0000000000000000" in addon.runtime.RUNTIME.preview.message
    assert bpy.ops.spatialavatar.list_avatars() == {"FINISHED"}  # still usable


def test_no_backend_is_reported(addon, portrait: Path) -> None:
    import bpy

    bpy.ops.wm.read_homefile(use_empty=True)
    addon.runtime.RUNTIME.tasks.clear()
    set_prefs(bpy, f"tcp://127.0.0.1:{free_port()}", timeout_s=0.3)  # nothing listens there
    addon.operators.status.update(ok=True, info=None)  # it answered once, then went away
    assert _add(bpy, [portrait]) == {"FINISHED"}
    assert bpy.ops.spatialavatar.generate() == {"FINISHED"}  # returns at once
    task = addon.runtime.RUNTIME.tasks[-1]
    pump(addon, lambda: task.ended)
    assert task.progress.state == "failed" and "generate: no reply from" in task.progress.message
    assert bpy.ops.spatialavatar.portrait_remove() == {"FINISHED"}


def test_a_new_address_takes_new_requests_while_old_replies_arrive(addon, backend: ServiceProcess) -> None:
    import bpy

    _connect(bpy, addon, backend.endpoint)
    runtime = addon.runtime.RUNTIME
    replies = []
    runtime.session_for(addon.preferences.settings()).submit("list", {"kind": "avatars"}, on_reply=replies.append)
    set_prefs(bpy, f"tcp://127.0.0.1:{free_port()}", timeout_s=0.3)  # the artist changes the address meanwhile
    runtime.session_for(addon.preferences.settings()).submit("hello", on_reply=replies.append)
    pump(addon, lambda: not runtime.busy)
    by_op = {r.op: r for r in replies}
    assert by_op["list"].error is None and "avatars" in by_op["list"].result  # from the old address
    assert "no reply from" in by_op["hello"].error.message  # the new one has nothing listening
    assert runtime.retired == []  # the old session is closed once nothing is due


def test_backend_killed_mid_job_is_reported(addon, portrait: Path, head: HeadModel, tmp_path: Path) -> None:
    import bpy

    doomed = start_backend(tmp_path / "store")
    try:
        _connect(bpy, addon, doomed.endpoint, timeout_s=3.0)  # watch replies come at least once a second
        obj = _avatar_object(bpy, doomed.endpoint, head)
        bpy.context.view_layer.objects.active = obj
        props = bpy.context.scene.spatialavatar
        props.refine_iterations, props.refine_max_scale, props.track_size = 1_000_000, 100.0, 128
        assert bpy.ops.spatialavatar.refine(directory=str(portrait.parent), files=[{"name": portrait.name}]) == {"FINISHED"}
        task = addon.runtime.RUNTIME.tasks[-1]
        pump(addon, lambda: ("subject" in task.results and task.progress.state == "running") or task.ended)  # refining now
        assert task.progress.state == "running", task.progress.message
        doomed.kill9()
        pump(addon, lambda: task.progress.state != "running")
    finally:
        doomed.stop()
    assert task.progress.state == "lost" and not task.ended  # its job may still run somewhere: not given up
    assert task.progress.message.startswith(f"Refine Probe: lost the backend while following job {task.job_id}")
    assert "no reply from" in task.progress.message
    assert not addon.operators.status["ok"] and "no reply from" in addon.operators.status["text"]
    assert bpy.ops.spatialavatar.portrait_add(directory=str(portrait.parent), files=[{"name": portrait.name}]) == {"FINISHED"}


def test_a_lost_backend_shows_in_the_status_and_is_found_again_when_it_returns(addon, tmp_path: Path) -> None:
    import bpy

    bpy.ops.wm.read_homefile(use_empty=True)
    addon.runtime.RUNTIME.tasks.clear()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    set_prefs(bpy, endpoint, timeout_s=0.3)
    with pytest.raises(RuntimeError, match="did not answer"):  # nothing listens yet; background Blender raises reported errors
        bpy.ops.spatialavatar.test_connection()
    assert not addon.operators.status["ok"] and "No backend" in addon.operators.status["text"]
    returned = ServiceProcess(tmp_path / "store", bind=endpoint)
    try:
        assert bpy.ops.spatialavatar.test_connection() == {"FINISHED"}  # a fresh socket, same preferences
        assert addon.operators.status["ok"] and addon.operators.status["info"]["device"] == "cpu"
    finally:
        returned.stop()


@pytest.fixture()
def quick_heartbeat(addon, monkeypatch: pytest.MonkeyPatch) -> float:
    """A shorter heartbeat, so a test waits less for the backend to be found again."""
    timer = dataclasses.replace(addon.runtime.TIMER, heartbeat_s=0.5)
    monkeypatch.setattr(addon.runtime, "TIMER", timer)
    return timer.heartbeat_s


def test_a_lost_backend_is_found_again_by_the_heartbeat_alone(addon, quick_heartbeat: float, tmp_path: Path) -> None:
    import bpy

    endpoint, store = f"tcp://127.0.0.1:{free_port()}", tmp_path / "store"
    runtime, status = addon.runtime.RUNTIME, addon.operators.status
    gone = ServiceProcess(store, bind=endpoint)
    try:
        _connect(bpy, addon, endpoint, timeout_s=1.0)
        assert status["ok"] and not runtime.looking
    finally:
        gone.stop()
    with pytest.raises(RuntimeError, match="Could not list avatars"):  # any call the backend leaves unanswered
        bpy.ops.spatialavatar.list_avatars()
    assert not status["ok"] and "no reply from" in status["text"] and runtime.looking
    # Nothing listens for a few beats: every tick returns at once (a blocking hello would
    # take the 1 s timeout), and the timer stays alive until the next beat.
    deadline = time.monotonic() + 3 * quick_heartbeat
    while time.monotonic() < deadline:
        started = time.monotonic()
        next_s = runtime.tick()
        assert time.monotonic() - started < 0.5
        assert next_s is not None and next_s <= quick_heartbeat
        time.sleep(0.05)
    assert not status["ok"] and runtime.looking
    returned = ServiceProcess(store, bind=endpoint)
    try:
        pump(addon, lambda: status["ok"])  # the timer alone: no Test Connection
        assert status["info"]["device"] == "cpu" and status["text"] == addon.connection.describe(status["info"])
        assert not runtime.looking and runtime.tick() is None  # the heartbeat stopped, and with it the timer
        assert bpy.ops.spatialavatar.list_avatars() == {"FINISHED"}
    finally:
        returned.stop()


def test_a_job_interrupted_with_its_backend_is_resumed(
    addon, quick_heartbeat: float, portrait: Path, head: HeadModel, tmp_path: Path
) -> None:
    import bpy

    endpoint, store = f"tcp://127.0.0.1:{free_port()}", tmp_path / "store"
    runtime, status = addon.runtime.RUNTIME, addon.operators.status
    first = ServiceProcess(store, bind=endpoint)
    try:
        _connect(bpy, addon, endpoint, timeout_s=2.0)
        obj = _avatar_object(bpy, endpoint, head)
        bpy.context.view_layer.objects.active = obj
        props = bpy.context.scene.spatialavatar
        props.refine_iterations, props.refine_max_scale, props.track_size = REFINE_ITERATIONS, 100.0, 128
        assert bpy.ops.spatialavatar.refine(directory=str(portrait.parent), files=[{"name": portrait.name}]) == {"FINISHED"}
        task = runtime.tasks[-1]
        pump(addon, lambda: ("subject" in task.results and task.progress.state == "running") or task.ended)
        assert task.progress.state == "running", task.progress.message
        job = task.job_id
        first.kill9()
        pump(addon, lambda: task.progress.state == "lost")
    finally:
        first.stop()
    with pytest.raises(RuntimeError, match="No interrupted job to resume"):
        bpy.ops.spatialavatar.resume_job()
    second = ServiceProcess(store, bind=endpoint)  # a restart: same store, same address
    try:
        pump(addon, lambda: task.ended)  # the heartbeat finds it; the task looks at its job again
        assert status["ok"] and not runtime.looking
        assert task.progress.state == "interrupted" and task.job_id == job, task.progress.message
        assert "the service stopped while this job was" in task.progress.message
        assert "operator:spatialavatar.resume_job" in draw_panels(addon, bpy.context)
        assert bpy.ops.spatialavatar.resume_job(index=runtime.tasks.index(task)) == {"FINISHED"}
        assert not task.ended and "operator:spatialavatar.resume_job" not in draw_panels(addon, bpy.context)
        seen: list[tuple[str, str | None]] = []
        pump(addon, lambda: seen.append((task.progress.state, task.job_id)) or task.ended)
        assert task.progress.state == "done", task.progress.message
        assert ("running", job) in seen  # the same job, followed again to its end
        assert f"{obj.name} refined" in bpy.data.objects
        with Client(endpoint, timeout_s=30.0, retries=0) as c:
            record = c.call("get", {"id": job}).result["job"]
        assert record["state"] == "done" and record["result"]["iterations"] == REFINE_ITERATIONS
    finally:
        second.stop()


def test_resume_is_off_with_nothing_to_resume(addon, backend: ServiceProcess) -> None:
    import bpy

    _connect(bpy, addon, backend.endpoint)
    assert not bpy.ops.spatialavatar.resume_job.poll()
    with pytest.raises(RuntimeError, match="No interrupted job to resume"):
        bpy.ops.spatialavatar.resume_job()
    task = addon.workflows.generate_task("Anyway", {}, False, 100, None)  # fails at the service: ended, not interrupted
    addon.runtime.RUNTIME.start(task, addon.preferences.settings())
    pump(addon, lambda: task.ended)
    assert task.progress.state == "failed" and not bpy.ops.spatialavatar.resume_job.poll()
