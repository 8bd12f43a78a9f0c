"""Batch renders of a saved .blend (``spatialavatar blender-render``) in separate Blender processes.

The wrapper runs the render through the bpy module in a ``python -c`` subprocess, as it
does on any machine without a Blender executable (PATH is narrowed to this Python's folder,
so an installed Blender, which lacks this checkout's add-on, is not picked). The backend is
a real ``serve`` subprocess on the CPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.batch.blender_render import ADDON_MODULE, ENDPOINT_ENV, BlenderRenderJob, backend_answers, blender_command, parse_frames, render
from backend.cli import main
from backend.wire.client import Client
from backend.wire.errors import SpatialAvatarError
from backend.wire.windows import full_frame
from tests.addon_support import read_image
from tests.test_compositing import avatar, backend, build_scene, flame_copy  # noqa: F401  (fixtures)

pytestmark = pytest.mark.blender

FRAMES = (1, 4)
SIZE = 48


@pytest.fixture(autouse=True)
def no_blender_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))


def _free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def shot(addon, backend, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved .blend: the avatar with a keyed FLAME animation, a moving camera, a cube, compositing set up."""
    import bpy

    sc = build_scene(addon, backend[0], backend[1])
    sc.render.engine = "BLENDER_WORKBENCH"
    sc.render.resolution_x = sc.render.resolution_y = SIZE
    sc.render.image_settings.file_format = "OPEN_EXR"
    sc.render.image_settings.color_depth = "32"
    sc.frame_start, sc.frame_end = FRAMES
    head, cam = sc.objects["Head"], sc.camera
    for frame, jaw, yaw, x in ((1, 0.0, -0.3, 0.15), (4, 0.35, 0.3, 0.25)):
        head.spatialavatar_flame.jaw_pose = (jaw, 0.0, 0.0)
        head.spatialavatar_flame.rotation = (0.0, yaw, 0.0)
        head.spatialavatar_flame.keyframe_insert("jaw_pose", frame=frame)
        head.spatialavatar_flame.keyframe_insert("rotation", frame=frame)
        cam.location.x = x
        cam.keyframe_insert("location", frame=frame)
    cube = bpy.data.objects.new("Cube", bpy.data.meshes.new("Cube"))
    cube.data.from_pydata([(x, y, z) for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], [], [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)])
    cube.location, cube.scale = (0.1, 0.05, 1.42), (0.04, 0.04, 0.04)
    sc.collection.objects.link(cube)
    addon.compositing.setup_compositing(sc)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(addon.compositing_job.ENDPOINT_ENV, backend[0])
        assert bpy.ops.spatialavatar.embed_avatars() == {"FINISHED"}  # the file carries the avatar to any backend
    path = tmp_path_factory.mktemp("shot") / "shot.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(path))
    return path


def test_parse_frames() -> None:
    assert parse_frames("3..17") == (3, 17) and parse_frames("5") == (5, 5) and parse_frames("-2..1") == (-2, 1)
    for bad in ("1-3", "4..2", "a..b"):
        with pytest.raises(SpatialAvatarError, match="--frames"):
            parse_frames(bad)


def test_blender_command_line_order(tmp_path: Path) -> None:
    """Blender reads its arguments in order: add-ons before the file, output and range before -a."""
    exe = tmp_path / "blender"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    cmd, runner = blender_command(BlenderRenderJob(Path("shot.blend"), (3, 9), Path("renders"), blender=exe))
    assert runner == f"blender {exe}"
    assert cmd == [str(exe), "-b", "--addons", ADDON_MODULE, "shot.blend", "-o", f"renders{os.sep}", "-s", "3", "-e", "9", "-a"]


def test_split_frame_ranges_match_one_full_render(shot: Path, addon, backend, tmp_path: Path) -> None:
    """Two ranges in two processes (as a farm splits a shot) give the full render's frames bit for bit."""
    endpoint = backend[0]
    full = render(BlenderRenderJob(shot, FRAMES, tmp_path / "full", endpoint=endpoint))
    assert not full.started_backend and full.runner == "bpy"
    assert [p.name for p in full.written] == [f"{f:04d}.exr" for f in range(FRAMES[0], FRAMES[1] + 1)]
    parts = [render(BlenderRenderJob(shot, r, tmp_path / "split", endpoint=endpoint)) for r in ((1, 2), (3, 4))]
    assert [p.name for part in parts for p in part.written] == [p.name for p in full.written]
    assert backend_answers(endpoint, 5.0)  # a backend it did not start is left running

    frames = [read_image(p) for p in full.written]
    for a, b in zip(frames, [read_image(p) for part in parts for p in part.written]):
        np.testing.assert_array_equal(a, b)
    assert all(np.abs(frames[0] - f).max() > 0.05 for f in frames[1:])  # the frames differ: animation is applied

    # The first and last frames hold the service's head where it is opaque (but for the few pixels the cube hides).
    import bpy

    bpy.ops.wm.open_mainfile(filepath=str(shot))
    with Client(endpoint, timeout_s=120.0, retries=0) as c:
        for index, frame, jaw in ((0, FRAMES[0], 0.0), (-1, FRAMES[1], 0.35)):
            bpy.context.scene.frame_set(frame)
            (req,) = addon.compositing_requests.frame_requests(bpy.context.scene, bpy.context.evaluated_depsgraph_get(), {"Head": backend[1]})
            assert req.arrays["jaw_pose"][0, 0] == pytest.approx(jaw)  # the keyed FLAME value of that frame
            reply = c.call("render", req.args, req.arrays)
            head = full_frame(reply.arrays, reply.result, req.args["width"], req.args["height"])["rgba"][::-1]  # bottom row first, as Blender's
            solid = head[..., 3] > 0.999
            same = np.abs(frames[index][..., :3] - head[..., :3]).max(-1) < 2e-3
            assert solid.sum() > 100 and same[solid].mean() > 0.9


def test_cli_starts_a_backend_and_stops_it(shot: Path, backend, flame_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A fresh backend (an empty store, as on a farm worker) is started, gets the avatar the
    .blend carries, renders the same frames as the backend that made it, and is stopped."""
    store, endpoint = tmp_path / "store", _free_endpoint()
    written = []
    for frame in (2, 3):
        argv = ["blender-render", str(shot), "--frames", f"{frame}..{frame}", "--out", str(tmp_path / "out"), "--endpoint", endpoint]
        assert main([*argv, "--store", str(store), "--flame", str(flame_copy), "--device", "cpu", "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["backend"] == "started and stopped" and summary["frames"] == 1
        assert not backend_answers(endpoint, 1.0)
        written += summary["written"]
    assert len(list((store / "avatars").glob("av_*.npz"))) == 1  # imported once, found again by its name
    reference = render(BlenderRenderJob(shot, (2, 3), tmp_path / "ref", endpoint=backend[0]))
    for got, want in zip(written, reference.written, strict=True):
        np.testing.assert_array_equal(read_image(Path(got)), read_image(want))


def test_render_without_a_backend_fails_before_writing(shot: Path, tmp_path: Path) -> None:
    """Blender itself, pointed at an address where nothing listens: exit status 1, a message, no frame."""
    out = tmp_path / "out"
    job = BlenderRenderJob(shot, (1, 1), out, endpoint=_free_endpoint())
    cmd, runner = blender_command(job)
    assert runner == "bpy"
    proc = subprocess.run(cmd, env={**os.environ, ENDPOINT_ENV: job.endpoint}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "no SpatialAvatar backend answers at " + job.endpoint in proc.stdout + proc.stderr
    assert not out.exists() or not any(out.iterdir())
