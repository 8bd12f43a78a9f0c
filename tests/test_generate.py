"""Stage 1 generator: K-invariance, permutation invariance, the residual design, visibility,
batched posing and deformation, the samplers, and clear errors for bad input.

All on a tiny FLAME-format test head (tests/test_generate_support.py) and the "tiny" preset,
so the module runs in seconds on the CPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.data.subject import Subject
from backend.gaussians.avatar import deform_local, logit
from backend.gaussians.surface import surface_local
from backend.generate.checkpoint import load_generator, read_generator_file, save_generator
from backend.generate.data import Corpus, PhaseSampler, Sample, find_subjects, load_subject, pose_rows, shard
from backend.generate.generate import check_source_count, generate_avatar, parse_views, split_inputs, subject_sources
from backend.generate.model import Generator, SourceViews, count_parameters, deform_batched, preset, source_visibility
from backend.head.params import POSE_FIELDS, FlameParams
from backend.wire.errors import InputError
from tests.test_generate_support import one_thread, tiny_corpus, tiny_head  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def head():  # type: ignore[no-untyped-def]
    return tiny_head()


@pytest.fixture(scope="module")
def corpus_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    return tiny_corpus(tmp_path_factory.mktemp("corpus"), mono=2, multi=1)


@pytest.fixture(scope="module")
def generator(head) -> Generator:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return Generator.for_head(preset("tiny"), head).eval()


def randomized(model: Generator, seed: int = 1) -> Generator:
    """A copy whose zero-initialized output layer is random, so outputs depend on the sources."""
    g = Generator(model.config, model.faces, model.binding, model.base_log_scale, model.head_name, model.head_fingerprint)
    g.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        g.decoder.head.weight.copy_(0.05 * torch.randn(g.decoder.head.weight.shape, generator=gen))
        g.decoder.head.bias.copy_(0.05 * torch.randn(g.decoder.head.bias.shape, generator=gen))
    return g.eval()


def mv_sources(subject: Subject, head, cams: list[int], frame: int = 0) -> SourceViews:  # type: ignore[no-untyped-def]
    return subject_sources(subject, [(frame, c) for c in cams], head)


def test_gaussian_count_and_weights_do_not_depend_on_k(generator: Generator, head, corpus_dirs) -> None:  # type: ignore[no-untyped-def]
    subject = Subject.load(corpus_dirs[1][0])
    n_params = count_parameters(generator)
    names = [n for n, _ in generator.named_parameters()]
    for k in (1, 2, 3, 4):
        out = generator(mv_sources(subject, head, [0, 2, 3, 5][:k]))
        assert out.local.offset.shape == (1, generator.config.gaussians, 3)
        assert out.local.sh.shape == (1, generator.config.gaussians, 1, 3)
        assert out.seen.shape == (1, generator.config.gaussians)
    assert count_parameters(generator) == n_params
    assert [n for n, _ in generator.named_parameters()] == names


def test_output_does_not_depend_on_source_order(generator: Generator, head, corpus_dirs) -> None:  # type: ignore[no-untyped-def]
    g = randomized(generator)
    subject = Subject.load(corpus_dirs[1][0])
    sources = mv_sources(subject, head, [0, 2, 3, 5])
    with torch.no_grad():
        ref = g(sources)
        for order in ([3, 2, 1, 0], [1, 3, 0, 2]):
            other = g(sources.permuted(order))
            for name, t in ref.local.tensors().items():
                assert torch.allclose(t, other.local.tensors()[name], atol=1e-5, rtol=0), name
            assert torch.allclose(ref.seen, other.seen, atol=1e-6)
    # The output does depend on the sources themselves (the test is not vacuous).
    with torch.no_grad():
        fewer = g(mv_sources(subject, head, [0]))
    assert not torch.allclose(ref.local.log_scale, fewer.local.log_scale, atol=1e-4)


def test_untrained_network_outputs_the_surface_init(generator: Generator, head, corpus_dirs) -> None:  # type: ignore[no-untyped-def]
    subject = Subject.load(corpus_dirs[1][0])
    with torch.no_grad():
        out = generator(mv_sources(subject, head, [1, 4]))
    local = out.frame(0)
    colours = out.base_rgb[0]
    surface = surface_local(head, subject.params.shape, generator.binding, colours, generator.config.surface)
    assert torch.equal(local.offset, torch.zeros_like(local.offset))
    assert torch.allclose(local.rotation, surface.rotation)
    assert torch.allclose(local.log_scale, surface.log_scale, atol=1e-5)
    assert torch.allclose(local.opacity_logit, surface.opacity_logit)
    assert torch.allclose(local.sh, surface.sh, atol=1e-5)
    # The appearance path: seen Gaussians carry the sources' colours (skin, not grey).
    seen = out.seen[0] > 0
    assert 0.3 < float(seen.float().mean()) < 1.0
    skin = colours[seen].mean(0)
    assert float(skin[0]) > float(skin[2]) + 0.1


def test_visibility_front_and_back(generator: Generator, head, corpus_dirs) -> None:  # type: ignore[no-untyped-def]
    subject = Subject.load(corpus_dirs[1][0])
    cams = subject.cameras(0)
    middle = subject.num_cameras // 2  # the ring's most frontal camera
    verts = head(subject.params.index([0])).vertices
    _, visible, cos, _ = source_visibility(
        verts, head.faces, generator.binding, generator.base_log_scale, cams.K[middle : middle + 1], cams.world_to_cam[middle : middle + 1],
        (cams.height, cams.width), 48, 0.004, 0.05,
    )
    anchor_z = (verts[0][head.faces[generator.face_idx]] * generator.bary[..., None]).sum(1)[:, 2]
    front, back = anchor_z > 0.06, anchor_z < -0.06
    assert float(visible[0][front].float().mean()) > 0.8
    assert float(visible[0][back].float().mean()) == 0.0
    assert bool((cos[0][visible[0]] > 0).all())


def test_deform_batched_matches_deform_local(generator: Generator, head) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(3)
    base = generator.base_local(2)
    local = base.map(lambda t: t + 0.1 * torch.randn(t.shape, generator=g))
    params = head.neutral_params(2)
    params.expr = torch.randn(2, head.n_expr, generator=g)
    verts = head(params).vertices
    batched = deform_batched(verts, head.faces, generator.binding, local)
    for b in range(2):
        one = deform_local(verts[b : b + 1], head.faces, generator.binding, local.map(lambda t: t[b]))
        assert torch.allclose(batched.means[b], one.means[0], atol=1e-6)
        assert torch.allclose(batched.scales[b], one.scales[0], atol=1e-7)
        assert torch.allclose(batched.colors[b], one.colors, atol=1e-6)


def test_pose_rows_matches_the_head_model(head) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(5)
    rows, shapes, expect = {n: [] for n in ("expr", *POSE_FIELDS)}, [], []
    for _ in range(2):
        p = head.neutral_params(3)
        p.shape = torch.randn(head.n_shape, generator=g)
        p.expr = torch.randn(3, head.n_expr, generator=g)
        p.rotation = 0.2 * torch.randn(3, 3, generator=g)
        p.jaw_pose = 0.1 * torch.rand(3, 3, generator=g)
        p.translation = 0.01 * torch.randn(3, 3, generator=g)
        expect.append(head(p).vertices)
        shapes.append(p.shape.expand(3, -1))
        for n in rows:
            rows[n].append(getattr(p, n))
    got = pose_rows(head, torch.cat(shapes), {n: torch.cat(v) for n, v in rows.items()})
    assert torch.allclose(got, torch.cat(expect), atol=1e-6)


def test_samplers_phase_rules_cross_time_rate_and_uniform_k() -> None:
    mono = PhaseSampler([(24, 1)] * 5, phase=1, targets=2, seed=0)
    for _ in range(200):
        k, samples = mono.batch(2)
        for s in samples:
            src_t = {t for t, _ in s.sources}
            assert len(s.sources) == k and len(src_t) == k
            assert not src_t & {t for t, _ in s.targets}  # other times
            assert len({c for _, c in s.sources + s.targets}) == 1  # one camera
    multi = PhaseSampler([(6, 8)] * 5, phase=2, targets=2, cross_time=0.25, seed=1)
    ks, cross = [], []
    for _ in range(4000):
        k = multi.draw_k()
        s = multi.sample(k)
        ks.append(k)
        cross.append(s.cross_time)
        src_t = {t for t, _ in s.sources}
        tgt_t = {t for t, _ in s.targets}
        assert len(src_t) == 1 and len({c for _, c in s.sources}) == k
        if s.cross_time:
            assert not src_t & tgt_t
        else:
            assert src_t == tgt_t and not {c for _, c in s.sources} & {c for _, c in s.targets}
    assert abs(np.mean(cross) - 0.25) < 0.03
    counts = np.bincount(ks, minlength=5)[1:] / len(ks)
    assert np.all(np.abs(counts - 0.25) < 0.03)
    assert not any(PhaseSampler([(6, 8)], 2, cross_time=0.0, seed=2).sample(2).cross_time for _ in range(50))
    with pytest.raises(InputError, match="at least 5 cameras"):
        PhaseSampler([(6, 3)], phase=2)
    with pytest.raises(InputError, match="at least 5 frames"):
        PhaseSampler([(3, 1)], phase=1)
    assert shard(list(range(7)), 1, 3) == [1, 4] and shard([0], 1, 2) == [0]


def test_corpus_batch_shapes(head, corpus_dirs) -> None:  # type: ignore[no-untyped-def]
    roots = find_subjects([corpus_dirs[0][0].parent])
    assert len(roots) == 3
    corpus = Corpus(roots, head)
    sampler = PhaseSampler(corpus.layouts()[:2], phase=1, targets=2, seed=0)
    k, samples = sampler.batch(2)
    batch = corpus.batch(samples)
    h = corpus.height
    assert batch.sources.images.shape == (2, k, h, h, 3) and batch.sources.vertices.shape[:2] == (2, k)
    assert batch.target_rgb.shape == (4, h, h, 3) and batch.target_vertices.shape[0] == 4
    half = batch.split(2, 1)
    assert half.size == 1 and torch.equal(half.target_rgb, batch.target_rgb[2:])


def test_a_subject_whose_images_do_not_show_its_head_is_refused(head, corpus_dirs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A corpus rendered with other cameras than it records (or another head or pose) is named
    before training, which would otherwise learn to draw nothing."""
    import shutil

    from backend.generate.data import landmarks_in_mask

    good = corpus_dirs[0][0]
    assert landmarks_in_mask(load_subject(good, head), head) == 1.0
    astray = tmp_path / "astray"
    shutil.copytree(good, astray)
    cams = dict(np.load(astray / "cameras.npz"))
    cams["world_to_cam"][..., 0, 3] += 0.3  # the recorded cameras 30 cm off the ones that rendered
    np.savez(astray / "cameras.npz", **cams)
    assert landmarks_in_mask(load_subject(astray, head), head) < 0.2
    # One frame of five off (a bad track) is not enough to refuse a clip; three are.
    cams["world_to_cam"][1:, ..., 0, 3] -= 0.3
    np.savez(astray / "cameras.npz", **cams)
    assert landmarks_in_mask(load_subject(astray, head), head) == 1.0
    cams["world_to_cam"][:3, ..., 0, 3] += 0.3
    np.savez(astray / "cameras.npz", **cams)
    with pytest.raises(InputError, match=r"1 of 3 subjects do not show the head .*astray"):
        Corpus([good, corpus_dirs[0][1], astray], head)


