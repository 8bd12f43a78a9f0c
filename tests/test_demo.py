"""The main job (``spatialavatar demo``) end to end at a tiny scale: the astronaut is tracked,
an untrained tiny generator (2,000 Gaussians) makes the avatar, a few CPU refinement steps,
a real bpy subprocess builds the .blend, and the batch-render wrapper renders it with a real
backend subprocess compositing the head.

The .blend is inspected by another bpy subprocess (Blender holds one file per process, and
other test modules load the add-on as an installed extension in this one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from backend.batch.blender_render import BlenderRenderJob, blender_command
from backend.data.subject import Subject
from backend.demo.pipeline import ROOT, DemoConfig, DemoResult, run_demo
from backend.demo.scene import AVATAR_OBJECT
from backend.gaussians.files import load_avatar
from backend.generate.checkpoint import save_generator
from backend.generate.model import Generator, preset
from backend.head.builtin.expressions import BLINK_CLOSED
from backend.head.model import HeadModel

pytestmark = pytest.mark.blender

FRAMES, SIZE = 6, 64

# Opens the demo's .blend with the add-on from this checkout and prints what it holds; then
# saves a copy whose avatar is left out of the render (the set alone), for comparison.
INSPECT = """
import json, sys
blend, set_only, root = sys.argv[1:4]
sys.path.insert(0, root)
from backend.batch import bpy_process
bpy_process.end_without_teardown()
import bpy
import blender_addon
from blender_addon import animation_io, compositing, compositing_avatars, flame_data
blender_addon.register()
bpy.ops.wm.open_mainfile(filepath=blend)
scene = bpy.context.scene
obj = scene.objects[sys.argv[4]]
labels = obj.spatialavatar_flame.labels()
curves = {}
for fc in animation_io.fcurve_collection(obj, create=False):
    prop = fc.data_path.split(".")[-1]
    name = prop if not prop.startswith("expr_") else labels[int(prop[5:]) * flame_data.EXPR_CHUNK + fc.array_index]
    values = [fc.evaluate(f) for f in range(scene.frame_start, scene.frame_end + 1)]
    curves[f"{name}[{fc.array_index}]" if not prop.startswith("expr_") else name] = values
