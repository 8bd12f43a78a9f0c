"""The spatialavatar command line, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from plyfile import PlyData

from backend.gaussians.files import load_avatar

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "backend", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"spatialavatar {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def test_info_json() -> None:
    info = json.loads(run("info", "--json").stdout)
    assert info["head_model"]["name"] == "builtin-v1"
    assert info["head_model"]["expression_components"] >= 50
    assert "smile_L" in info["head_model"]["expression_names"]
    assert 0.2 < info["head_model"]["sizes_m"]["height"] < 0.5  # metres: chin-to-crown plus the neck


def test_head_picks_a_shipped_head_and_excludes_flame() -> None:
    info = json.loads(run("info", "--head", "ict", "--json").stdout)
    assert info["head_model"]["source"] == "ict" and "mouthSmileLeft" in info["head_model"]["expression_names"]
    assert json.loads(run("info", "--head", "builtin", "--json").stdout)["head_model"]["name"] == "builtin-v1"
    proc = run("info", "--head", "ict", "--flame", "builtin", check=False)
    assert proc.returncode == 2 and "not allowed with argument --head" in proc.stderr
    assert "invalid choice" in run("info", "--head", "flame2020", check=False).stderr


def test_unknown_flag_is_a_clear_error() -> None:
    proc = run("info", "--no-such-flag", check=False)
    assert proc.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in proc.stderr


def test_missing_files_are_one_line_errors(tmp_path) -> None:
    proc = run("export-ply", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "x.ply"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"spatialavatar export-ply: error: avatar file not found: {tmp_path / 'nope.npz'}"]
    proc = run("info", "--flame", str(tmp_path / "flame"), check=False)
    assert proc.returncode == 2 and "FLAME path does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_synth_init_render_export(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no LPIPS weights in the commands' hub cache
    subject = tmp_path / "subject"
    out = json.loads(run("synth", str(subject), "--frames", "3", "--size", "64", "--reference-gaussians", "20000", "--json").stdout)
    assert out["frames"] == 3
    avatar_path = tmp_path / "avatar.npz"
    out = json.loads(run("init", str(subject), "--out", str(avatar_path), "--gaussians", "3000", "--json").stdout)
    assert out["gaussians"] == 3000 and out["visible_share"] > 0.2
    assert load_avatar(avatar_path).count == 3000
    frames = tmp_path / "frames"
    out = json.loads(run("render", str(avatar_path), "--anim", str(subject / "flame_param.npz"), "--out", str(frames), "--size", "64", "--json").stdout)
    assert out["frames"] == 3
    img = np.asarray(Image.open(frames / "frame_0001.png"))
    assert img.shape == (64, 64, 3) and img.std() > 10  # a head on a white background, not a blank frame
    assert (frames / "contact_sheet.png").is_file()
    refined = tmp_path / "refined.npz"
    summary = json.loads(run("refine", str(avatar_path), str(subject), "--out", str(refined), "--iters", "3", "--max-scale", "100", "--opacity-sparsity", "0.01", "--max-depth", "0.5", "--finetune-flame", "--exposure", "--json").stdout)
    assert summary["photometric_tracking"] is False  # by default only for tracked video on a GPU
    decided = load_avatar(refined).meta["refine_config"]
    assert decided["surface"]["max_depth"] == 0.5 and decided["finetune_flame"] is True  # on although the subject is synthetic
    assert decided["exposure"] is True
    scores = json.loads(run("evaluate", str(refined), str(subject), "--split", "train", "--against", str(avatar_path), "--json").stdout)
    assert 0.0 <= scores["orbit_holes"] < 0.5 and scores["gaussians"] == 3000
    assert scores["lpips"] is None and "never downloaded" in scores["lpips_note"]
    assert json.loads(run("evaluate", str(avatar_path), str(subject), "--split", "train", "--against", str(avatar_path), "--json").stdout)["orbit_holes"] == 0.0
    proc = run("evaluate", str(refined), str(subject), "--against", str(tmp_path / "nope.npz"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"spatialavatar evaluate: error: avatar file not found: {tmp_path / 'nope.npz'}"]
    ply = tmp_path / "a.ply"
    run("export-ply", str(avatar_path), "--out", str(ply), "--anim", str(subject / "flame_param.npz"), "--frame", "2")
    assert PlyData.read(str(ply))["vertex"].count == 3000
    proc = run("export-ply", str(avatar_path), "--out", str(ply), "--anim", str(subject / "flame_param.npz"), "--frame", "9", check=False)
    assert proc.returncode == 2 and "frame 9" in proc.stderr


def test_new_commands_refuse_bad_input_in_one_line(tmp_path) -> None:
    """train, demo, refine, evaluate, serve and blender-render name the bad flag or file and exit 2 without a traceback."""
    not_blend = tmp_path / "shot.blend"
    not_blend.write_text("not a blend file")
    cases = [
        (["train", "--phase", "1", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--log-every", "0"], "--log-every"),
        (["demo", "--out", str(tmp_path / "demo"), "--cpu-iters", "0"], "--cpu-iters 0"),
        (["demo", "--out", str(tmp_path / "demo"), "--portrait", str(tmp_path / "nope.png")], "nope.png"),
        (["refine", str(tmp_path / "a.npz"), str(tmp_path), "--out", str(tmp_path / "b.npz"), "--opacity-sparsity", "-1"], "--opacity-sparsity -1"),
        (["refine", str(tmp_path / "a.npz"), str(tmp_path), "--out", str(tmp_path / "b.npz"), "--max-depth", "0"], "--max-depth 0"),
        (["refine", str(tmp_path / "a.npz"), str(tmp_path), "--out", str(tmp_path / "b.npz"), "--lpips", "-1"], "--lpips -1"),
        (["refine", str(tmp_path / "a.npz"), str(tmp_path), "--out", str(tmp_path / "b.npz"), "--lpips-weights", str(tmp_path)], "give --lpips WEIGHT"),
        (["refine", str(tmp_path / "a.npz"), str(tmp_path), "--out", str(tmp_path / "b.npz"), "--lpips", "0.1", "--lpips-weights", str(tmp_path / "no")], "not a folder"),
        (["evaluate", str(tmp_path / "a.npz"), str(tmp_path), "--lpips-weights", str(tmp_path / "no")], "--lpips-weights"),
        (["refine", str(tmp_path / "a.npz"), str(tmp_path), "--out", str(tmp_path / "b.npz"), "--finetune-flame=yes"], "--finetune-flame"),
        (["serve", "--store", str(tmp_path / "store"), "--shared-slots", "-1"], "--shared-slots -1"),
        (["blender-render", str(not_blend)], "not a .blend file"),
        (["blender-render", str(not_blend), "--frames", "5..2"], "--frames 5..2"),
    ]
    for args, needle in cases:
        proc = run(*args, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert needle in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
