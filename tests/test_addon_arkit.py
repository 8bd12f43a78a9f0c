"""ARKit curves in the add-on (real bpy): Import ARKit Curves keys a Live Link Face CSV on the
avatar's expressions by their ARKit names and on its neck, at the scene's frame rate, exactly as
``spatialavatar arkit`` writes them; bad files and heads without ARKit names are one error
report with nothing keyed. flame_param.npz files carry the head's expression names through
Import / Export FLAME Animation, and a file made for another head is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend.head.arkit_curves import to_flame_params
from backend.head.registry import load_head_data
from backend.wire.arkit_csv import read_live_link_csv, resample
from tests.addon_support import draw_panels
from tests.test_arkit_curves import COLUMNS, recording

pytestmark = pytest.mark.blender

ICT = load_head_data("ict")
BUILTIN = load_head_data("builtin")


@pytest.fixture()
def bpy_empty(addon):
    import bpy

    bpy.ops.wm.read_homefile(use_empty=True)  # keeps the preferences, so the add-on stays enabled
    bpy.context.scene.render.fps, bpy.context.scene.render.fps_base = 30, 1.0
    return bpy


def _avatar(bpy, addon, head=ICT, name: str = "Head"):
    """An avatar object as Load Avatar makes it: points, the avatar id, the head's expression names."""
    r = np.random.default_rng(0)
    arrays = {
        "positions": r.normal(size=(50, 3)).astype(np.float32),
        "scales": np.full((50, 3), 0.01, np.float32),
        "rotations": np.tile(np.float32([1, 0, 0, 0]), (50, 1)),
        "opacities": np.ones(50, np.float32),
        "colors": np.full((50, 3), 0.5, np.float32),
    }
    described = {"expression_components": head.n_expr, "expression_names": list(head.expr_names)} if head is not None else None
    obj = addon.avatars.add_object(name, "av_0123456789abcdef", arrays, described, bpy.context.scene.collection)
    bpy.context.view_layer.objects.active = obj
    return obj


def _keys(addon, obj) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """Every FLAME F-curve's keyframes: (data path, index) -> [(frame, value), ...]."""
    fcurves = addon.animation_io.fcurve_collection(obj, create=False)
    return {} if fcurves is None else {(fc.data_path, fc.array_index): [tuple(k.co) for k in fc.keyframe_points] for fc in fcurves}


def test_a_live_link_recording_keys_the_expressions_by_name_and_the_neck(bpy_empty, addon, tmp_path: Path) -> None:
    bpy, fd = bpy_empty, addon.flame_data
    obj = _avatar(bpy, addon)
    assert "operator:spatialavatar.import_arkit" in draw_panels(addon, bpy.context)  # beside Import FLAME Animation
    take = recording(tmp_path / "take.csv")  # 1 s at 60 fps: the jaw opens 0 -> 1, a left blink at 0.5, yaw 0.3 rad
    assert bpy.ops.spatialavatar.import_arkit(filepath=str(take), frame_start=5) == {"FINISHED"}

    group = obj.spatialavatar_flame
    assert group.expression_count == 53
    prop, index = fd.expr_location(ICT.expr_names.index("jawOpen"))
    jaw = addon.animation_io.fcurve_collection(obj, create=False).find(f"{fd.PROP_GROUP}.{prop}", index=index)
    assert len(jaw.keyframe_points) == 31 and tuple(jaw.range()) == pytest.approx((5, 35))  # a key on every frame of the 30 fps scene
    np.testing.assert_allclose([jaw.evaluate(5 + k) for k in range(31)], np.arange(31) / 30, atol=1e-6)
    bpy.context.scene.frame_set(20)
    prop, index = fd.expr_location(ICT.expr_names.index("eyeBlinkLeft"))
    assert getattr(group, prop)[index] == pytest.approx(0.5)
    np.testing.assert_allclose(group.neck_pose, [0.0, -0.3, 0.0], atol=1e-6)  # Live Link's yaw turns toward the subject's right

    # Channel for channel what `spatialavatar arkit --head ict --fps 30` writes.
    cli, missing = to_flame_params(resample(read_live_link_csv(take), 30), ICT)
    keyed = addon.animation_io.export_animation(obj, 5, 31)
    np.testing.assert_allclose(keyed.expr, cli.expr.numpy(), atol=1e-6)
    for name in fd.POSE_FIELDS:
        np.testing.assert_allclose(keyed.poses[name], getattr(cli, name).numpy(), atol=1e-6)
    assert missing == ["TongueOut"]
    assert addon.animation_io.import_arkit_file(obj, take, 5, 30.0, 60.0)[1] == ("TongueOut",)


