"""The add-on's Blender-independent FLAME channel logic (no bpy) and the build's staging step."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.blender

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


flame_data = _load("sa_flame_data", ROOT / "blender_addon" / "flame_data.py")
build = _load("sa_build", ROOT / "blender_addon" / "build.py")


def _anim(t: int = 7, e: int = 100, seed: int = 0):
    r = np.random.default_rng(seed)
    poses = {k: r.normal(size=(t, w)).astype(np.float32) for k, w in flame_data.POSE_FIELDS.items()}
    return flame_data.FlameAnimation(r.normal(size=(t, e)).astype(np.float32), poses, r.normal(size=300).astype(np.float32))


def test_expression_chunks_fit_blender_vectors() -> None:
    assert flame_data.EXPR_CHUNK <= 32 and flame_data.MAX_EXPR == 100
    assert flame_data.expr_location(0) == ("expr_0", 0)
    assert flame_data.expr_location(99) == ("expr_3", 24)
    with pytest.raises(IndexError):
        flame_data.expr_location(100)
    assert flame_data.expression_labels(["smile", ""], 3) == ["smile", "expr_001", "expr_002"]


def test_channels_round_trip_and_npz(tmp_path: Path) -> None:
    anim = _anim()
    chans = anim.channels()
    assert len(chans) == 100 + 18
    back = flame_data.FlameAnimation.from_channels(100, {c: v for c, v in chans}, anim.frames, anim.shape)
    np.testing.assert_array_equal(back.expr, anim.expr)
    path = flame_data.write_flame_npz(tmp_path / "f.npz", back)
    again = flame_data.read_flame_npz(path)
    np.testing.assert_array_equal(again.expr, anim.expr)
    for k in flame_data.POSE_FIELDS:
        np.testing.assert_array_equal(again.poses[k], anim.poses[k])
    np.testing.assert_array_equal(again.shape, anim.shape)


def test_bad_files_name_the_field(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", expr=np.zeros((3, 10)), jaw_pose=np.zeros((2, 3)))
    with pytest.raises(flame_data.FlameFileError, match="jaw_pose"):
        flame_data.read_flame_npz(tmp_path / "a.npz")
    (tmp_path / "b.npz").write_bytes(b"nope")
    with pytest.raises(flame_data.FlameFileError, match="b.npz"):
        flame_data.read_flame_npz(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", expr=np.full((2, 3), np.nan))
    with pytest.raises(flame_data.FlameFileError, match="NaN"):
        flame_data.read_flame_npz(tmp_path / "c.npz")


def test_keyframe_coords_and_rates() -> None:
    co = flame_data.keyframe_coords(np.array([5.0, 6.0, 7.0]), 10, 2.0).reshape(-1, 2)
    np.testing.assert_array_equal(co, [[10, 5], [12, 6], [14, 7]])
    assert flame_data.frame_step_for(25, 50) == 2.0


def test_stage_copies_the_wire_folder_whole(tmp_path: Path) -> None:
    src = build.stage(tmp_path / "stage")
    assert sorted(p.name for p in (src / "wire").iterdir()) == sorted(p.name for p in (ROOT / "backend" / "wire").glob("*.py"))
    client = (src / "wire" / "client.py").read_text()
    assert "from .protocol import" in client and "backend" not in "".join(l for l in client.splitlines() if l.startswith(("from", "import")))
    assert (src / "blender_manifest.toml").is_file() and not (src / "build.py").exists()
    with pytest.raises(build.BuildError, match="torch"):
        build.check_self_contained("import torch\n", "x.py")
    build.check_self_contained("from .arkit_csv import read_live_link_csv\n", "x.py")
    with pytest.raises(build.BuildError, match="imports its siblings relatively"):
        build.check_self_contained("from backend.head.model import HeadModelData\n", "x.py")  # not carried


def test_flame_files_keep_expression_names_and_refuse_another_heads(tmp_path: Path) -> None:
    anim = _anim(e=3)
    anim.expr_names = ("jawOpen", "eyeBlinkLeft")
    path = flame_data.write_flame_npz(tmp_path / "f.npz", anim)
    assert flame_data.read_flame_npz(path, ("jawOpen", "eyeBlinkLeft", "x")).expr_names == ("jawOpen", "eyeBlinkLeft")
    with pytest.raises(ValueError, match="f.npz: expression 1 is 'eyeBlinkLeft' there but 'blink_L' in the avatar"):
        flame_data.read_flame_npz(path, ("jawOpen", "blink_L"))
