"""Stage 2: regularizers, losses against a reference implementation, the CPU refinement,
frozen layout, checkpoint and resume, and refusal of damaged subjects."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from backend.data.subject import Subject, frame_name
from backend.data.synthetic import SynthConfig, synthesize
from backend.gaussians.avatar import SH_C0, LocalGaussians, deform
from backend.gaussians.frames import normal_in_gaussian_axes, quat_to_matrix
from backend.head.model import HeadModel
from backend.refine.colour_bound import out_of_range_share
from backend.refine.config import FaintColours, LearningRates, RefineConfig, preset
from backend.refine.evaluate import evaluate, orbit_holes, render_view
from backend.refine.initialize import InitConfig, initialize_on_subject
from backend.refine.losses import psnr, ssim_map
from backend.refine.refine import RefineState, _add_seen_sparsity, refine
from backend.refine.regularizers import (
    AntiSpike,
    SurfaceHinge,
    depth_loss,
    spike_stats,
    spike_terms,
    surface_depth,
)

REPO = Path(__file__).resolve().parents[1]


def hand_built(log_scales: list[list[float]], offsets: list[list[float]]) -> LocalGaussians:
    n = len(log_scales)
    return LocalGaussians(
        offset=torch.tensor(offsets, dtype=torch.float32),
        rotation=torch.tensor([[1.0, 0, 0, 0]] * n),
        log_scale=torch.tensor(log_scales, dtype=torch.float32),
        opacity_logit=torch.zeros(n),
        sh=torch.zeros(n, 1, 3),
    )


def test_each_regularizer_on_hand_built_gaussians() -> None:
    cfg = AntiSpike(max_scale=0.6, max_ratio=10.0, max_offset=1.0)
    g = hand_built(
        [[math.log(0.5)] * 3, [math.log(0.9), math.log(0.3), math.log(0.3)], [math.log(0.5), math.log(0.5), math.log(0.01)]],
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.5], [0.0, 3.0, 4.0]],
    )
    terms = spike_terms(g.log_scale, g.offset, cfg)
    # Only the second is too large (0.9 > 0.6), only the third too thin (50 > 10) and too far (5 > 1).
    assert terms["scale"].item() == pytest.approx((0.9 - 0.6) / 3, rel=1e-5)
    assert terms["aniso"].item() == pytest.approx((math.log(50) - math.log(10)) / 3, rel=1e-5)
    assert terms["offset"].item() == pytest.approx((5.0 - 1.0) / 3, rel=1e-5)
    stats = spike_stats(g, cfg)
    assert stats["scale_share"] == pytest.approx(1 / 3) and stats["aniso_share"] == pytest.approx(1 / 3)
    assert stats["spike_share"] == pytest.approx(2 / 3)
    # Within every threshold: exactly zero.
    ok = hand_built([[math.log(0.5), math.log(0.2), math.log(0.1)]], [[0.3, 0.0, 0.0]])
    assert all(float(v) == 0.0 for v in spike_terms(ok.log_scale, ok.offset, cfg).values())


def test_the_depth_hinge_measures_reach_past_the_triangle_plane() -> None:
    cfg = SurfaceHinge(weight=2.0, max_depth=0.1)
    flat = [math.log(0.2), math.log(0.2), math.log(0.05)]  # a disc in the triangle's plane
    g = hand_built([flat, flat, flat], [[0.5, 0.0, 0.03], [0.0, 0.0, 0.0], [0.0, 0.0, -0.3]])
    quarter_turn_x = [math.cos(math.pi / 4), math.sin(math.pi / 4), 0.0, 0.0]  # 90 degrees about x: the disc stands up
    g = replace(g, rotation=torch.tensor([[1.0, 0, 0, 0], quarter_turn_x, [1.0, 0, 0, 0]]))
    depth = surface_depth(g.rotation, g.log_scale, g.offset)
    # Reference: |o_z| + sqrt(n^T R diag(s^2) R^T n) from the whole covariance, n = z.
    R = quat_to_matrix(g.rotation)
    cov = R @ torch.diag_embed(g.log_scale.exp() ** 2) @ R.transpose(1, 2)
    np.testing.assert_allclose(depth, g.offset[:, 2].abs() + cov[:, 2, 2].sqrt(), rtol=1e-5)
    # In-plane offset and a flat disc: 0.03 + 0.05; standing up: 0.2; lifted off: 0.3 + 0.05.
    np.testing.assert_allclose(depth, [0.08, 0.2, 0.35], rtol=1e-5)
    assert depth_loss(g.rotation, g.log_scale, g.offset, cfg).item() == pytest.approx(2.0 * (0.1 + 0.25) / 3, rel=1e-5)
    assert spike_stats(g, AntiSpike(), cfg)["depth_share"] == pytest.approx(2 / 3)
    # Its gradient pulls the lifted disc back toward the plane and thins the standing one.
    offset, log_scale = g.offset.clone().requires_grad_(True), g.log_scale.clone().requires_grad_(True)
    depth_loss(g.rotation, log_scale, offset, cfg).backward()
    assert offset.grad[2, 2] < 0 and offset.grad[0].abs().max() == 0 and log_scale.grad[1, 1] > 0


def test_the_normal_in_gaussian_axes_is_the_rotation_matrix_row_for_any_quaternion_norm(rng: torch.Generator) -> None:
    q = torch.randn(200, 4, generator=rng) * torch.rand(200, 1, generator=rng).mul(5).add(0.1)
    torch.testing.assert_close(normal_in_gaussian_axes(q), quat_to_matrix(q)[:, 2, :], rtol=1e-5, atol=1e-6)


def test_ssim_matches_scikit_image(rng: torch.Generator) -> None:
    a = torch.rand(40, 48, 3, generator=rng, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(40, 48, 3, generator=rng, dtype=torch.float64)).clamp(0, 1)
    ours = ssim_map(a, b)[5:-5, 5:-5].mean().item()
    ref = structural_similarity(a.numpy(), b.numpy(), channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, full=True)[1]
    assert ours == pytest.approx(ref[5:-5, 5:-5].mean(), abs=1e-6)
    assert psnr(a, a) == float("inf")
    assert psnr(a, torch.zeros_like(a) + a + 0.1) == pytest.approx(20.0, abs=1e-6)


def test_silhouette_iou_counts_pixels_over_half() -> None:
    from backend.refine.evaluate import silhouette_iou

    alpha, mask = torch.zeros(4, 4, 1), torch.zeros(4, 4, 1)
    alpha[:2] = 0.9  # 8 pixels drawn
    alpha[2, :2] = 0.4  # below half: not drawn
    mask[1:3] = 1.0  # 8 pixels of the person, 4 of them drawn
    assert silhouette_iou(alpha, mask) == pytest.approx(4 / 12)
    assert silhouette_iou(mask, mask) == 1.0 and silhouette_iou(torch.zeros(4, 4, 1), torch.zeros(4, 4, 1)) == 1.0


@pytest.fixture(scope="module")
def setup(head: HeadModel, tmp_path_factory):  # type: ignore[no-untyped-def]
    root = synthesize(head, tmp_path_factory.mktemp("refine") / "mono", SynthConfig(frames=10, size=128, seed=5, reference_gaussians=60_000))
    subject = Subject.load(root)
    avatar = initialize_on_subject(head, subject, InitConfig(gaussians=8_000))
    return subject, avatar


def test_cpu_refinement_improves_test_psnr_and_keeps_layout(head: HeadModel, setup) -> None:  # type: ignore[no-untyped-def]
    subject, avatar = setup
    before = evaluate(avatar, head, subject)
    result = refine(avatar, head, subject, RefineConfig(iterations=200, log_every=50, anti_spike=AntiSpike(max_scale=3.0)))
    after = evaluate(result.avatar, head, subject)
    assert after["psnr_mask"] >= before["psnr_mask"] + 3.0, (before, after)
    assert 0.5 < after["silhouette_iou"] <= 1.0  # the surface start already covers most of the synthetic head
    # Layout frozen: same count, same binding, bit for bit.
    assert result.avatar.count == avatar.count
    assert torch.equal(result.avatar.binding.face_idx, avatar.binding.face_idx)
    assert torch.equal(result.avatar.binding.bary, avatar.binding.bary)
    assert torch.equal(result.avatar.binding.texel, avatar.binding.texel)
    assert not torch.equal(result.avatar.local.sh, avatar.local.sh)
    assert [h["iteration"] for h in result.history] == [50, 100, 150, 200]


def test_checkpoint_and_resume_equal_an_uninterrupted_run(head: HeadModel, setup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    subject, avatar = setup
    # Random backgrounds: the per-step colours must come out the same after a resume.
    config = RefineConfig(iterations=12, log_every=4, checkpoint_every=0, anti_spike=AntiSpike(max_scale=3.0), random_background=True, exposure=True)
    full = refine(avatar, head, subject, config, profile=True)  # profiling must not change the run
    assert all(full.timings[stage] > 0 for stage in ("data", "deform", "render", "loss", "backward", "optimizer"))
    calls = {"n": 0}

    def stop_after_5() -> bool:
        calls["n"] += 1
        return calls["n"] > 5

    saved: list[RefineState] = []
    part = refine(avatar, head, subject, config, should_stop=stop_after_5, checkpoint=saved.append)
    assert part.stopped_early and saved[-1].iteration == 5
    path = saved[-1].save(tmp_path / "run.ckpt")
    resumed = refine(avatar, head, subject, config, resume=RefineState.load(path))
    for name, t in full.avatar.local.tensors().items():
        assert torch.equal(resumed.avatar.local.tensors()[name], t), name
    assert full.exposure is not None and resumed.exposure is not None and torch.equal(resumed.exposure, full.exposure)


def test_a_resumed_flame_fine_tuning_continues_where_it_stopped(head: HeadModel, setup) -> None:  # type: ignore[no-untyped-def]
    subject, avatar = setup
    config = RefineConfig(iterations=10, log_every=5, checkpoint_every=0, anti_spike=AntiSpike(max_scale=3.0), finetune_flame=True, exposure=True)
    full = refine(avatar, head, subject, config)
    calls = {"n": 0}

    def stop_after_4() -> bool:
        calls["n"] += 1
        return calls["n"] > 4

    saved: list[RefineState] = []
    refine(avatar, head, subject, config, should_stop=stop_after_4, checkpoint=saved.append)
    resumed = refine(avatar, head, subject, config, resume=saved[-1])
    train = subject.split["train"]
    assert float((full.train_params.expr - subject.params.expr[train]).abs().max()) > 1e-3  # FLAME was tuned
    # Posing's backward sums in a thread-dependent order on the CPU: two whole runs already
    # differ by ~1e-8. A resume that lost FLAME's Adam moments would differ by ~1e-4.
    for name in ("expr", "rotation", "neck_pose", "eyes_pose", "translation"):
        torch.testing.assert_close(getattr(resumed.train_params, name), getattr(full.train_params, name), atol=1e-6, rtol=0, msg=name)


def test_a_refine_command_imports_neither_torch_dynamo_nor_cv2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Each costs a fresh command about half a second to over a second: torch.optim's
    # optimizers import torch._dynamo, and only tracking needs OpenCV.
    script = f"""
