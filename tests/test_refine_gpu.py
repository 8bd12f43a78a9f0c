"""Stage 2 on the GPU: the step captured in one CUDA graph (with the fused kernels, compiled,
or neither), and the step of compiled regions alone, optimize what the eager torch step
does; a captured run resumes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from backend.data.subject import Subject
from backend.data.synthetic import SynthConfig, synthesize
from backend.head.model import HeadModel
from backend.refine.config import RefineConfig
from backend.refine.evaluate import evaluate
from backend.refine.initialize import InitConfig, initialize_on_subject
from backend.refine.losses import ssim_map
from backend.refine.refine import RefineState, refine
from backend.refine.regularizers import AntiSpike
from tests.lpips_weights import stand_in_weights

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def case(head: HeadModel, tmp_path_factory):  # type: ignore[no-untyped-def]
    gpu = HeadModel(head.data).to("cuda")  # a copy: Module.to moves in place, and the fixture is shared
    subject = Subject.load(synthesize(gpu, tmp_path_factory.mktemp("mono"), SynthConfig(frames=10, size=128, seed=5, reference_gaussians=60_000)))
    avatar = initialize_on_subject(gpu, subject, InitConfig(gaussians=8_000))
    return gpu, subject, avatar, evaluate(avatar, gpu, subject)


EAGER = {"compile": False, "cuda_graph": False, "fused": False}


@pytest.mark.parametrize(
    ("fast", "random_background"),
    [
        ({"compile": True}, False),
        ({"compile": True}, True),
        ({"compile": False}, False),
        ({"compile": False, "fused": False}, False),
        ({"compile": False, "finetune_flame": True, "exposure": True}, True),
        ({"compile": True, "cuda_graph": False}, False),
    ],
    ids=["graph+compiled", "graph+compiled-random-bg", "graph+fused", "graph-unfused", "graph-flame-exposure-random-bg", "compiled-regions"],
)
def test_fast_refinement_matches_eager_and_keeps_layout(case, fast: dict, random_background: bool) -> None:  # type: ignore[no-untyped-def]
    gpu, subject, avatar, before = case
    config = RefineConfig(
        iterations=300, log_every=100, checkpoint_every=0, anti_spike=AntiSpike(max_scale=3.0), random_background=random_background
    )
    quick = refine(avatar, gpu, subject, replace(config, **fast))
    eager = refine(avatar, gpu, subject, replace(config, **{**fast, **EAGER}))
    scores = {name: evaluate(r.avatar, gpu, subject) for name, r in (("fast", quick), ("eager", eager))}
    assert scores["fast"]["psnr_mask"] >= before["psnr_mask"] + 3.0, (before, scores)
    # Fused kernels round differently, and gsplat sums gradients with atomics: the
    # optimization must land at the same quality, not on the same bits.
    assert scores["fast"]["psnr_mask"] == pytest.approx(scores["eager"]["psnr_mask"], abs=0.2)
    assert [h["iteration"] for h in quick.history] == [100, 200, 300]
    assert not any(h.get("tile_pairs_dropped") for h in quick.history)
    assert torch.equal(quick.avatar.binding.face_idx, avatar.binding.face_idx)
    assert quick.avatar.count == avatar.count


def test_fused_step_moves_flame_as_the_eager_step(case) -> None:  # type: ignore[no-untyped-def]
    # With FLAME fine-tuned, its gradient comes through the fused placement's backward to the
    # mesh. Adam's first update is +-lr per element (the gradient's sign), so after one step
    # the captured fused run must have moved every parameter the way the eager torch run did.
    gpu, subject, avatar, _ = case
    config = RefineConfig(
        iterations=1, log_every=1, checkpoint_every=0, anti_spike=AntiSpike(max_scale=3.0), finetune_flame=True, random_background=True
    )
    quick, eager = (refine(avatar, gpu, subject, replace(config, **extra)) for extra in ({}, EAGER))
    rows = subject.split["train"]
    for name in ("expr", "rotation", "jaw_pose", "neck_pose", "translation"):
        start = getattr(subject.params, name)[rows]
        a, b = (getattr(r.train_params, name).cpu() - start for r in (quick, eager))
        assert float(b.abs().max()) > 0, name
        agree = float((torch.sign(a) == torch.sign(b)).float().mean())
        assert agree > 0.97, (name, agree)


def test_captured_step_with_lpips_in_the_loss(case, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # LPIPS (stand-in weight files) inside the captured fused step: the same loss as the
    # eager torch step, and more than without it.
    gpu, subject, avatar, _ = case
    stand_in_weights(tmp_path)
    config = RefineConfig(
        iterations=1, log_every=1, checkpoint_every=0, anti_spike=AntiSpike(max_scale=3.0), lpips_weight=0.5, lpips_folder=str(tmp_path)
    )
    quick, eager, plain = (refine(avatar, gpu, subject, replace(config, **extra)) for extra in ({}, EAGER, {"lpips_weight": 0.0}))
    assert quick.notes == [] and eager.notes == []
    assert quick.history[0]["loss"] == pytest.approx(eager.history[0]["loss"], rel=1e-4)
    assert quick.history[0]["loss"] > plain.history[0]["loss"] + 1e-3
    longer = refine(avatar, gpu, subject, replace(config, iterations=20, log_every=10))  # captured from the fourth step on
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in longer.history)


def test_captured_run_resumes_where_it_stopped(case, tmp_path) -> None:  # type: ignore[no-untyped-def]
    gpu, subject, avatar, _ = case
    config = RefineConfig(iterations=200, log_every=50, checkpoint_every=100, anti_spike=AntiSpike(max_scale=3.0))
    states = []
    whole = refine(avatar, gpu, subject, config, checkpoint=states.append)
    again = refine(avatar, gpu, subject, config)
    # Through a file, as the CLI and the service resume: tensors come back on the host.
    halves = refine(avatar, gpu, subject, config, resume=RefineState.load(states[0].save(tmp_path / "run.ckpt")))
    assert states[0].iteration == 100
    # gsplat sums gradients with atomics, so two uninterrupted runs already differ a little;
    # a resumed run (same draws, learning rates, Adam moments) must differ no more than that.
    # A resume that restarted the schedule or the moments would differ by far more.
    for name in ("offset", "rotation", "log_scale", "opacity_logit", "sh"):
        a, b, c = (getattr(r.avatar.local, name) for r in (whole, again, halves))
        noise = (a - b).abs().mean()
        assert (a - c).abs().mean() <= 3 * noise + 1e-7, (name, float((a - c).abs().mean()), float(noise))


def test_ssim_on_the_gpu_matches_the_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 70, 90, 3, generator=g), torch.rand(2, 70, 90, 3, generator=g)
    torch.testing.assert_close(ssim_map(a.cuda(), b.cuda()).cpu(), ssim_map(a, b), atol=1e-5, rtol=0)