def test_corpus_batch_gathers_each_views_own_data(head, corpus_dirs) -> None:  # type: ignore[no-untyped-def]
    """The flat gathers agree with each subject read on its own and posed by the head model,
    across subjects with different frame and camera counts."""
    roots = [*corpus_dirs[0], *corpus_dirs[1]]
    corpus = Corpus(roots, head)
    samples = [Sample(2, ((1, 4), (0, 2)), ((1, 5),), True), Sample(0, ((3, 0), (1, 0)), ((4, 0),)), Sample(2, ((0, 0), (1, 1)), ((0, 3),))]
    batch = corpus.batch(samples)
    for i, sample in enumerate(samples):
        subject = load_subject(roots[sample.subject], head)
        for j, (f, c) in enumerate(sample.sources):
            assert torch.equal(batch.sources.images[i, j], subject.pixels[f, c, ..., :3].float() / 255)
            assert torch.equal(batch.sources.K[i, j], subject.K[f, c])
            assert torch.equal(batch.sources.world_to_cam[i, j], subject.world_to_cam[f, c])
            params = subject.params
            one = FlameParams(shape=params.shape, static_offset=params.static_offset, **{n: getattr(params, n)[f : f + 1] for n in ("expr", *POSE_FIELDS)})
            assert torch.allclose(batch.sources.vertices[i, j], head(one).vertices[0], atol=1e-6)
        f, c = sample.targets[0]
        assert torch.equal(batch.target_mask[i], subject.pixels[f, c, ..., 3:].float() / 255)
        assert torch.equal(batch.target_world_to_cam[i], subject.world_to_cam[f, c])
    assert batch.cross_time.tolist() == [True, False, False]
    with pytest.raises(ValueError, match="outside subject #0"):
        corpus.batch([Sample(0, ((5, 0),), ((0, 0),))])


