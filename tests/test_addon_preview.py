"""Live preview and the camera-view overlay in real Blender against a real backend subprocess.

Keyframed expression and jaw values reach the service's ``deform`` through the frame-change
handler and the add-on's timer (pumped here, as Blender's event loop would), and the
returned positions land in the mesh. The .blend keeps avatar and animation without any
backend. The overlay's request and texture pixels are checked against a real ``render``;
drawing the texture needs the ``gpu`` module, which background Blender does not provide,
so ``overlay.draw`` itself cannot run here (only its handler's registration is checked).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend.head.model import HeadModel
from backend.wire.client import Client
from tests.addon_support import free_port, pump, set_prefs, start_backend
from tests.test_server_support import ServiceProcess, npz_buffer, small_avatar

pytestmark = pytest.mark.blender

GAUSSIANS, POINTS = 3000, 1000


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory):
    proc = start_backend(tmp_path_factory.mktemp("backend") / "store")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def avatar_id(backend: ServiceProcess, head: HeadModel) -> str:
    with Client(backend.endpoint, timeout_s=60.0, retries=0) as c:
        return c.call("import", {"name": "probe"}, {"file": npz_buffer(small_avatar(head, GAUSSIANS))}).result["avatar"]["id"]


@pytest.fixture()
def avatar_obj(addon, backend: ServiceProcess, avatar_id: str):
    import bpy

    bpy.ops.wm.read_homefile(use_empty=True)
    set_prefs(bpy, backend.endpoint)
    assert bpy.ops.spatialavatar.test_connection() == {"FINISHED"}
    assert bpy.ops.spatialavatar.load_avatar(avatar=avatar_id, object_name="Head", max_points=POINTS) == {"FINISHED"}
    return bpy.data.objects["Head"]


def _positions(obj) -> np.ndarray:
    co = np.empty(len(obj.data.vertices) * 3, np.float32)
    obj.data.vertices.foreach_get("co", co)
    return co.reshape(-1, 3)


def _key(obj, frame: int, smile: float, jaw: float) -> None:
    group = obj.spatialavatar_flame
    group.expr_0[8] = smile
    group.jaw_pose[0] = jaw
    obj.keyframe_insert("spatialavatar_flame.expr_0", index=8, frame=frame)
    obj.keyframe_insert("spatialavatar_flame.jaw_pose", index=0, frame=frame)


def _show_frame(bpy, addon, frame: int) -> None:
    bpy.context.scene.frame_set(frame)  # runs frame_change_post, which arms the timer
    assert addon.runtime.RUNTIME.preview.dirty
    pump(addon, lambda: not addon.runtime.RUNTIME.preview.waiting)


def test_keyframes_drive_the_preview_and_survive_a_reload_without_backend(
    avatar_obj, addon, backend: ServiceProcess, avatar_id: str, tmp_path: Path
) -> None:
    import bpy

    obj = avatar_obj
    assert len(obj.data.vertices) == POINTS
    _key(obj, 1, 0.0, 0.0)
    _key(obj, 10, 2.5, 0.3)
    bpy.context.scene.spatialavatar.live_preview = True
    _show_frame(bpy, addon, 1)
    neutral = _positions(obj)
    _show_frame(bpy, addon, 10)
    posed = _positions(obj)
    assert addon.runtime.RUNTIME.preview.message == ""
    moved = np.linalg.norm(posed - neutral, axis=1)
    assert moved.max() > 5e-3  # the jaw opened: mouth points moved by millimetres at least

    # The same subset and pose straight from the service.
    with Client(backend.endpoint, timeout_s=60.0, retries=0) as c:
        expr = np.zeros((1, 50), np.float32)
        expr[0, 8] = 2.5
        jaw = np.array([[0.3, 0.0, 0.0]], np.float32)
        want = c.call("deform", {"avatar": avatar_id, "max_gaussians": POINTS}, {"expr": expr, "jaw_pose": jaw}).arrays["positions"]
    np.testing.assert_allclose(posed, want, atol=1e-5)

    path = tmp_path / "preview.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(path))
    set_prefs(bpy, f"tcp://127.0.0.1:{free_port()}", timeout_s=0.3, retries=0)  # nothing listens there
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.ops.wm.open_mainfile(filepath=str(path))
    obj = bpy.data.objects["Head"]
    assert obj[addon.avatars.AVATAR_ID] == avatar_id
    np.testing.assert_array_equal(_positions(obj), posed)
    assert addon.pointcloud.read_attribute(obj.data, "color").shape == (POINTS, 4)
    back = addon.animation_io.export_animation(obj, 1, 10)
    assert back.expr[0, 8] == pytest.approx(0.0) and back.expr[-1, 8] == pytest.approx(2.5)
    assert back.poses["jaw_pose"][-1, 0] == pytest.approx(0.3)
    assert obj.spatialavatar_flame.expression_names.split(",")[:2] == ["brow_raise_L", "brow_raise_R"]

    # The preview now has no backend: it says so, the points stay, Blender goes on.
    _show_frame(bpy, addon, 1)
    assert "no reply" in addon.runtime.RUNTIME.preview.message
    np.testing.assert_array_equal(_positions(obj), posed)
    bpy.context.scene.frame_set(5)
    assert 0.0 < obj.spatialavatar_flame.jaw_pose[0] < 0.3  # the animation still plays


def test_overlay_renders_at_the_scene_camera(avatar_obj, addon) -> None:
    import bpy

    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 320, 240, 100
    cam_data = bpy.data.cameras.new("Cam")
    cam_data.lens, cam_data.sensor_width, cam_data.sensor_fit = 50.0, 36.0, "AUTO"
    cam = bpy.data.objects.new("Cam", cam_data)
    scene.collection.objects.link(cam)
    cam.location = (0.0, -0.9, 0.0)  # the head faces -Y in Blender (see pointcloud)
    cam.rotation_euler = (np.pi / 2, 0.0, 0.0)  # looking along +Y
    scene.camera = cam
    bpy.context.view_layer.update()

    args, arrays = addon.overlay.render_request(scene, avatar_obj, 0.5)
    assert (args["width"], args["height"], args["depth"]) == (160, 120, "none")
    np.testing.assert_allclose(arrays["intrinsics"][0, 0], 50.0 * 160 / 36.0, rtol=1e-6)
    np.testing.assert_allclose(arrays["intrinsics"][:2, 2], [80.0, 60.0], atol=1e-4)
    origin = arrays["world_to_cam"] @ np.array([0.0, 0.0, 0.0, 1.0], np.float32)
    np.testing.assert_allclose(origin[:3], [0.0, 0.0, 0.9], atol=1e-5)  # the head's origin, 0.9 m ahead
    up = arrays["world_to_cam"][:3, :3] @ np.array([0.0, 1.0, 0.0], np.float32)
    assert up[1] < -0.99  # backend +y (up) is image -y (OpenCV: y down)

    avatar_obj.scale = (2.0, 1.0, 1.0)
    bpy.context.view_layer.update()
    with pytest.raises(addon.overlay.OverlayError, match="uniform"):
        addon.overlay.render_request(scene, avatar_obj, 0.5)
    avatar_obj.scale = (1.0, 1.0, 1.0)
    bpy.context.view_layer.update()

    state = addon.runtime.RUNTIME.overlay
    version = state.version
    # The backend runs on this machine, so once its hello is known the overlay's frame comes
    # through a shared-memory slot (the first slot file appears in its folder).
    hello = addon.connection.hello(addon.preferences.settings())
    addon.runtime.found(hello)
    slots = Path(hello["shared_memory"])
    assert not any(slots.iterdir())
    scene.spatialavatar.overlay = True
    assert state.handler is not None
    pump(addon, lambda: state.version > version and not state.in_flight)
    assert state.message == ""
    pixels = state.pixels.reshape(state.height, state.width, 4)
    assert (state.width, state.height) == (160, 120)
    assert pixels[60, 80, 3] > 0.5 and pixels[0, 0, 3] == 0.0  # the face at the centre, nothing in the corner
    assert any(slots.iterdir())
    # Texture rows go bottom-up: the service's top row is the buffer's last.
    rgba = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(addon.overlay.texture_pixels(rgba).reshape(2, 3, 4)[0], rgba[1])
    scene.spatialavatar.overlay = False
    assert state.handler is None
