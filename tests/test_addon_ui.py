"""The sidebar's workflow in real Blender against a real backend subprocess on the CPU:
portraits -> Generate (a background task, pumped like Blender's timer would) -> a new avatar
object; refine on photos with progress and Cancel; export; undo; labelled expression sliders.

The generator is an untrained tiny stage-1 network written by the test (the wiring is under
test, not the avatar's looks); the portrait is a rendered frame of a synthetic subject.
Background Blender has no window to draw panels in, so the panels' ``draw`` runs on a
stand-in layout that checks every property and operator they name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend.generate.checkpoint import save_generator
from backend.generate.model import Generator, preset
from backend.head.model import HeadModel
from tests.addon_support import draw_panels, pump, set_prefs, start_backend
from tests.test_server_support import ServiceProcess

pytestmark = pytest.mark.blender


@pytest.fixture(scope="module")
def backend(head: HeadModel, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("backend")
    checkpoint = save_generator(Generator.for_head(preset("tiny"), head).eval(), tmp / "generator.pt")
    proc = start_backend(tmp / "store", "--generator", str(checkpoint))
    yield proc
    proc.stop()


@pytest.fixture()
def bpy_ready(addon, backend: ServiceProcess):
    import bpy

    bpy.ops.wm.read_homefile(use_empty=True)
    # Blender's UI starts every file with an undo step; background Blender does not, so push it.
    bpy.ops.ed.undo_push(message="file loaded")
    addon.runtime.RUNTIME.tasks.clear()
    set_prefs(bpy, backend.endpoint)
    assert bpy.ops.spatialavatar.test_connection() == {"FINISHED"}
    return bpy


def _add_portraits(bpy, paths: list[Path]) -> None:
    files = [{"name": p.name} for p in paths]
    assert bpy.ops.spatialavatar.portrait_add("EXEC_DEFAULT", True, directory=str(paths[0].parent), files=files) == {"FINISHED"}


def _generate(bpy, addon, name: str):
    # Personalization has tests of its own; here its 70 CPU steps at 512 px would take most of a minute.
    bpy.context.scene.spatialavatar.personalize = False
    before = set(bpy.data.objects.keys())
    assert bpy.ops.spatialavatar.generate() == {"FINISHED"}
    task = addon.runtime.RUNTIME.tasks[-1]
    # Non-blocking: the operator has returned, and nothing was made yet.
    assert not task.ended and set(bpy.data.objects.keys()) == before
    drawn = draw_panels(addon, bpy.context)
    assert "operator:spatialavatar.cancel_task" in drawn and f"label:{task.label}" in drawn
    seen: list[tuple[str, int]] = []
    pump(addon, lambda: seen.append((task.progress.state, task.progress.total)) or task.ended)
    assert task.progress.state == "done", task.progress.message
    assert any(state == "running" and total > 0 for state, total in seen)  # the panel had progress to show
    return task, bpy.data.objects[name]


def test_generate_from_a_portrait_makes_an_avatar_object(bpy_ready, addon, head: HeadModel, portrait: Path, tmp_path: Path) -> None:
    bpy = bpy_ready
    props = bpy.context.scene.spatialavatar
    props.avatar_name = "Portrait Head"
    _add_portraits(bpy, [portrait])
    assert [Path(p.filepath).name for p in props.portraits] == [portrait.name]
    task, obj = _generate(bpy, addon, "Portrait Head")

    aid = task.results["avatar"]
    assert obj[addon.avatars.AVATAR_ID] == aid and task.results["summary"]["avatar"]["name"] == "Portrait Head"
    gaussians = task.results["summary"]["avatar"]["gaussians"]
    assert len(obj.data.vertices) == min(gaussians, props.preview_points) > 0
    for name, width in (("opacity", 1), ("scale", 3), ("rotation", 4), ("color", 4)):
        values = addon.pointcloud.read_attribute(obj.data, name)
        assert values.reshape(len(obj.data.vertices), -1).shape[1] == width
    assert np.isfinite(addon.pointcloud.read_attribute(obj.data, "scale")).all()

    # The expression sliders carry the backend head's names, then numbered ones.
    group = obj.spatialavatar_flame
    assert group.expression_count == head.n_expr
    sliders = group.sliders()
    assert [label for _, _, label in sliders[: len(head.expr_names)]] == list(head.expr_names)
    assert sliders[len(head.expr_names)][2] == f"expr_{len(head.expr_names):03d}"
    bpy.context.view_layer.objects.active = obj
    drawn = draw_panels(addon, bpy.context)
    assert "list:portraits" in drawn and "icon" in drawn and "prop:live_preview" in drawn
    assert drawn.count("prop:expr_0") == 25 and drawn.count("prop:expr_1") == head.n_expr - 25  # one slider per coefficient
    assert "text:brow_raise_L" in drawn and f"text:expr_{head.n_expr - 1:03d}" in drawn
    prop, index, _ = sliders[30]
    getattr(group, prop)[index] = 0.7
    assert group.buffers()["expr"][0, 30] == pytest.approx(0.7)

    # Export through the service: the avatar .npz and a posed 3DGS .ply, bytes written where asked.
    bpy.context.view_layer.objects.active = obj
    assert bpy.ops.spatialavatar.export_avatar(filepath=str(tmp_path / "head.npz"), format="npz") == {"FINISHED"}
    with np.load(tmp_path / "head.npz") as f:
        assert f["offset"].shape == (gaussians, 3)
    assert bpy.ops.spatialavatar.export_avatar(filepath=str(tmp_path / "head.ply"), format="ply") == {"FINISHED"}
    ply = (tmp_path / "head.ply").read_bytes()
    assert ply.startswith(b"ply\n") and f"element vertex {gaussians}\n".encode() in ply[:2000]

    # The object came from a timer; its undo step takes it away again, and redo brings it back.
    assert bpy.ops.ed.undo() == {"FINISHED"}
    assert "Portrait Head" not in bpy.data.objects and len(bpy.context.scene.spatialavatar.portraits) == 1
    assert bpy.ops.ed.redo() == {"FINISHED"}
    assert bpy.data.objects["Portrait Head"][addon.avatars.AVATAR_ID] == aid


def test_refine_on_photos_runs_in_the_background_and_cancels(bpy_ready, addon, portrait: Path) -> None:
    bpy = bpy_ready
    props = bpy.context.scene.spatialavatar
    props.avatar_name, props.track_size, props.refine_iterations = "Base", 128, 2
    props.refine_max_scale = 100.0  # the tiny generator's avatar is coarse
    _add_portraits(bpy, [portrait])
    _, base = _generate(bpy, addon, "Base")
    bpy.context.view_layer.objects.active = base

    assert bpy.ops.spatialavatar.refine(directory=str(portrait.parent), files=[{"name": portrait.name}]) == {"FINISHED"}
    task = addon.runtime.RUNTIME.tasks[-1]
    pump(addon, lambda: task.ended)
    assert task.progress.state == "done", task.progress.message
    refined = bpy.data.objects["Base refined"]
    assert refined[addon.avatars.AVATAR_ID] == task.results["avatar"] != base[addon.avatars.AVATAR_ID]
    assert len(refined.data.vertices) == len(base.data.vertices)  # refinement keeps the layout

    # A long refinement: progress shows while the artist keeps working, then Cancel stops it.
    props.refine_iterations = 1_000_000
    bpy.context.view_layer.objects.active = base
    assert bpy.ops.spatialavatar.refine(directory=str(portrait.parent), files=[{"name": portrait.name}]) == {"FINISHED"}
    task = addon.runtime.RUNTIME.tasks[-1]
    pump(addon, lambda: "subject" in task.results and task.progress.state == "running")  # tracked; refining now
    assert bpy.ops.spatialavatar.portrait_remove() == {"FINISHED"}  # Blender answers meanwhile
    assert bpy.ops.spatialavatar.cancel_task(index=len(addon.runtime.RUNTIME.tasks) - 1) == {"FINISHED"}
    pump(addon, lambda: task.ended)
    assert task.progress.state == "cancelled" and task.progress.message == "Refine Base cancelled"
    assert "Base refined.001" not in bpy.data.objects
    assert bpy.ops.spatialavatar.clear_tasks() == {"FINISHED"} and addon.runtime.RUNTIME.tasks == []


def test_load_avatar_is_one_undo_step(bpy_ready, addon) -> None:
    bpy = bpy_ready
    assert bpy.ops.spatialavatar.list_avatars() == {"FINISHED"}
    aid = addon.operators.status["avatars"][0]["id"]
    assert bpy.ops.spatialavatar.load_avatar("EXEC_DEFAULT", True, avatar=aid, object_name="Loaded", max_points=500) == {"FINISHED"}
    assert len(bpy.data.objects["Loaded"].data.vertices) == 500
    assert bpy.ops.ed.undo() == {"FINISHED"}
    assert "Loaded" not in bpy.data.objects
    assert bpy.ops.ed.redo() == {"FINISHED"}
    assert len(bpy.data.objects["Loaded"].data.vertices) == 500


def test_final_render_panel_sets_up_compositing_and_embeds_the_avatars(bpy_ready, addon) -> None:
    bpy = bpy_ready
    # No avatar object yet: both buttons are off, with a message why.
    assert not bpy.ops.spatialavatar.setup_compositing.poll() and not bpy.ops.spatialavatar.embed_avatars.poll()
    with pytest.raises(RuntimeError, match="load or generate an avatar first"):
        bpy.ops.spatialavatar.setup_compositing()
    assert bpy.ops.spatialavatar.list_avatars() == {"FINISHED"}
    aid = addon.operators.status["avatars"][0]["id"]
    assert bpy.ops.spatialavatar.load_avatar(avatar=aid, object_name="First", max_points=200) == {"FINISHED"}
    drawn = draw_panels(addon, bpy.context)
    assert "label:Renders do not show the avatars yet" in drawn and "label:Renders will stop: the scene has no camera" in drawn
    assert "operator:spatialavatar.setup_compositing" in drawn and "label:Avatar files in the .blend: 0 of 1" in drawn

    assert bpy.ops.spatialavatar.setup_compositing() == {"FINISHED"}
    cam = bpy.data.objects.new("Cam", bpy.data.cameras.new("Cam"))
    bpy.context.scene.collection.objects.link(cam)
    bpy.context.scene.camera = cam
    drawn = draw_panels(addon, bpy.context)
    assert "label:Renders composite 1 avatar object(s)" in drawn and not any(d.startswith("label:Renders will stop") for d in drawn)
    cam.data.type = "ORTHO"
    assert "label:Renders will stop: camera 'Cam' is orthographic; the backend renders through perspective cameras only" in draw_panels(
        addon, bpy.context
    )

    # An avatar loaded after the set-up would render its points too: the panel says to set up again.
    assert bpy.ops.spatialavatar.load_avatar(avatar=aid, object_name="Second", max_points=200) == {"FINISHED"}
    assert "label:1 avatar object(s) added since the set-up: set up again" in draw_panels(addon, bpy.context)
    assert bpy.ops.spatialavatar.setup_compositing() == {"FINISHED"}
    assert "label:Renders composite 2 avatar object(s)" in draw_panels(addon, bpy.context)

    assert bpy.ops.spatialavatar.embed_avatars() == {"FINISHED"}
    assert "label:Avatar files in the .blend: 2 of 2" in draw_panels(addon, bpy.context)
    assert addon.compositing_avatars.embedded(bpy.data.objects["Second"]).startswith(b"PK")  # the avatar's .npz
