"""A user's own FLAME-format head: what they are told when its UV map leaves triangles without
Gaussians, and when its contour landmark embedding is missing (library and command line)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from backend.gaussians.layout import sample_layout
from backend.head.flame_files import DYNAMIC_EMBEDDING, read_flame, write_flame
from backend.head.model import HeadModel
from backend.wire.errors import HeadModelError

REPO = Path(__file__).resolve().parents[1]


def _spoilt_uv_faces(uv_faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every 10th triangle takes its predecessor's UVs (a chart lying under another, as a
    mirrored half would), and every 50th (from 5 on) gets UVs of no area.
    Returns (uv_faces, the triangles under others, the flat triangles)."""
    ft = uv_faces.copy()
    under = np.arange(1, len(ft), 10)
    ft[under] = ft[under - 1]
    flat = np.arange(5, len(ft), 50)
    ft[flat] = ft[flat][:, :1]
    return ft, under, flat


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


def test_triangles_no_gaussian_can_reach_are_warned_about(head: HeadModel) -> None:
    ft, under, flat = _spoilt_uv_faces(head.data.uv_faces)
    with pytest.warns(UserWarning, match="carry no Gaussians at any count") as caught:
        binding = sample_layout(head.data.uv_coords, ft, 100_000)
    message = str(caught[0].message)
    assert f"{len(flat)} have UVs of no area" in message
    hidden = int(message.split(" and ")[1].split()[0])  # "... and N lie under other triangles' UVs"
    assert 0.5 * len(under) < hidden <= len(under)  # a few spoilt triangles are too small to hold a texel centre anyway
    bare = np.union1d(under, flat)
    assert not np.isin(binding.face_idx.numpy(), bare).any()  # what the warning names indeed has no Gaussian

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped head's UV map: no warning at any count
        for count in (1_000, 20_000, 100_000):
            sample_layout(head.data.uv_coords, head.data.uv_faces, count)


def test_the_warning_reaches_the_command_line_as_one_line(head: HeadModel, tmp_path: Path) -> None:
    folder = write_flame(head.data, tmp_path / "flame")
    ft, _, _ = _spoilt_uv_faces(head.data.uv_faces)
    np.savez(folder / "FLAME_texture.npz", vt=head.data.uv_coords.astype(np.float32), ft=ft)
    proc = _run(
        "synth", str(tmp_path / "subject"), "--flame", str(folder), "--frames", "1", "--size", "64", "--reference-gaussians", "20000"
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "carry no Gaussians" in line]
    assert len(lines) == 1 and lines[0].startswith("spatialavatar synth: warning: layout: ")
    assert "UserWarning" not in proc.stderr  # not Python's two-line form with a source path


def test_a_missing_contour_embedding_says_what_it_is_for(head: HeadModel, tmp_path: Path) -> None:
    folder = write_flame(head.data, tmp_path / "flame")
    read_flame(folder, n_shape=head.n_shape, n_expr=head.n_expr)  # loads with every file in place
    (folder / DYNAMIC_EMBEDDING).unlink()
    with pytest.raises(HeadModelError, match=f"missing .*{DYNAMIC_EMBEDDING}: the contour landmarks .*Only the tracker's fit uses them"):
        read_flame(folder)
    proc = _run("info", "--flame", str(folder))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "contour landmarks" in proc.stderr and "Traceback" not in proc.stderr
