"""LPIPS from local weight files (backend/refine/perceptual.py).

The real weights (AlexNet's ImageNet weights, LPIPS's per-channel weights) are not on this
machine and are never downloaded, so these tests write stand-in files of the same layout
with random values. Our network is checked against the `lpips` package's own code on those
files; that code builds AlexNet through torchvision, which has no wheel for the CPU build of
torch used here, so a stand-in torchvision (AlexNet's layer list, as torchvision documents
it) is put in front of it in a subprocess.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend.refine.perceptual import ALEXNET_FILE, LINEAR_FILE, Lpips, LpipsFiles, find_lpips_files, load_lpips
from tests.lpips_weights import stand_in_weights

ROOT = Path(__file__).resolve().parents[1]
STAND_IN_TORCHVISION = '''
import sys, types
from torch import nn
def alexnet(pretrained=False):
    assert not pretrained
    m = types.SimpleNamespace()
    m.features = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
    return m
tv = types.ModuleType("torchvision"); tv.models = types.ModuleType("torchvision.models"); tv.models.alexnet = alexnet
sys.modules["torchvision"] = tv; sys.modules["torchvision.models"] = tv.models
'''


LPIPS_PACKAGE = importlib.util.find_spec("lpips") is not None  # make installs it


@pytest.mark.skipif(not LPIPS_PACKAGE, reason="the lpips package is not installed (make installs it)")
def test_lpips_matches_the_lpips_package(tmp_path: Path) -> None:
    files = stand_in_weights(tmp_path / "weights")
    g = torch.Generator().manual_seed(1)
    # In float64, so that convolution algorithms and thread counts do not matter.
    a, b = torch.rand(2, 70, 90, 3, generator=g, dtype=torch.float64), torch.rand(2, 70, 90, 3, generator=g, dtype=torch.float64)
    torch.save((a, b), tmp_path / "images.pt")
    ours = Lpips(files).double()
    a_grad = a.clone().requires_grad_(True)
    distance = ours(a_grad, b)
    distance.sum().backward()
    code = STAND_IN_TORCHVISION + f"""
import torch, lpips
ref = lpips.LPIPS(net="alex", pnet_rand=True, model_path={str(files.linear)!r}, verbose=False).double()
backbone = torch.load({str(files.alexnet)!r}, weights_only=True)
for stage in (ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5):
    for name, layer in stage.named_children():
        if isinstance(layer, torch.nn.Conv2d):
            layer.load_state_dict({{"weight": backbone[f"features.{{name}}.weight"].double(), "bias": backbone[f"features.{{name}}.bias"].double()}})
a, b = torch.load({str(tmp_path / "images.pt")!r})
a = a.requires_grad_(True)
d = ref(a.permute(0, 3, 1, 2), b.permute(0, 3, 1, 2), normalize=True).flatten()
d.sum().backward()
torch.save((d.detach(), a.grad), {str(tmp_path / "reference.pt")!r})
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    expected, expected_grad = torch.load(tmp_path / "reference.pt")
    assert float(expected.min()) > 0
    torch.testing.assert_close(distance.detach(), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a_grad.grad, expected_grad, rtol=1e-8, atol=1e-14)


def test_lpips_is_a_distance_on_images(tmp_path: Path) -> None:
    lpips = Lpips(stand_in_weights(tmp_path))
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 64, 64, 3, generator=g)
    noise = torch.randn(1, 64, 64, 3, generator=g)
    assert float(lpips(x, x)[0]) == 0.0
    near, far = ((x + s * noise).clamp(0, 1) for s in (0.02, 0.2))
    torch.testing.assert_close(lpips(x, far), lpips(far, x))
    assert 0 < float(lpips(x, near)[0]) < float(lpips(x, far)[0])


def test_missing_weights_are_reported_not_fetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    net, note = load_lpips("cpu", tmp_path / "empty")
    assert net is None and ALEXNET_FILE in note and "never downloaded" in note
    assert not (tmp_path / "torch-home").exists()
    stand_in_weights(tmp_path / "given")
    (tmp_path / "given" / LINEAR_FILE).unlink()
    files = find_lpips_files(tmp_path / "given")
    if not LPIPS_PACKAGE:
        assert isinstance(files, str) and LINEAR_FILE in files
        return
    # The lpips package (a dependency) ships the per-channel weights: found there instead.
    assert isinstance(files, LpipsFiles) and files.alexnet.parent == tmp_path / "given" and files.linear.name == LINEAR_FILE
    net, note = load_lpips("cpu", tmp_path / "given")
    assert isinstance(net, Lpips) and str(files.alexnet) in note


@pytest.fixture(scope="module")
def small_case(head, tmp_path_factory):  # type: ignore[no-untyped-def]
    from backend.data.subject import Subject
    from backend.data.synthetic import SynthConfig, synthesize
    from backend.refine.initialize import InitConfig, initialize_on_subject

    root = tmp_path_factory.mktemp("lpips")
    subject = Subject.load(synthesize(head, root / "mono", SynthConfig(frames=4, size=64, seed=3, reference_gaussians=20_000)))
    return subject, initialize_on_subject(head, subject, InitConfig(gaussians=4_000)), stand_in_weights(root / "weights")


def test_evaluate_reports_lpips_only_with_its_weights(head, small_case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from backend.refine.evaluate import evaluate

    subject, avatar, files = small_case
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    without = evaluate(avatar, head, subject, split="train")
    assert without["lpips"] is None and "never downloaded" in without["lpips_note"]
    scores = evaluate(avatar, head, subject, split="train", lpips_folder=files.alexnet.parent)
    assert scores["psnr"] == without["psnr"] and str(files.alexnet) in scores["lpips_note"]
    # The mean over the split's views of the distance between each render and its target.
    assert scores["lpips"] is not None and 0 < scores["lpips"] < float(Lpips(files)(torch.rand(1, 64, 64, 3), torch.rand(1, 64, 64, 3)))


def test_refine_adds_lpips_to_the_loss_or_says_it_left_it_out(head, small_case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from backend.refine.config import RefineConfig
    from backend.refine.refine import refine
    from backend.refine.regularizers import AntiSpike
    from backend.wire.errors import InputError

    subject, avatar, files = small_case
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    config = RefineConfig(iterations=6, log_every=3, checkpoint_every=0, anti_spike=AntiSpike(max_scale=3.0))
    plain = refine(avatar, head, subject, config)
    missing = refine(avatar, head, subject, replace(config, lpips_weight=0.5, lpips_folder=str(tmp_path / "empty")))
    added = refine(avatar, head, subject, replace(config, lpips_weight=0.5, lpips_folder=str(files.alexnet.parent)))
    assert plain.notes == [] and added.notes == []
    assert len(missing.notes) == 1 and missing.notes[0].startswith("LPIPS left out of the loss") and ALEXNET_FILE in missing.notes[0]
    # Left out: the same run as without it; added: the loss (and so the result) changes.
    assert [h["loss"] for h in missing.history] == [h["loss"] for h in plain.history]
    assert added.history[0]["loss"] > plain.history[0]["loss"]
    assert not torch.equal(added.avatar.local.sh, plain.avatar.local.sh)
    with pytest.raises(InputError, match="lpips_weight"):
        refine(avatar, head, subject, replace(config, lpips_weight=-1.0))
