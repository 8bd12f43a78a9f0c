"""The Personalize checkbox of Generate, in real Blender against a real backend subprocess on
the CPU: it follows the backend's default until the artist sets it, its value reaches the
``generate`` request, and the task shows the personalization step and cancels it.

The generator is untrained (the wiring is under test): the tiny network with 12,000
Gaussians, enough on the built-in head for the anti-spike threshold personalization checks
(the preset's 2,000 are refused there as a coarse layout).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.generate.checkpoint import save_generator
from backend.generate.model import Generator, preset
from backend.generate.personalize import Personalization
from backend.head.model import HeadModel
from tests.addon_support import draw_panels, pump, set_prefs, start_backend
from tests.test_server_support import ServiceProcess

pytestmark = pytest.mark.blender


@pytest.fixture(scope="module")
def backend(head: HeadModel, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("backend")
    checkpoint = save_generator(Generator.for_head(preset("tiny", gaussians=12_000), head).eval(), tmp / "generator.pt")
    proc = start_backend(tmp / "store", "--generator", str(checkpoint))
    yield proc
    proc.stop()


def test_personalize_checkbox_follows_the_backend_reaches_the_request_and_cancels(addon, backend: ServiceProcess, portrait: Path) -> None:
    import bpy

    bpy.ops.wm.read_homefile(use_empty=True)
    addon.runtime.RUNTIME.tasks.clear()
    set_prefs(bpy, backend.endpoint)
    assert bpy.ops.spatialavatar.test_connection() == {"FINISHED"}
    props = bpy.context.scene.spatialavatar
    assert "prop:personalize" in draw_panels(addon, bpy.context)

    # Untouched, the checkbox shows the backend's default: on (this CPU backend's hello says so),
    # off where a backend says otherwise.
    generate = addon.runtime.RUNTIME.status["info"]["capabilities"]["generate"]
    assert generate["personalize"] is True and props.personalize is True
    generate["personalize"] = False  # what a backend that does not personalize by default says
    assert props.personalize is False
    props.personalize = True  # the artist's choice holds whatever the backend says
    assert props.personalize is True

    # Checked, Generate personalizes on a backend that would not by default; the task shows the
    # step, and Cancel stops it without an object.
    props.avatar_name = "Personal"
    added = bpy.ops.spatialavatar.portrait_add("EXEC_DEFAULT", True, directory=str(portrait.parent), files=[{"name": portrait.name}])
    assert added == {"FINISHED"}
    assert bpy.ops.spatialavatar.generate() == {"FINISHED"}
    task = addon.runtime.RUNTIME.tasks[-1]
    pump(addon, lambda: task.ended or task.progress.message.startswith("personalize"))
    assert task.progress.state == "running" and task.progress.total == Personalization.for_device("cpu").iterations, task.progress.message
    assert bpy.ops.spatialavatar.cancel_task(index=len(addon.runtime.RUNTIME.tasks) - 1) == {"FINISHED"}
    pump(addon, lambda: task.ended)
    assert task.progress.state == "cancelled" and task.progress.message == "Generate Personal cancelled"
    assert "Personal" not in bpy.data.objects