def test_generated_avatar_roundtrip_and_bad_inputs(generator: Generator, head, corpus_dirs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    subject = Subject.load(corpus_dirs[1][0])
    path = save_generator(generator, tmp_path / "g.pt", {"phase": 1})
    assert path.stat().st_size < 2_000_000
    model, info = load_generator(path, head)
    assert info["phase"] == 1
    avatar = generate_avatar(model, head, subject, parse_views(["0:1,0:3"], subject))
    assert avatar.count == generator.config.gaussians and avatar.meta["k"] == 2
    ref = generate_avatar(generator, head, subject, [(0, 1), (0, 3)])
    assert torch.allclose(avatar.local.sh, ref.local.sh, atol=1e-3)  # fp16 weights
    # Bad inputs: clear errors.
    with pytest.raises(InputError, match="takes 1 to 4"):
        check_source_count(5)
    with pytest.raises(InputError, match="no source views"):
        check_source_count(0)
    with pytest.raises(InputError, match="takes 1 to 4"):
        parse_views(["0:0,0:1,0:2,0:3,0:4"], subject)
    with pytest.raises(InputError, match="frames 0..1 and cameras 0..5"):
        parse_views(["7"], subject)
    with pytest.raises(InputError, match="takes 1 to 4"):
        generator(mv_sources(subject, head, [0, 1, 2, 3, 4]))
    with pytest.raises(InputError, match="generator checkpoint not found"):
        read_generator_file(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable generator checkpoint"):
        read_generator_file(tmp_path / "junk.pt")
    images = []
    for i in range(5):
        p = tmp_path / f"p{i}.png"
        p.write_bytes(b"")
        images.append(p)
    with pytest.raises(InputError, match="5 source views given"):
        split_inputs(images)
    with pytest.raises(InputError, match="no source views"):
        split_inputs([])


def test_best_pool_ablation_uses_one_source_per_gaussian(generator: Generator, head, corpus_dirs) -> None:  # type: ignore[no-untyped-def]
    subject = Subject.load(corpus_dirs[1][0])
    sources = mv_sources(subject, head, [0, 3])
    with torch.no_grad():
        mean = generator(sources)
        best = generator(sources, pool="best")
        single = [generator(mv_sources(subject, head, [c])) for c in (0, 3)]
    # Each Gaussian's best-pooled colour is one of the single-source colours.
    seen = best.seen[0] > 0
    d = torch.stack([(best.base_rgb[0] - s.base_rgb[0]).abs().max(-1).values for s in single]).min(0).values
    assert float(d[seen].max()) < 1e-5
    assert float((mean.base_rgb - best.base_rgb).abs().max()) > 1e-3
    assert math.isfinite(float(mean.local.sh.sum()))


def test_consensus_pool_turns_down_a_source_that_disagrees_and_keeps_one_source_as_is(generator: Generator, head, corpus_dirs) -> None:  # type: ignore[no-untyped-def]
    subject = Subject.load(corpus_dirs[1][0])
    with torch.no_grad():
        one = mv_sources(subject, head, [0])
        torch.testing.assert_close(generator(one, pool="consensus").base_rgb, generator(one).base_rgb)
        # Three views of the subject and a fourth whose colours are inverted (as if something
        # covered the head there): the mean drifts towards it, the consensus hardly does.
        clean = generator(mv_sources(subject, head, [0, 1, 3]))
        spoiled = mv_sources(subject, head, [0, 1, 3, 2])
        spoiled.images[:, 3] = 1.0 - spoiled.images[:, 3]
        mean, consensus = generator(spoiled), generator(spoiled, pool="consensus")
        reordered = generator(spoiled.permuted([3, 0, 2, 1]), pool="consensus")
    seen = clean.seen[0] > 0
    drift = {name: float((out.base_rgb[0] - clean.base_rgb[0])[seen].abs().mean()) for name, out in (("mean", mean), ("consensus", consensus))}
    assert drift["consensus"] < 0.5 * drift["mean"], drift
    torch.testing.assert_close(reordered.base_rgb, consensus.base_rgb, atol=1e-5, rtol=0)  # order-invariant
    assert torch.equal(consensus.seen, mean.seen)  # what the sources see does not depend on what they agree on
    with pytest.raises(InputError, match="pool must be one of mean, best, consensus"):
        generator(one, pool="median")  # type: ignore[arg-type]


def test_source_gains_undo_an_exposure_and_white_balance_change() -> None:
    from backend.generate.model import source_gains

    gen = torch.Generator().manual_seed(3)
    base = 0.1 + 0.4 * torch.rand(1, 1, 500, 3, generator=gen)
    scale = torch.tensor([0.6, 0.8, 1.25])
    rgb = torch.cat([base, base * scale], 1)  # [1, 2, N, 3]: the second source darker and bluer
    weight = torch.ones(1, 2, 500)
    gains = source_gains(rgb, weight)
    torch.testing.assert_close(gains[0, 1] / gains[0, 0], 1 / scale, atol=1e-3, rtol=0)
    torch.testing.assert_close(gains[0, 0] * gains[0, 1], torch.ones(3), atol=1e-4, rtol=0)  # the level is the sources' mean
    torch.testing.assert_close(source_gains(rgb.flip(1), weight).flip(1), gains)  # order-invariant
    assert torch.equal(source_gains(base, weight[:, :1]), torch.ones(1, 1, 3))  # one source: unchanged
    apart = torch.stack([torch.arange(500) < 250, torch.arange(500) >= 250])[None].float()
    assert torch.equal(source_gains(rgb, apart), torch.ones(1, 2, 3))  # nothing seen in common: unchanged


def test_generator_pools_a_darker_source_as_if_it_were_not(generator: Generator, head, corpus_dirs) -> None:  # type: ignore[no-untyped-def]
    subject = Subject.load(corpus_dirs[1][0])
    with torch.no_grad():
        one = mv_sources(subject, head, [0])
        torch.testing.assert_close(generator(one, match_colours=True).base_rgb, generator(one).base_rgb)
        clean = generator(mv_sources(subject, head, [0, 1, 3]), match_colours=True)
        dark = mv_sources(subject, head, [0, 1, 3])
        dark.images[:, 1] = dark.images[:, 1] * (1 - dark.masks[:, 1]) + dark.images[:, 1] * dark.masks[:, 1] * torch.tensor([0.55, 0.7, 0.9])
        fixed, plain = generator(dark, match_colours=True), generator(dark)
    seen = clean.seen[0] > 0
    truth = clean.base_rgb[0][seen]

    def error(out) -> float:  # type: ignore[no-untyped-def]
        # Up to one gain per channel: the pooled head takes the sources' mean level.
        got = out.base_rgb[0][seen]
        scale = (got * truth).sum(0) / truth.square().sum(0)
        return float((got - truth * scale).abs().mean())

    assert error(fixed) < 0.5 * error(plain), (error(fixed), error(plain))
    assert float(fixed.gains[0, 1].mean()) > float(fixed.gains[0, 0].mean())  # the darkened source is brightened


def test_consensus_weights_survive_sources_far_apart() -> None:
    from backend.generate.model import consensus_weights

    rgb = torch.tensor([0.0, 1.0]).repeat_interleave(3).reshape(1, 2, 1, 3)  # black and white
    w = consensus_weights(rgb, torch.ones(1, 2, 1))
    torch.testing.assert_close(w / w.sum(1, keepdim=True), torch.full((1, 2, 1), 0.5))  # no underflow to zero
    assert float(consensus_weights(rgb, torch.zeros(1, 2, 1)).abs().sum()) == 0.0


def test_logit_of_surface_opacity(generator: Generator) -> None:
    base = generator.base_local(1)
    assert torch.allclose(torch.sigmoid(base.opacity_logit), torch.full_like(base.opacity_logit, generator.config.surface.opacity))
    assert float(logit(0.5)) == 0.0


def test_evaluation_protocol_end_to_end(generator: Generator, head, corpus_dirs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.benchmarks.generator_eval import (
        markdown,
        model_card,
        nested_camera_order,
        nested_frames,
        novel_expressions,
        novel_views,
        portrait_views,
        refinement_speedup,
        time_generation,
    )

    assert nested_camera_order(np.array([-60.0, -20.0, 20.0, 60.0, 5.0]), 3) == [4, 0, 3]
    assert nested_frames(list(range(10)), 4) == [0, 9, 4, 2]
    mono = [Subject.load(p) for p in corpus_dirs[0]]
    multi = [Subject.load(corpus_dirs[1][0])]
    results = {
        "novel_views": novel_views(generator, head, multi, ks=(1, 2), frames_per_subject=1),
        "novel_expressions": novel_expressions(generator, head, mono[:1], ks=(1, 2)),
        "timing": [time_generation(generator, head, multi[0], k=2, runs=1, warmup=0)],
        "refinement": refinement_speedup(generator, head, mono[0], iterations=4, eval_every=2, k=2),
        "portrait": portrait_views(generator, head, mono[0], tmp_path / "figures", name="tiny"),
    }
    assert results["novel_views"]["2"]["views"] == 4 and 10 < results["novel_views"]["2"]["psnr"] < 80
    assert [i for i, _ in results["refinement"]["curves"]["surface"]] == [0, 2, 4]
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["tiny_source.png", "tiny_yaw+30.png", "tiny_yaw-30.png"]
    text = markdown(results)
    assert "| 2 |" in text and "Stage 1 -> Stage 2" in text and "face PSNR" in text
    path = save_generator(generator, tmp_path / "g.pt", {"phase": 2, "steps_done": 3, "init": {"phase": 1, "steps_done": 5, "subjects": 3}})
    card = model_card(read_generator_file(path), results, path.stat().st_size)
    assert "phase 1: 5 steps" in card and "phase 2: 3 steps" in card and "Novel views" in card


def test_a_head_the_weights_do_not_fit_is_told_which_head_they_need_and_how_to_train() -> None:
    from backend.head.model import HeadModel
    from backend.head.registry import check_fits, load_head_data
    from backend.wire.errors import HeadModelError

    ict = HeadModel(load_head_data("ict"))
    with pytest.raises(HeadModelError) as caught:
        load_generator(None, ict)
    message = str(caught.value)
    assert "fits only that head (--head builtin)" in message and "spatialavatar train --head ict" in message and "--checkpoint" in message
    with pytest.raises(HeadModelError, match=r"load the head it was made on \(--head ict\)"):
        check_fits(load_head_data("builtin"), "ict-facekit-v1", "0" * 16)
    with pytest.raises(HeadModelError, match=r"--flame FLAME_PATH, the FLAME model 'flame2023' came from"):
        check_fits(load_head_data("builtin"), "flame2023", "0" * 16)
