"""Composited renders in real Blender (the bpy module, background mode) against a real backend
subprocess on the CPU: the camera conversion against Blender's own projection, and depth
order against meshes in front of and behind the head.

The extension is the built zip, installed and enabled by the ``addon`` fixture (conftest.py).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.head.flame_files import write_flame
from backend.head.model import HeadModel
from backend.head.params import POSE_FIELDS, FlameParams
from backend.render.camera import Cameras, project
from backend.wire.client import Client
from backend.wire.windows import full_frame
from tests.test_server_support import npz_buffer, service_process, small_avatar

pytestmark = pytest.mark.blender

GAUSSIANS = 6000
AVATAR_SEED = 3


@pytest.fixture(scope="module")
def avatar(head: HeadModel):
    return small_avatar(head, GAUSSIANS, seed=AVATAR_SEED)


@pytest.fixture(scope="module")
def flame_copy(tmp_path_factory: pytest.TempPathFactory, head: HeadModel) -> Path:
    """The built-in head in FLAME's layout: a service process reads it faster than it builds it."""
    return write_flame(head.data, tmp_path_factory.mktemp("flame"))


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory, flame_copy: Path, avatar):
    """A backend subprocess holding ``avatar``: (endpoint, avatar id, store folder). Always stopped."""
    store = tmp_path_factory.mktemp("store")
    with service_process(store, flame=flame_copy) as proc:
        with Client(proc.endpoint, timeout_s=120.0, retries=0) as c:
            aid = c.call("import", {"name": "comp"}, {"file": npz_buffer(avatar)}).result["avatar"]["id"]
        yield proc.endpoint, aid, store


def build_scene(addon, endpoint: str, aid: str):
    """An empty scene with the avatar object (the point preview of the real add-on) and a camera facing it."""
    import bpy

    bpy.ops.wm.read_homefile(use_empty=True)
    sc = bpy.context.scene
    g = addon.pointcloud.GaussianBuffers(**{k: v for k, v in _neutral(endpoint, aid).items() if k in ("positions", "scales", "rotations", "opacities", "colors")})
    obj = addon.pointcloud.create_avatar_object("Head", g)
    obj[addon.avatars.AVATAR_ID] = aid
    obj.rotation_euler = (math.pi / 2, 0.0, 0.0)  # the face looks along Blender's -Y
    obj.location = (0.2, 0.1, 1.5)
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    sc.collection.objects.link(cam)
    sc.camera = cam
    cam.location = (0.2, -0.9, 1.5)
    cam.rotation_euler = (math.pi / 2, 0.0, 0.0)  # looks along +Y, at the face
    return sc


@pytest.fixture()
def scene(addon, backend, monkeypatch: pytest.MonkeyPatch):
    """``build_scene``; the add-on reaches the backend through $SPATIALAVATAR_ENDPOINT."""
    monkeypatch.setenv(addon.compositing_job.ENDPOINT_ENV, backend[0])
    return build_scene(addon, backend[0], backend[1])


def _neutral(endpoint: str, aid: str) -> dict[str, np.ndarray]:
    with Client(endpoint, timeout_s=120.0, retries=0) as c:
        return c.call("deform", {"avatar": aid, "statics": True}, {"expr": np.zeros((1, 1), np.float32)}).arrays


def _landmarks(head: HeadModel, avatar, arrays: dict[str, np.ndarray]) -> torch.Tensor:
    """[68, 3] backend-world landmarks of the avatar posed by one frame of request buffers."""
    p = head.neutral_params(1)
    poses = {k: torch.tensor(arrays[k]) for k in POSE_FIELDS}
    params = FlameParams(shape=p.shape, expr=torch.tensor(arrays["expr"]), **poses).conformed(head.n_shape, head.n_expr)
    with torch.no_grad():
        return head(avatar.params_for(params)).landmarks[0]


