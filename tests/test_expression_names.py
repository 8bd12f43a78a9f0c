"""flame_param.npz keeps the expression names of the head it was made for, and a head whose
names disagree refuses it in one sentence instead of driving the wrong expressions; files
without names (older ones, heads without names) load as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backend.cli import main
from backend.data.synthetic import SynthConfig, synthesize
from backend.gaussians.files import save_avatar
from backend.gaussians.surface import surface_avatar
from backend.head.model import HeadModel
from backend.head.params import FlameParams
from backend.head.registry import load_head_model
from backend.wire import expression_names
from backend.wire.errors import InputError


@pytest.fixture(scope="module")
def ict() -> HeadModel:
    return load_head_model("ict")


def _smiling(head: HeadModel, frames: int = 3) -> FlameParams:
    params = head.neutral_params(frames)
    params.expr[:, 2] = 0.8
    return params


def test_a_file_stores_its_heads_names_and_another_head_refuses_it(head: HeadModel, ict: HeadModel, tmp_path: Path) -> None:
    path = tmp_path / "flame_param.npz"
    _smiling(head).save(path)
    with np.load(path, allow_pickle=False) as z:
        assert z["expr_names"].tolist() == list(head.expr_names)
    params = FlameParams.load(path)
    assert params.expr_names == head.expr_names
    assert params.index([1]).to("cpu").detach_clone().expr_names == head.expr_names  # kept by every copy
    head(params)  # its own head poses it
    # The ICT head's expression 0 is browDownLeft, not the built-in head's brow_raise_L.
    with pytest.raises(InputError, match=r"expression 0 is 'brow_raise_L' there but 'browDownLeft' in head model 'ict-facekit-v1'"):
        ict(params)
    with pytest.raises(InputError, match=rf"{path.name}: expression 0 .* made for another head"):
        params.check_head(ict.name, ict.expr_names, str(path))
    # A head with no names at all refuses named files too: they mean something it cannot tell.
    with pytest.raises(InputError, match="but no name in head model 'plain'"):
        params.check_head("plain", ())


def test_a_file_without_names_loads_on_any_head(head: HeadModel, ict: HeadModel, tmp_path: Path) -> None:
    np.savez(tmp_path / "old.npz", expr=np.zeros((2, 10), np.float32), jaw_pose=np.zeros((2, 3), np.float32))
    params = FlameParams.load(tmp_path / "old.npz")
    assert params.expr_names == ()
    assert head(params).vertices.shape[0] == 2 and ict(params).vertices.shape[0] == 2
    # Parameters built in memory carry no names either (the service's requests).
    unnamed = FlameParams.neutral(1, head.n_shape, head.n_expr)
    ict(unnamed)
    assert "expr_names" not in unnamed.to_numpy_dict()


@pytest.mark.parametrize(
    "names, words",
    [
        (np.array([[b"a"]]), "'expr_names' must be a list of strings"),
        (np.arange(3), "'expr_names' must be a list of strings"),
        (np.array(["a", "b", "c", "d"]), "'expr_names' names 4 expressions, 'expr' has 3 columns"),
    ],
)
def test_malformed_names_are_refused(tmp_path: Path, names: np.ndarray, words: str) -> None:
    np.savez(tmp_path / "bad.npz", expr=np.zeros((2, 3), np.float32), expr_names=names)
    with pytest.raises(InputError, match=f"bad.npz: {words}"):
        FlameParams.load(tmp_path / "bad.npz")


def test_names_are_checked_position_by_position() -> None:
    expression_names.check(("a", "b"), ("a", "b", "c"), "head", "f")  # a named prefix is enough
    expression_names.check((), ("a",), "head", "f")
    with pytest.raises(InputError, match="expression 1 is 'c' there but 'b' in head"):
        expression_names.check(("a", "c"), ("a", "b"), "head", "f")
    with pytest.raises(InputError, match="expression 2 is 'c' there but no name in head"):
        expression_names.check(("a", "b", "c"), ("a", "b"), "head", "f")


def test_commands_refuse_parameters_made_for_another_head(head: HeadModel, ict: HeadModel, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """render and refine stop before they render or refine anything, in one line naming the file."""
    avatar = surface_avatar(head, torch.zeros(head.n_shape), 1000, lambda f, b: torch.full((f.shape[0], 3), 0.5))
    save_avatar(avatar, tmp_path / "avatar.npz")
    anim, frames = tmp_path / "ict_take.npz", tmp_path / "frames"
    _smiling(ict, 1).save(anim)
    assert main(["render", str(tmp_path / "avatar.npz"), "--anim", str(anim), "--out", str(frames), "--size", "32"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{anim}: expression 0 is 'browDownLeft' there but 'brow_raise_L' in head model 'builtin-v1'" in lines[0]
    assert not frames.exists()

    subject = synthesize(head, tmp_path / "subject", SynthConfig(frames=1, size=32, reference_gaussians=1000))
    (subject / "flame_param.npz").write_bytes(anim.read_bytes())  # as if tracked on the ICT head
    out = tmp_path / "refined.npz"
    assert main(["refine", str(tmp_path / "avatar.npz"), str(subject), "--out", str(out), "--iters", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{subject / 'flame_param.npz'}: expression 0 is 'browDownLeft'" in lines[0]
    assert not out.exists()