facts = {
    "points": len(obj.data.vertices),
    "attributes": sorted(a.name for a in obj.data.attributes),
    "avatar_id": obj.get("spatialavatar_avatar", ""),
    "embedded_bytes": len(compositing_avatars.embedded(obj) or b""),
    "curves": curves,
    "compositing": compositing.is_set_up(scene),
    "camera": scene.camera is not None,
    "lights": [o.name for o in scene.objects if o.type == "LIGHT"],
    "meshes": sorted(o.name for o in scene.objects if o.type == "MESH"),
    "range": [scene.frame_start, scene.frame_end],
}
print("FACTS " + json.dumps(facts))
obj.hide_render = True
bpy.ops.wm.save_as_mainfile(filepath=set_only, copy=True)
bpy_process.exit(0)
"""


@pytest.fixture(scope="module")
def demo(head: HeadModel, tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    tmp = tmp_path_factory.mktemp("demo")
    checkpoint = save_generator(Generator.for_head(preset("tiny"), head).eval(), tmp / "generator.pt")
    config = DemoConfig(
        out=tmp / "out", frames=FRAMES, size=SIZE, samples=1, track_size=128, cpu_iters=3, cpu_refine_size=64,
        refine_max_scale=100.0,  # the tiny layout is coarse: its flat Gaussians exceed the default threshold
        checkpoint=checkpoint,
    )
    return run_demo(config, log=lambda line: None)


@pytest.fixture(scope="module")
def facts(demo: DemoResult) -> dict:
    set_only = demo.blend.with_name("set_only.blend")
    cmd = [sys.executable, "-c", INSPECT, str(demo.blend), str(set_only), str(ROOT), AVATAR_OBJECT]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("FACTS "))
    return json.loads(line[len("FACTS ") :]) | {"set_only": str(set_only)}


def _frames(paths: list[Path]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB"), np.int16) for p in paths])


def test_blend_holds_the_whole_avatar_and_the_set(demo: DemoResult, facts: dict) -> None:
    assert facts["points"] == load_avatar(demo.avatar).count == demo.gaussians == 2000
    assert {"opacity", "scale", "rotation", "color"} <= set(facts["attributes"])
    assert facts["avatar_id"].startswith("av_") and facts["embedded_bytes"] == demo.avatar.stat().st_size
    assert facts["compositing"] and facts["camera"] and facts["lights"]
    assert {"Floor", "Backdrop", "Plinth", "Cube"} <= set(facts["meshes"])
    assert facts["range"] == [1, FRAMES]


def test_performance_is_keyed_on_top_of_the_portraits_own_expression(demo: DemoResult, facts: dict) -> None:
    curves = facts["curves"]
    for channel in ("neck_pose[1]", "jaw_pose[0]", "smile_L", "blink_L", "blink_R", "brow_raise_R"):
        assert channel in curves, f"{channel} is not keyed: {sorted(curves)}"
        assert max(curves[channel]) - min(curves[channel]) > 0.1, f"{channel} does not move: {curves[channel]}"
    # The first and last frames hold the tracked portrait's expression; the smile is added to it.
    rest = json.loads((demo.blend.parent / "scene.json").read_text())["rest_expression"]
    tracked = Subject.load(demo.blend.parent / "subject").params
    assert rest == pytest.approx(dict(zip(tracked.expr_names, tracked.expr[0].tolist())), abs=1e-6)
    for unit in ("smile_L", "blink_L", "blink_R", "brow_raise_R"):
        assert curves[unit][0] == pytest.approx(rest[unit], abs=1e-4) and curves[unit][-1] == pytest.approx(rest[unit], abs=1e-4)
    assert max(curves["smile_L"]) == pytest.approx(rest["smile_L"] + 1.0, abs=1e-4)
    for lid in ("blink_L", "blink_R"):
        assert BLINK_CLOSED in [pytest.approx(v, abs=1e-4) for v in curves[lid]]
    yaw = curves["neck_pose[1]"]
    assert min(yaw) < -0.2 and max(yaw) > 0.2  # the head turns both ways


def test_frames_show_a_moving_composited_head(demo: DemoResult, facts: dict, tmp_path: Path) -> None:
    assert [p.name for p in demo.frames] == [f"{f:04d}.png" for f in range(1, FRAMES + 1)]
    frames = _frames(demo.frames)
    assert frames.shape == (FRAMES, SIZE, SIZE, 3)

    # The set alone (the avatar hidden from the render), through Blender itself: no backend is needed.
    cmd, _ = blender_command(BlenderRenderJob(Path(facts["set_only"]), (1, 1), tmp_path))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    (set_frame,) = _frames([tmp_path / "0001.png"])

    head = np.abs(frames - set_frame).max(-1) > 24  # [T, H, W]: where the composited head covers the set
    assert all(40 < h.sum() < 0.5 * SIZE * SIZE for h in head), [int(h.sum()) for h in head]
    for t in range(FRAMES - 1):
        changed = np.abs(frames[t] - frames[t + 1]).max(-1) > 24
        assert changed.sum() > 5, f"frames {t + 1} and {t + 2} are the same"
        near_head = head[t] | head[t + 1]
        assert changed[~near_head].mean() < 0.01  # the set stands still; what changes is the head


def test_gif_mp4_and_contact_sheet(demo: DemoResult) -> None:
    with Image.open(demo.gif) as gif:
        assert gif.n_frames == FRAMES and gif.size == (SIZE, SIZE)
    with av.open(str(demo.mp4)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == FRAMES and decoded[0].shape == (SIZE, SIZE, 3)
    first = _frames(demo.frames[:1])[0]
    assert np.abs(decoded[0].astype(np.int16) - first).mean() < 12  # the video shows the frames (lossy)
    with Image.open(demo.contact_sheet) as sheet:
        assert sheet.size == (4 * SIZE, 2 * SIZE)  # 6 frames on a 4-column grid
    summary = json.loads((demo.blend.parent / "summary.json").read_text())
    assert set(summary["seconds"]) == {"track", "generate", "refine", "scene", "render", "media", "total"}
    assert summary["device"] == "cpu" and "CPU schedule" in summary["refine"]
    assert summary["personalize"] == "not personalized (off on cpu: cpu_personalize)"  # the demo keeps to minutes on two cores
