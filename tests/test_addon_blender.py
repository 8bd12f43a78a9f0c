"""The add-on in real Blender (the bpy module, which behaves like ``blender -b --factory-startup``).

The extension is built and validated with Blender's own tool, installed from the zip into a
fresh extension repository and enabled; every test then starts from an empty file.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.addon_support import build_zip, free_port, set_prefs, start_backend

pytestmark = pytest.mark.blender


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_zip(tmp_path_factory.mktemp("dist"))  # validates too


@pytest.fixture()
def bpy_empty(addon):
    import bpy

    bpy.ops.wm.read_homefile(use_empty=True)  # keeps the preferences, so the add-on stays enabled
    return bpy


def _buffers(pc, n: int, seed: int = 0):
    r = np.random.default_rng(seed)
    return pc.GaussianBuffers(
        positions=r.normal(size=(n, 3)).astype(np.float32),
        scales=r.uniform(1e-3, 1e-2, (n, 3)).astype(np.float32),
        rotations=r.normal(size=(n, 4)).astype(np.float32),
        opacities=r.uniform(size=n).astype(np.float32),
        colors=r.uniform(size=(n, 3)).astype(np.float32),
    )


def _anim(fd, t: int, seed: int = 1):
    r = np.random.default_rng(seed)
    poses = {k: r.normal(size=(t, w)).astype(np.float32) for k, w in fd.POSE_FIELDS.items()}
    return fd.FlameAnimation(r.normal(size=(t, 100)).astype(np.float32), poses, r.normal(size=300).astype(np.float32))


def test_zip_holds_addon_and_wire_only(built: Path) -> None:
    names = set(zipfile.ZipFile(built).namelist())
    assert {"__init__.py", "blender_manifest.toml", "wire/__init__.py", "wire/protocol.py", "wire/client.py", "wire/environment.py"} <= names
    assert not any(n.startswith(("backend/", "tests/")) or n.endswith("build.py") for n in names)


def test_point_cloud_100k_and_save_reload(bpy_empty, addon, tmp_path: Path) -> None:
    bpy = bpy_empty
    pc, fd, aio = addon.pointcloud, addon.flame_data, addon.animation_io
    g = _buffers(pc, 100_000)
    obj = pc.create_avatar_object("Avatar", g)
    mesh = obj.data
    assert len(mesh.vertices) == 100_000 and len(mesh.edges) == 0
    mod = obj.modifiers[pc.MODIFIER]
    assert mod.type == "NODES" and any(n.bl_idname == "GeometryNodeMeshToPoints" for n in mod.node_group.nodes)
    # The evaluated point cloud is an instance of the object (this works from Blender 4.2 on).
    clouds = [i.object.data for i in bpy.context.evaluated_depsgraph_get().object_instances if i.is_instance and i.parent.name == obj.name]
    assert len(clouds) == 1 and len(clouds[0].points) == 100_000

    anim = _anim(fd, 12)
    aio.import_animation(obj, anim, 1, 1.0)
    path = tmp_path / "avatar.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(path))
    bpy.ops.wm.read_homefile(use_empty=True)
    assert "Avatar" not in bpy.data.objects
    bpy.ops.wm.open_mainfile(filepath=str(path))

    obj = bpy.data.objects["Avatar"]
    co = np.empty(300_000, np.float32)
    obj.data.vertices.foreach_get("co", co)
    np.testing.assert_array_equal(co.reshape(-1, 3), g.positions)
    np.testing.assert_array_equal(pc.read_attribute(obj.data, "opacity"), g.opacities)
    np.testing.assert_array_equal(pc.read_attribute(obj.data, "scale"), g.scales)
    np.testing.assert_array_equal(pc.read_attribute(obj.data, "rotation"), g.rotations)
    np.testing.assert_array_equal(pc.read_attribute(obj.data, "color")[:, :3], g.colors)
    assert obj.modifiers[pc.MODIFIER].node_group.name == pc.NODE_GROUP
    back = aio.export_animation(obj, 1, 12)
    np.testing.assert_array_equal(back.expr, anim.expr)
    np.testing.assert_array_equal(back.poses["jaw_pose"], anim.poses["jaw_pose"])


def test_import_export_flame_npz_operators(bpy_empty, addon, tmp_path: Path) -> None:
    bpy = bpy_empty
    fd, aio = addon.flame_data, addon.animation_io
    obj = addon.pointcloud.create_avatar_object("Avatar", _buffers(addon.pointcloud, 100))
    bpy.context.view_layer.objects.active = obj
    anim = _anim(fd, 40)
    src = fd.write_flame_npz(tmp_path / "flame_param.npz", anim)
    bpy.context.scene.render.fps, bpy.context.scene.render.fps_base = 50, 1.0
    assert bpy.ops.spatialavatar.import_flame(filepath=str(src), frame_start=10, file_fps=25.0) == {"FINISHED"}

    fcurves = aio.fcurve_collection(obj, create=False)
    assert len(fcurves) == 118
    for prop, idx, column in (("expr_0", 3, anim.expr[:, 3]), ("expr_3", 24, anim.expr[:, 99]), ("eyes_pose", 5, anim.poses["eyes_pose"][:, 5])):
        fc = fcurves.find(f"{fd.PROP_GROUP}.{prop}", index=idx)
        got = [fc.evaluate(10 + 2 * k) for k in range(40)]  # 25 fps file in a 50 fps scene
        np.testing.assert_allclose(got, column, rtol=0, atol=1e-6)
    bpy.context.scene.frame_set(10 + 2 * 7)
    np.testing.assert_allclose(obj.spatialavatar_flame.jaw_pose, anim.poses["jaw_pose"][7], atol=1e-6)

    out = tmp_path / "out.npz"
    # The keyed range holds 79 scene frames; exporting every other one gives the file back.
    back = aio.export_file(obj, out, 10, 10 + 2 * 39, 2.0)
    again = fd.read_flame_npz(out)
    np.testing.assert_allclose(again.expr, anim.expr, atol=1e-6)
    for k in fd.POSE_FIELDS:
        np.testing.assert_allclose(again.poses[k], anim.poses[k], atol=1e-6)
    np.testing.assert_allclose(again.shape, anim.shape, atol=1e-6)
    assert back.frames == 40
    assert bpy.ops.spatialavatar.export_flame(filepath=str(tmp_path / "op.npz")) == {"FINISHED"}
    assert fd.read_flame_npz(tmp_path / "op.npz").frames == 79


def test_import_reports_a_bad_file(bpy_empty, addon, tmp_path: Path) -> None:
    bpy = bpy_empty
    obj = addon.pointcloud.create_avatar_object("Avatar", _buffers(addon.pointcloud, 10))
    bpy.context.view_layer.objects.active = obj
    np.savez(tmp_path / "bad.npz", rotation=np.zeros((3, 3)))
    with pytest.raises(RuntimeError, match="no 'expr' array"):
        bpy.ops.spatialavatar.import_flame(filepath=str(tmp_path / "bad.npz"))


@pytest.fixture()
def backend_process(tmp_path: Path):
    proc = start_backend(tmp_path / "store")
    yield proc.endpoint
    proc.stop()


def test_connection_to_a_real_backend(bpy_empty, addon, backend_process: str) -> None:
    bpy = bpy_empty
    set_prefs(bpy, backend_process, 30.0, 1)
    assert bpy.ops.spatialavatar.test_connection() == {"FINISHED"}
    status = addon.operators.status
    assert status["ok"] and status["info"]["device"] == "cpu"
    assert re.match(r"SpatialAvatar \S+ on ", status["text"])
    assert bpy.ops.spatialavatar.list_avatars() == {"FINISHED"}
    assert status["avatars"] == []


def test_load_avatar_from_a_real_backend(bpy_empty, addon, backend_process: str) -> None:
    import torch

    from backend.gaussians.avatar import deform
    from backend.gaussians.files import avatar_to_bytes
    from backend.gaussians.surface import surface_avatar
    from backend.head.registry import load_head_model
    from backend.wire.client import Client

    head = load_head_model()
    avatar = surface_avatar(head, torch.zeros(head.n_shape), 2000, lambda f, b: torch.full((f.shape[0], 3), 0.5))
    with Client(backend_process, timeout_s=60.0, retries=0) as c:
        aid = c.call("import", {"name": "probe"}, {"file": np.frombuffer(avatar_to_bytes(avatar), np.uint8)}).result["avatar"]["id"]
    with torch.no_grad():
        means = deform(avatar, head, avatar.params_for(head.neutral_params(1))).means[0].numpy()

    bpy = bpy_empty
    set_prefs(bpy, backend_process, 60.0, 0)
    addon.operators.status["ok"] = False
    assert not bpy.ops.spatialavatar.load_avatar.poll()
    assert bpy.ops.spatialavatar.test_connection() == {"FINISHED"}
    assert bpy.ops.spatialavatar.load_avatar(avatar=aid) == {"FINISHED"}
    obj = bpy.context.view_layer.objects.active
    assert obj.name == aid and obj[addon.avatars.AVATAR_ID] == aid
    assert len(obj.data.vertices) == 2000
    co = np.empty(2000 * 3, np.float32)
    obj.data.vertices.foreach_get("co", co)
    np.testing.assert_allclose(co.reshape(-1, 3), means, atol=1e-5)
    np.testing.assert_allclose(addon.pointcloud.read_attribute(obj.data, "color")[:, :3], 0.5, atol=1e-3)
    with pytest.raises(RuntimeError, match="Could not load avatar av_0000000000000000"):
        bpy.ops.spatialavatar.load_avatar(avatar="av_0000000000000000")


def test_connection_error_when_nothing_listens(bpy_empty, addon) -> None:
    bpy = bpy_empty
    set_prefs(bpy, f"tcp://127.0.0.1:{free_port()}", 0.3, 0)
    with pytest.raises(RuntimeError, match="did not answer: hello: no reply"):
        bpy.ops.spatialavatar.test_connection()
    assert not addon.operators.status["ok"]