CAMERAS = [  # lens, sensor fit, shift x, shift y, resolution, percentage, pixel aspect, avatar scale
    (50.0, "AUTO", 0.0, 0.0, (512, 512), 100, (1.0, 1.0), 1.0),
    (35.0, "HORIZONTAL", 0.08, -0.05, (512, 512), 100, (1.0, 1.0), 1.0),
    (85.0, "VERTICAL", -0.1, 0.12, (512, 512), 100, (1.0, 1.0), 1.3),
    (50.0, "AUTO", 0.05, 0.05, (640, 400), 80, (1.0, 1.0), 1.0),
    (60.0, "AUTO", 0.0, 0.1, (400, 640), 100, (2.0, 1.0), 0.8),
    (40.0, "VERTICAL", 0.1, 0.0, (512, 512), 100, (1.0, 1.5), 1.0),
    (70.0, "HORIZONTAL", 0.0, 0.0, (512, 384), 100, (3.0, 2.0), 1.0),
]


@pytest.mark.parametrize("lens,fit,sx,sy,res,pct,aspect,scale", CAMERAS)
def test_service_camera_matches_blender_projection(scene, addon, head, avatar, backend, lens, fit, sx, sy, res, pct, aspect, scale) -> None:
    """The request the render handler sends projects the posed head's landmarks where Blender's
    ``world_to_camera_view`` puts them (< 0.5 px), with depths in Blender units."""
    import bpy
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Vector

    sc = scene
    cam, obj = sc.camera, sc.objects["Head"]
    cam.data.lens, cam.data.sensor_fit, cam.data.shift_x, cam.data.shift_y = lens, fit, sx, sy
    cam.data.sensor_width, cam.data.sensor_height = 36.0, 24.0
    r = sc.render
    r.resolution_x, r.resolution_y, r.resolution_percentage = *res, pct
    r.pixel_aspect_x, r.pixel_aspect_y = aspect
    obj.scale = (scale,) * 3
    obj.location = (0.2, 0.1 + 0.4 * (scale - 1.0), 1.5)
    cam.location.y = 0.1 - lens / 50.0  # the face fills a similar share of the view at every lens
    group = obj.spatialavatar_flame
    group.jaw_pose = (0.25, 0.0, 0.0)
    group.rotation = (0.1, 0.35, -0.05)
    group.expr_0 = [0.8 if i < 3 else 0.0 for i in range(25)]
    group.translation = (0.01, -0.02, 0.0)
    depsgraph = bpy.context.evaluated_depsgraph_get()

    comp = addon.compositing_requests
    (req,) = comp.frame_requests(sc, depsgraph, {"Head": backend[1]})
    width, height = req.args["width"], req.args["height"]
    assert (width, height) == (res[0] * pct // 100, res[1] * pct // 100)
    np.testing.assert_allclose(req.arrays["jaw_pose"], [[0.25, 0.0, 0.0]])  # the object's FLAME values go out
    np.testing.assert_allclose(req.arrays["expr"][0, :4], [0.8, 0.8, 0.8, 0.0])
    K = torch.from_numpy(req.arrays["intrinsics"]).double()
    w2c = torch.from_numpy(req.arrays["world_to_cam"]).double()
    points = _landmarks(head, avatar, req.arrays).double()
    uv, depth = project(points, Cameras(K[None], w2c[None], width, height))

    blender = [world_to_camera_view(sc, cam, obj.matrix_world @ Vector(p.tolist())) for p in points]
    expected = torch.tensor([[v.x * width, (1.0 - v.y) * height] for v in blender], dtype=torch.float64)
    inside = (expected[:, 0] > 0) & (expected[:, 0] < width) & (expected[:, 1] > 0) & (expected[:, 1] < height)
    assert inside.sum() >= 60  # the face is in view
    err = (uv[0] - expected).norm(dim=-1)
    assert err.max() < 0.5, f"max landmark error {err.max():.3f} px"
    blender_depth = torch.tensor([v.z for v in blender], dtype=torch.float64)
    torch.testing.assert_close(depth[0] * req.depth_scale, blender_depth, rtol=1e-4, atol=1e-5)


def test_non_uniform_avatar_scale_is_refused(scene, addon, backend) -> None:
    import bpy

    scene.objects["Head"].scale = (1.0, 2.0, 1.0)
    with pytest.raises(addon.compositing_requests.CompositeError, match="Head.*uniform"):
        addon.compositing_requests.frame_requests(scene, bpy.context.evaluated_depsgraph_get(), {"Head": backend[1]})


def test_cameras_the_service_cannot_render_through_are_refused(scene, addon, backend) -> None:
    import bpy

    scene.camera.data.type = "ORTHO"
    with pytest.raises(addon.compositing_requests.CompositeError, match="camera 'Camera' is orthographic"):
        addon.compositing_requests.frame_requests(scene, bpy.context.evaluated_depsgraph_get(), {"Head": backend[1]})
    scene.camera = None
    with pytest.raises(addon.compositing_requests.CompositeError, match="the scene has no camera"):
        addon.compositing_requests.frame_requests(scene, bpy.context.evaluated_depsgraph_get(), {"Head": backend[1]})


SIZE = 64
WORLD = (0.05, 0.1, 0.3)


def _render(sc, path: Path) -> np.ndarray:
    """F12 with the image written (the handlers run as in any render); [H, W, 4] top row first."""
    import bpy

    sc.render.filepath = str(path)
    assert bpy.ops.render.render(write_still=True) == {"FINISHED"}
    img = bpy.data.images.load(str(path))
    try:
        px = np.array(img.pixels[:], np.float32).reshape(img.size[1], img.size[0], 4)[::-1]
    finally:
        bpy.data.images.remove(img)
    return px


def _cube(name: str, location: tuple[float, float, float], size: float, color: tuple[float, float, float, float]):
    import bpy

    mesh = bpy.data.meshes.new(name)
    h = size / 2
    verts = [(x, y, z) for x in (-h, h) for y in (-h, h) for z in (-h, h)]
    faces = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    mesh.from_pydata(verts, [], faces)
    obj = bpy.data.objects.new(name, mesh)
    obj.location, obj.color = location, color
    bpy.context.scene.collection.objects.link(obj)
    return obj


def test_meshes_in_front_hide_the_head_and_the_head_hides_what_is_behind(scene, addon, backend, tmp_path: Path) -> None:
    import bpy

    sc = scene
    addon.compositing.setup_compositing(sc)  # before the size is set: the images follow the render size
    sc.render.engine = "BLENDER_WORKBENCH"
    sc.display.render_aa = "OFF"
    sc.display.shading.light = "FLAT"
    sc.display.shading.color_type = "OBJECT"
    sc.render.resolution_x = sc.render.resolution_y = SIZE
    sc.render.image_settings.file_format = "OPEN_EXR"
    sc.world = bpy.data.worlds.new("World")
    sc.world.color = WORLD
    head_obj = sc.objects["Head"]
    assert not head_obj.modifiers[addon.pointcloud.MODIFIER].show_render  # Blender draws no proxy points

    # The service's own render of this frame, asked directly with the handler's request.
    (req,) = addon.compositing_requests.frame_requests(sc, bpy.context.evaluated_depsgraph_get(), {"Head": backend[1]})
    with Client(backend[0], timeout_s=120.0, retries=0) as c:
        reply = c.call("render", req.args, req.arrays)
    head = full_frame(reply.arrays, reply.result, SIZE, SIZE)  # the handler asks for the head's window only
    head_rgba, head_depth = head["rgba"], head["depth"]
    solid = np.argwhere(head_rgba[..., 3] > 0.995)
    assert len(solid) > 50
    row, col = solid[np.argmin(np.linalg.norm(solid - solid.mean(0), axis=1))]  # the head's centre
    centre_depth = float(head_depth[row, col])

    alone = _render(sc, tmp_path / "alone.exr")
    expected = head_rgba[..., :3] + (1.0 - head_rgba[..., 3:4]) * alone[0, 0, :3]  # premultiplied head over the world
    np.testing.assert_allclose(alone[..., :3], expected, atol=2e-3)
    assert np.abs(alone[row, col, :3] - alone[0, 0, :3]).max() > 0.05  # the head is there

    # A cube between the camera and the head, covering its centre; then the same cube alone.
    halfway = np.array(sc.camera.matrix_world.translation) + (centre_depth * 0.5) * _pixel_ray(sc, col, row)
    front = _cube("Front", tuple(halfway), 0.03, (0.0, 1.0, 0.0, 1.0))
    with_front = _render(sc, tmp_path / "front.exr")
    head_obj.hide_render = True
    front_only = _render(sc, tmp_path / "front_only.exr")
    head_obj.hide_render = False
    np.testing.assert_allclose(with_front[row, col], front_only[row, col], atol=1e-4)
    assert front_only[row, col, 1] > 4 * front_only[row, col, [0, 2]].max()  # the green cube

    # A wall behind the head: the head's centre shows the head, the wall shows beside it.
    bpy.data.objects.remove(front)
    _cube("Wall", (0.2, 0.5, 1.5), 0.3, (1.0, 0.0, 0.0, 1.0))
    with_wall = _render(sc, tmp_path / "wall.exr")
    head_obj.hide_render = True
    wall_only = _render(sc, tmp_path / "wall_only.exr")
    head_obj.hide_render = False
    np.testing.assert_allclose(with_wall[row, col, :3], head_rgba[row, col, :3] + (1 - head_rgba[row, col, 3]) * wall_only[row, col, :3], atol=2e-3)
    assert wall_only[row, col, 0] > 4 * wall_only[row, col, 1:3].max()  # the red wall is behind the head's centre
    assert np.abs(with_wall[row, col, :3] - wall_only[row, col, :3]).max() > 0.05
    empty = head_rgba[..., 3] == 0
    np.testing.assert_allclose(with_wall[empty][..., :3], wall_only[empty][..., :3], atol=1e-5)


def _pixel_ray(sc, col: int, row: int) -> np.ndarray:
    """Unit world direction through pixel (row, col)'s centre, from Blender's view frame."""
    frame = sc.camera.data.view_frame(scene=sc)  # corners in camera space: top-right, bottom-right, bottom-left, top-left
    tr, br, bl, tl = (np.array(v) for v in frame)
    u, v = (col + 0.5) / SIZE, (row + 0.5) / SIZE
    p = tl + u * (tr - tl) + v * (bl - tl)
    d = np.array(sc.camera.matrix_world.to_3x3()) @ p
    return d / np.linalg.norm(d)


def test_two_avatars_merge_nearest_first(addon) -> None:
    """Per pixel the nearer avatar lies over the farther one, whichever order they come in."""
    cf = addon.compositing_frames
    near = np.zeros((2, 2, 4), np.float32)
    near[0] = (0.25, 0.0, 0.0, 0.5)  # top row: half-covering red at depth 1
    far = np.zeros((2, 2, 4), np.float32)
    far[:, 0] = (0.0, 0.6, 0.0, 0.6)  # left column: green at depth 2
    d_near = np.where(near[..., 3] > 0, 1.0, 0.0).astype(np.float32)
    d_far = np.where(far[..., 3] > 0, 2.0, 0.0).astype(np.float32)
    for layers in ([(near, d_near), (far, d_far)], [(far, d_far), (near, d_near)]):
        rgba, depth = cf.combine_layers(layers)
        np.testing.assert_allclose(rgba[0, 0], (0.25, 0.3, 0.0, 0.8))  # red over half the green
        np.testing.assert_allclose(rgba[0, 1], near[0, 1])
        np.testing.assert_allclose(rgba[1, 0], far[1, 0])
        np.testing.assert_array_equal(rgba[1, 1], 0.0)
        np.testing.assert_array_equal(depth, [[1.0, 1.0], [2.0, cf.FAR_DEPTH]])


def test_an_avatar_the_backend_lacks_is_named(scene, addon, backend) -> None:
    """Without the file in the .blend, a missing avatar is an error that names the object and the id."""
    ca = addon.compositing_avatars
    obj = scene.objects["Head"]
    with addon.connection.open_client(addon.connection.Settings(backend[0], 60.0, 0)) as client:
        assert ca.resolve(client, obj, backend[1]) == backend[1]
        with pytest.raises(ca.MissingAvatar, match="object 'Head' shows avatar av_0000000000000000"):
            ca.resolve(client, obj, "av_0000000000000000")


def test_the_extension_carries_the_torch_free_camera_math(addon) -> None:
    """Inside the built extension the camera conversion is its own ``wire`` copy, free of torch."""
    bcm = addon.compositing_frames.bcm
    assert bcm.__name__ == f"{addon.__name__}.wire.blender_camera_math"
    assert not re.search(r"^\s*(import|from) torch\b", Path(bcm.__file__).read_text(), re.M)