@pytest.mark.parametrize(
    "content, head, words",
    [
        ("", ICT, "no 'Timecode' column"),
        ("HeadYaw,JawOpen\n0.1,0.2\n", ICT, "no 'Timecode' column"),
        (",".join(COLUMNS) + "\n", ICT, "no rows after the header"),
        (",".join(COLUMNS) + "\n10:00:00:0.0,52,0.1,0.2\n", ICT, "row 2 has 4 fields"),
        (",".join(COLUMNS) + "\n10:00:00:0.0,52,wide,0,0,0,0,0,0,0\n", ICT, "row 2: could not convert string to float"),
        (None, BUILTIN, "avatar object 'Head' names no expression after ARKit's blendshapes"),
        (None, None, "avatar object 'Head' names no expression after ARKit's blendshapes"),
    ],
)
def test_a_bad_file_or_head_is_one_error_and_nothing_is_keyed(bpy_empty, addon, tmp_path: Path, content: str | None, head, words: str) -> None:
    bpy = bpy_empty
    obj = _avatar(bpy, addon, head)
    obj.spatialavatar_flame.jaw_pose = (0.2, 0.0, 0.0)
    obj.keyframe_insert("spatialavatar_flame.jaw_pose", frame=3)
    before, count = _keys(addon, obj), obj.spatialavatar_flame.expression_count
    path = recording(tmp_path / "take.csv") if content is None else tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RuntimeError, match=words):
        bpy.ops.spatialavatar.import_arkit(filepath=str(path))
    assert _keys(addon, obj) == before and obj.spatialavatar_flame.expression_count == count


def test_flame_files_carry_the_heads_names_and_another_heads_file_is_refused(bpy_empty, addon, tmp_path: Path) -> None:
    bpy, fd = bpy_empty, addon.flame_data
    obj = _avatar(bpy, addon)
    assert bpy.ops.spatialavatar.import_arkit(filepath=str(recording(tmp_path / "take.csv"))) == {"FINISHED"}
    out = tmp_path / "take.npz"
    assert bpy.ops.spatialavatar.export_flame(filepath=str(out)) == {"FINISHED"}
    with np.load(out, allow_pickle=False) as z:
        assert z["expr_names"].tolist() == list(ICT.expr_names)
    assert fd.read_flame_npz(out).expr_names == ICT.expr_names
    assert bpy.ops.spatialavatar.import_flame(filepath=str(out), file_fps=30.0) == {"FINISHED"}  # its own head takes it back

    other = _avatar(bpy, addon, BUILTIN, name="Other")
    other.spatialavatar_flame.jaw_pose = (0.2, 0.0, 0.0)
    other.keyframe_insert("spatialavatar_flame.jaw_pose", frame=3)
    before = _keys(addon, other)
    with pytest.raises(RuntimeError, match="take.npz: expression 0 is 'browDownLeft' there but 'brow_raise_L' in avatar object 'Other'"):
        bpy.ops.spatialavatar.import_flame(filepath=str(out))
    assert _keys(addon, other) == before
    # A file without names (older ones, other tools') still goes onto any avatar.
    np.savez(tmp_path / "plain.npz", expr=np.zeros((4, 50), np.float32))
    assert bpy.ops.spatialavatar.import_flame(filepath=str(tmp_path / "plain.npz")) == {"FINISHED"}