import sys
import backend.cli
from backend.data.subject import Subject
from backend.data.synthetic import SynthConfig, synthesize
from backend.head.registry import load_head_model
from backend.refine.config import RefineConfig
from backend.refine.initialize import InitConfig, initialize_on_subject
from backend.refine.refine import refine
from backend.refine.regularizers import AntiSpike
head = load_head_model(None)
subject = Subject.load(synthesize(head, {str(tmp_path)!r}, SynthConfig(frames=4, size=64, seed=3, reference_gaussians=5_000)))
avatar = initialize_on_subject(head, subject, InitConfig(gaussians=2_000))
refine(avatar, head, subject, RefineConfig(iterations=3, finetune_flame=True, exposure=True, anti_spike=AntiSpike(max_scale=3.0)))
print(sorted(m for m in ("torch._dynamo", "cv2") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_tracked_subjects_default_to_real_tuning_random_backgrounds_and_no_depth_hinge(head: HeadModel, setup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A real subject's hair stands off the mesh, so the depth hinge stays off unless asked for
    and the hinges and rates get the real-subject tuning; a synthetic subject's appearance lies
    on the mesh and keeps the configuration as given. Neither fine-tunes FLAME by default. What
    a run decided is what its avatar records."""
    subject, avatar = setup
    root = tmp_path / "tracked"
    shutil.copytree(subject.root, root)
    info = json.loads((root / "subject.json").read_text())
    (root / "subject.json").write_text(json.dumps(info | {"source": "tracked"}))
    config = RefineConfig(iterations=2, log_every=2, anti_spike=AntiSpike(max_scale=3.0))
    decided = {}
    for name, subj in (("synthetic", subject), ("tracked", Subject.load(root))):
        decided[name] = refine(avatar, head, subj, config).avatar.meta["refine_config"]
    synthetic, tracked = decided["synthetic"], decided["tracked"]
    assert synthetic["surface"] == asdict(SurfaceHinge()) and not synthetic["random_background"] and not synthetic["finetune_flame"]
    assert tracked["surface"]["weight"] == 0.0 and tracked["random_background"] and not tracked["finetune_flame"]
    # The real-subject tuning is applied once, to tracked subjects only, and recorded as applied.
    tune = config.real_tuning
    assert tune is not None
    assert synthetic["anti_spike"] == asdict(config.anti_spike) and synthetic["lr"] == asdict(config.lr)
    assert tracked["anti_spike"]["max_scale"] == 3.0 * tune.threshold_factor and tracked["anti_spike"]["max_offset"] == config.anti_spike.max_offset * tune.threshold_factor
    assert tracked["lr"]["offset"] == config.lr.offset * tune.lr_factor and tracked["lr"]["rotation"] == config.lr.rotation
    assert synthetic["real_tuning"] is None and tracked["real_tuning"] is None
    once = config.for_subject(synthetic=False)
    assert once.for_subject(synthetic=False) == once  # a decided configuration (a checkpoint's) is not tuned twice
    explicit = replace(config, surface=SurfaceHinge(max_depth=0.5), random_background=False, finetune_flame=True, real_tuning=None).for_subject(synthetic=False)
    assert explicit.surface == SurfaceHinge(max_depth=0.5) and explicit.random_background is False and explicit.finetune_flame is True
    assert explicit.anti_spike == config.anti_spike and explicit.lr == config.lr
    assert RefineConfig.from_dict(config.to_dict()) == config  # None survives a checkpoint
    assert RefineConfig.from_dict(once.to_dict()) == once


def test_random_background_clears_gaussians_outside_the_mask(head: HeadModel, setup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The top third of every mask is cut away, so the head drawn there must vanish. Over a
    fixed background the Gaussians there can take on its colour instead; over a new colour
    every step only transparency fits, so they end up clearly more transparent."""
    subject, avatar = setup
    root = tmp_path / "cut"
    shutil.copytree(subject.root, root)
    cut = {}
    for path in sorted((root / "masks").glob("*.png")):
        m = np.asarray(Image.open(path)).copy()
        rows = np.nonzero(m.max(1) > 127)[0]
        top = rows.min() + (rows.max() - rows.min()) // 3
        cut[path.name] = torch.from_numpy((m > 127) & (np.arange(m.shape[0])[:, None] < top))
        m[:top] = 0
        Image.fromarray(m).save(path)
    cut_subject = Subject.load(root)

    def alpha_in_cut(rb: bool) -> float:
        result = refine(avatar, head, cut_subject, RefineConfig(iterations=150, log_every=50, anti_spike=AntiSpike(max_scale=3.0), random_background=rb))
        alphas = []
        for t in range(4):
            params, cams = cut_subject.params.index([t]), cut_subject.cameras(t)
            over_black, over_white = (render_view(result.avatar, head, params, cams, torch.full((3,), v))[0] for v in (0.0, 1.0))
            alpha = 1.0 - (over_white - over_black).mean(-1)
            alphas.append(float(alpha[cut[frame_name(t, 0)]].mean()))
        return float(np.mean(alphas))

    fixed, random = alpha_in_cut(False), alpha_in_cut(True)
    assert random < fixed - 0.08, (fixed, random)


def test_exposure_learns_each_frames_gain_and_fits_the_frames_better(head: HeadModel, setup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Each frame's image darkened by its own per-channel gain, as a camera's auto-exposure
    would: the learnt gains follow the applied ones (up to their common mean, which the
    avatar's colours hold), and the training frames, rendered with them, fit better than a
    run that must put every frame's exposure into the same colours."""
    subject, avatar = setup
    root = tmp_path / "exposed"
    shutil.copytree(subject.root, root)
    applied = 0.55 + 0.45 * torch.rand(subject.num_frames, 3, generator=torch.Generator().manual_seed(3))
    for t in range(subject.num_frames):
        path = root / "images" / frame_name(t, 0)
        img = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
        Image.fromarray(np.clip(img * applied[t].numpy() + 0.5, 0, 255).astype(np.uint8)).save(path)
    exposed_subject = Subject.load(root)
    train = exposed_subject.split["train"]
    config = RefineConfig(iterations=300, log_every=100, anti_spike=AntiSpike(max_scale=3.0), lr=LearningRates(exposure=2e-2))
    plain = refine(avatar, head, exposed_subject, config)
    with_gains = refine(avatar, head, exposed_subject, replace(config, exposure=True))
    assert plain.exposure is None and with_gains.exposure is not None and with_gains.exposure.shape == (len(train), 3)
    learnt, truth = with_gains.exposure.log(), applied[train].log()
    centred = truth - truth.mean(0)
    assert float(torch.corrcoef(torch.stack([learnt.flatten(), centred.flatten()]))[0, 1]) > 0.9
    assert float((learnt - centred).abs().mean()) < 0.5 * float(centred.abs().mean())
    scores = [evaluate(r.avatar, head, exposed_subject, frames=train, exposure=r.exposure)["psnr_mask"] for r in (plain, with_gains)]
    assert scores[1] > scores[0] + 1.0, scores


def test_exposure_of_the_wrong_shape_is_refused_before_rendering(head: HeadModel, setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Gains are one [3] row per scored frame (a refinement's ``exposure`` for its training
    frames); any other shape is the caller's mistake, refused before LPIPS loads or a frame renders."""
    import backend.refine.evaluate as evaluate_module
    from backend.wire.errors import InputError

    def no_work(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("evaluate started work on a refused exposure")

    monkeypatch.setattr(evaluate_module, "render_frame", no_work)
    monkeypatch.setattr(evaluate_module, "load_lpips", no_work)
    subject, avatar = setup
    frames = subject.split["train"][:3]
    for shape in ((2, 3), (3, 1), (3,), (1, 3, 3)):
        with pytest.raises(InputError, match=rf"exposure has shape \[{', '.join(map(str, shape))}\], expected \[3, 3\]"):
            evaluate(avatar, head, subject, frames=frames, exposure=torch.ones(shape))
    # The test split by default: one row per test frame.
    with pytest.raises(InputError, match=rf"expected \[{len(subject.split['test'])}, 3\]"):
        evaluate(avatar, head, subject, exposure=torch.ones(len(subject.split["test"]) + 1, 3))


def test_pixels_past_the_source_edge_are_neither_fitted_nor_scored(head: HeadModel, setup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Tracking pads a crop that reaches past its source image with the background and masks
    the padding out. Recorded as unknown (each frame's crop box and source size), that band
    is left alone by the loss: the head drawn there keeps its opacity, where a subject that
    calls the band background makes it vanish. The scores do not look there either."""
    subject, avatar = setup
    size, band = subject.info.width, subject.info.width // 3
    unknown_rows = torch.zeros(size, size, 1)
    unknown_rows[:band] = 1.0
    roots = {}
    for name, record in (("background", False), ("unknown", True)):
        root = roots[name] = tmp_path / name
        shutil.copytree(subject.root, root)
        for t in range(subject.num_frames):
            for folder, value in (("images", 255), ("masks", 0)):
                path = root / folder / frame_name(t, 0)
                img = np.asarray(Image.open(path)).copy()
                img[:band] = value
                Image.fromarray(img).save(path)
        if record:  # the crop starts `band` rows above the source's top edge
            info = json.loads((root / "subject.json").read_text())
            frames = [{"box": [0, -band, size], "size": [size, size - band]}] * subject.num_frames
            (root / "subject.json").write_text(json.dumps(info | {"extra": {"tracking": {"frames": frames}}}))
    background, unknown = Subject.load(roots["background"]), Subject.load(roots["unknown"])
    assert torch.equal(unknown.known(0), 1 - unknown_rows) and bool((background.known(0) == 1).all())

    config = RefineConfig(iterations=150, log_every=50, anti_spike=AntiSpike(max_scale=3.0), random_background=True)
    results = {name: refine(avatar, head, subj, config).avatar for name, subj in (("background", background), ("unknown", unknown))}

    def alpha_in_band(result_avatar) -> float:  # type: ignore[no-untyped-def]
        alphas = []
        for t in range(4):
            params, cams = subject.params.index([t]), subject.cameras(t)
            over_black, over_white = (render_view(result_avatar, head, params, cams, torch.full((3,), v))[0] for v in (0.0, 1.0))
            alpha = 1.0 - (over_white - over_black).mean(-1, keepdim=True)
            drawn = subject.mask(t) * unknown_rows  # where the head lay before the band was cut
            alphas.append(float((alpha * drawn).sum() / drawn.sum()))
        return float(np.mean(alphas))

    kept, faded = alpha_in_band(results["unknown"]), alpha_in_band(results["background"])
    assert kept > faded + 0.15, (kept, faded)
    # The scores leave the band out: the head drawn there costs the full image nothing, as
    # it does when the band is called background; the person mask's score is the same.
    as_unknown, as_background = (evaluate(results["unknown"], head, subj) for subj in (unknown, background))
    assert as_unknown["psnr"] > as_background["psnr"] + 1.0, (as_unknown["psnr"], as_background["psnr"])
    assert as_unknown["psnr_mask"] == pytest.approx(as_background["psnr_mask"], abs=1e-6)


def test_antispike_lowers_spike_share(head: HeadModel, setup) -> None:  # type: ignore[no-untyped-def]
    subject, avatar = setup
    # Start from deliberately spiky Gaussians: a fifth of them stretched 2x along one axis.
    spiky = avatar.local.map(lambda t: t.clone())
    spiky.log_scale[::5, 0] += math.log(2.0)
    start = replace(avatar, local=spiky)
    # Thresholds for this coarse test layout (8,000 Gaussians on 18,680 triangles), and a fast
    # scale rate so that 25 steps suffice.
    hinges = AntiSpike(max_scale=1.2)
    lr = LearningRates(log_scale=3e-2)
    ours = refine(start, head, subject, RefineConfig(iterations=25, log_every=25, anti_spike=hinges, lr=lr))
    plain = refine(start, head, subject, preset("no-antispike", iterations=25, log_every=25, lr=lr))
    s_ours, s_plain = spike_stats(ours.avatar.local, hinges), spike_stats(plain.avatar.local, hinges)
    assert s_plain["spike_share"] > 0.15
    assert s_ours["spike_share"] < 0.5 * s_plain["spike_share"], (s_ours, s_plain)


def test_bounded_colours_stay_displayable_and_fit_as_well(head: HeadModel, setup) -> None:  # type: ignore[no-untyped-def]
    subject, avatar = setup
    # A fast colour rate drives faintly seen Gaussians' colours past [0, 1] within 60 steps.
    # The faint pass, which sets the most hidden of them back afterwards, is off: the clamp alone is tested.
    config = RefineConfig(iterations=60, log_every=60, anti_spike=AntiSpike(max_scale=3.0), lr=LearningRates(sh_dc=2.5e-2), faint=FaintColours(enabled=False))
    assert config.bound_colours  # the default
    bounded = refine(avatar, head, subject, config)
    free = refine(avatar, head, subject, replace(config, bound_colours=False))
    assert out_of_range_share(avatar.local) == 0.0
    assert out_of_range_share(free.avatar.local) > 0.005
    assert out_of_range_share(bounded.avatar.local) == 0.0
    colour = 0.5 + SH_C0 * bounded.avatar.local.sh[:, 0]
    assert float(colour.min()) >= -1e-6 and float(colour.max()) <= 1 + 1e-6
    assert evaluate(bounded.avatar, head, subject)["psnr_mask"] >= evaluate(free.avatar, head, subject)["psnr_mask"] - 0.1


def test_sparsity_gradient_is_the_mean_opacity_gradient_on_reached_gaussians_only(rng: torch.Generator) -> None:
    logit = torch.randn(50, generator=rng, requires_grad=True)
    photometric = torch.randn(50, generator=rng) * (torch.rand(50, generator=rng) > 0.4)
    logit.grad = photometric.clone()
    _add_seen_sparsity(logit.detach(), logit.grad, 0.3)
    (reference,) = torch.autograd.grad(0.3 * torch.sigmoid(logit).mean(), logit)
    reached = photometric != 0
    torch.testing.assert_close(logit.grad[reached], photometric[reached] + reference[reached])
    assert torch.equal(logit.grad[~reached], photometric[~reached])


def test_opacity_sparsity_fades_what_the_views_show_and_leaves_the_rest(head: HeadModel, setup) -> None:  # type: ignore[no-untyped-def]
    subject, avatar = setup
    config = RefineConfig(iterations=40, log_every=40, anti_spike=AntiSpike(max_scale=3.0))
    plain = refine(avatar, head, subject, replace(config, opacity_sparsity=0.0))
    sparse = refine(avatar, head, subject, replace(config, opacity_sparsity=0.01))
    alpha = {k: torch.sigmoid(r.avatar.local.opacity_logit) for k, r in (("plain", plain), ("sparse", sparse))}
    assert float(alpha["sparse"].mean()) < float(alpha["plain"].mean()) - 0.03, {k: float(a.mean()) for k, a in alpha.items()}
    # Only Gaussians the training views reached may fade, so the head stays closed all around.
    test_frame = subject.params.index(subject.split["test"][:1])
    assert orbit_holes(avatar, avatar, head, test_frame, size=96) == 0.0
    assert orbit_holes(sparse.avatar, avatar, head, test_frame, size=96) < 0.01
    # What a term on every Gaussian does to a frontal video: the back of the head fades.
    means = deform(avatar, head, test_frame).frame(0).means
    back = means[:, 2] < means[:, 2].median()
    faded = replace(avatar, local=avatar.local.map(lambda t: t.clone()))
    faded.local.opacity_logit[back] = -12.0
    assert orbit_holes(faded, avatar, head, test_frame, size=96) > 0.1


def test_densify_baseline_grows_and_keeps_every_face(head: HeadModel, setup) -> None:  # type: ignore[no-untyped-def]
    subject, avatar = setup
    cfg = preset("densify", iterations=21, log_every=21)
    cfg = replace(cfg, anti_spike=replace(cfg.anti_spike, max_scale=3.0), densify=replace(cfg.densify, start=10, stop=20, every=10, reset_every=1000, grad_threshold=1e-5))
    result = refine(avatar, head, subject, cfg)
    assert result.avatar.count != avatar.count
    faces_before = set(avatar.binding.face_idx.tolist())
    assert faces_before <= set(result.avatar.binding.face_idx.tolist())


def test_coarse_layout_with_a_fine_threshold_is_refused(head: HeadModel, setup) -> None:  # type: ignore[no-untyped-def]
    from backend.wire.errors import InputError

    subject, avatar = setup
    with pytest.raises(InputError, match="already larger than the anti-spike scale threshold"):
        refine(avatar, head, subject, RefineConfig(iterations=1))


def test_damaged_subject_is_refused(head: HeadModel, setup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from backend.wire.errors import InputError

    subject, avatar = setup
    root = tmp_path / "s"
    shutil.copytree(subject.root, root)
    np.savez(root / "flame_param.npz", expr=np.zeros((4, 100), np.float32))
    with pytest.raises(InputError, match="has 4 frames"):
        Subject.load(root)



def test_fine_tuning_flame_leaves_the_jaw_joint_to_jaw_open_on_the_ict_head(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from backend.head.registry import load_head_model

    ict = load_head_model("ict")
    subject = Subject.load(synthesize(ict, tmp_path / "ict", SynthConfig(frames=2, size=32, seed=1, reference_gaussians=2_000)))
    avatar = initialize_on_subject(ict, subject, InitConfig(gaussians=2_000))
    config = RefineConfig(iterations=3, log_every=3, checkpoint_every=0, finetune_flame=True, compile=False, cuda_graph=False, lr=replace(LearningRates(), flame_pose=1e-2)).for_layout(2_000, InitConfig.gaussians)
    tuned = refine(avatar, ict, subject, config).train_params
    frames = subject.split["train"]
    assert torch.equal(tuned.jaw_pose, subject.params.jaw_pose[frames])  # jawOpen owns the jaw: the joint stays at rest
    assert not torch.equal(tuned.rotation, subject.params.rotation[frames])  # the other poses are still fine-tuned
