"""Stage 1 training: the loss goes down, checkpoints resume, L2-SP, DDP equals one process on
the union batch, and the `train` / `generate` commands (run in-process, on the tiny head)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from backend.cli import main
from backend.gaussians.files import load_avatar
from backend.generate.model import Generator, preset
from backend.generate.train import TrainConfig, compute_loss, l2sp_penalty, mean_over_ranks, setup_distributed, teardown_distributed, train
from backend.head.flame_files import write_flame
from backend.refine.perceptual import Lpips
from tests.lpips_weights import stand_in_weights
from tests.test_generate_support import (  # noqa: F401 (autouse fixture)
    assert_ddp_matches_union_batch,
    ddp_gradient_worker,
    fixed_batch,
    one_thread,
    seeded_model,
    tiny_corpus,
    tiny_head,
    tiny_head_data,
)
from tests.test_server_support import free_port


@pytest.fixture(scope="module")
def corpus_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    return tiny_corpus(tmp_path_factory.mktemp("corpus"), mono=2, multi=1)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(corpus_dirs) -> None:  # type: ignore[no-untyped-def]
    head = tiny_head()
    batch = fixed_batch(head, corpus_dirs[0])
    torch.manual_seed(0)
    model = Generator.for_head(preset("tiny"), head)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(5):
        loss, terms = compute_loss(model, batch, TrainConfig())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        assert set(terms) >= {"l1", "dssim", "spike", "psnr"}
    assert losses[-1] < losses[0]


def test_lpips_term_from_local_weights(corpus_dirs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Stand-in LPIPS weight files: the term is added, with its weight.
    lpips = Lpips(stand_in_weights(tmp_path))
    head = tiny_head()
    batch = fixed_batch(head, corpus_dirs[0])
    model = seeded_model(head)
    plain, _ = compute_loss(model, batch, TrainConfig())
    with_lpips, terms = compute_loss(model, batch, TrainConfig(lpips_weight=0.5), lpips=lpips)
    assert float(terms["lpips"]) > 0
    torch.testing.assert_close(with_lpips, plain + 0.5 * terms["lpips"])


def test_l2sp_is_zero_at_the_anchor_and_positive_away() -> None:
    model = seeded_model(tiny_head())
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert float(l2sp_penalty(model, anchor).detach()) == 0.0
    with torch.no_grad():
        model.point[0].weight.add_(0.1)
    expect = 0.01 * model.point[0].weight.numel()
    assert float(l2sp_penalty(model, anchor).detach()) == pytest.approx(expect, rel=1e-4)


def test_ddp_two_processes_match_one_process_on_the_union_batch(corpus_dirs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "ddp.pt"
    mp.spawn(ddp_gradient_worker, args=(2, free_port(), "gloo", corpus_dirs[0], out), nprocs=2, join=True)
    assert_ddp_matches_union_batch(torch.load(out, weights_only=True), corpus_dirs[0])


def _train_worker(rank: int, world: int, port: int, mono_dirs: list[Path], run: Path) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(phase=1, steps=2, batch=1, targets=1, log_every=1, checkpoint_every=1, warmup=1)
        train(cfg, preset("tiny"), mono_dirs, run, tiny_head(), device="cpu", show_progress=False)
        info = setup_distributed("cpu")
        means = mean_over_ranks({"x": torch.tensor(3.0 * rank), "y": torch.tensor(6.0)}, 3, info)
        if rank == 0:
            (run / "means.json").write_text(json.dumps(means))
    finally:
        teardown_distributed()


def test_a_two_process_run_logs_rank_means_and_resumes_in_one_process(corpus_dirs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    mp.spawn(_train_worker, args=(2, free_port(), corpus_dirs[0], run), nprocs=2, join=True)
    assert json.loads((run / "means.json").read_text()) == {"x": 0.5, "y": 2.0}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps_done"] == 2
    cfg = TrainConfig(phase=1, steps=3, batch=2, targets=1, log_every=1, warmup=1)
    more = train(cfg, preset("tiny"), corpus_dirs[0], run, tiny_head(), device="cpu", show_progress=False)
    assert more["steps_done"] == 3 and more["world_size"] == 1
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert [x["samples_per_s"] > 0 for x in lines] == [True] * 3


def test_train_checkpoints_resume_and_phase_two(corpus_dirs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    head = tiny_head()
    cfg = TrainConfig(phase=1, steps=2, batch=1, targets=1, log_every=1, checkpoint_every=1, warmup=1)
    run1 = tmp_path / "p1"
    first = train(cfg, preset("tiny"), corpus_dirs[0], run1, head, device="cpu", show_progress=False)
    assert first["steps_done"] == 2 and first["finished"]
    more = train(TrainConfig(**(cfg.to_dict() | {"steps": 3, "anti_spike": cfg.anti_spike})), preset("tiny"), corpus_dirs[0], run1, head, device="cpu", show_progress=False)
    assert more["steps_done"] == 3
    lines = [json.loads(x) for x in (run1 / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert {"loss", "l1", "dssim", "spike", "psnr", "k", "lr"} <= set(lines[0])
    summary = json.loads((run1 / "summary.json").read_text())
    assert summary["steps_done"] == 3 and summary["phase"] == 1
    assert (run1 / "generator.pt").stat().st_size < (run1 / "checkpoint.pt").stat().st_size
    # Phase 2 from phase 1: L2-SP is zero on the first step (the weights are the anchor).
    cfg2 = TrainConfig(phase=2, steps=1, batch=1, targets=1, log_every=1, l2sp=1e-2, cross_time=0.25)
    with pytest.raises(Exception, match="--init"):
        train(cfg2, preset("tiny"), corpus_dirs[1], tmp_path / "p2", head, device="cpu", show_progress=False)
    second = train(cfg2, preset("tiny"), corpus_dirs[1], tmp_path / "p2", head, init=run1, device="cpu", show_progress=False)
    assert second["init"]["phase"] == 1 and second["steps_done"] == 1
    line = json.loads((tmp_path / "p2" / "log.jsonl").read_text().splitlines()[0])
    assert line["l2sp"] == 0.0
    with pytest.raises(Exception, match="phase-2 run"):
        train(cfg, preset("tiny"), corpus_dirs[0], tmp_path / "p2", head, device="cpu", show_progress=False)


def test_train_and_generate_commands(corpus_dirs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # type: ignore[no-untyped-def]
    flame = write_flame(tiny_head_data(), tmp_path / "tiny_flame")
    run = tmp_path / "run"
    common = ["--flame", str(flame), "--device", "cpu", "--json"]
    assert main(["train", "--phase", "1", "--data", *map(str, corpus_dirs[0]), "--out", str(run), "--preset", "tiny", "--steps", "1", "--batch", "1", "--targets", "1", *common]) == 0
    assert json.loads(capsys.readouterr().out)["steps_done"] == 1
    subject = corpus_dirs[1][0]
    out = tmp_path / "avatar.npz"
    assert main(["generate", str(subject), "--frames", "0:0", "0:2,1:4", "--checkpoint", str(run / "generator.pt"), "--out", str(out), *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sources"] == 3 and load_avatar(out).count == 2_000
    # The same head carried onto a denser layout, for a refinement with more room.
    dense = tmp_path / "dense.npz"
    assert main(["generate", str(subject), "--checkpoint", str(run / "generator.pt"), "--gaussians", "5000", "--no-personalize", "--out", str(dense), *common]) == 0
    assert json.loads(capsys.readouterr().out)["gaussians"] == 5_000
    assert load_avatar(dense).count == 5_000 and load_avatar(dense).meta["resampled_from"] == 2_000
    # Clear one-line errors, exit status 2.
    cases = [
        (["generate", str(subject), "--frames", "0:0,0:1,0:2,0:3,0:4", "--checkpoint", str(run / "generator.pt")], "takes 1 to 4"),
        (["generate"], "no source views"),
        (["generate", str(subject), "--gaussians", "10", "--checkpoint", str(run / "generator.pt")], "--gaussians 10"),
        (["generate", str(subject), "--checkpoint", str(tmp_path / "nope.pt")], "generator checkpoint not found"),
        (["train", "--phase", "2", "--data", str(subject), "--out", str(tmp_path / "r2")], "--init"),
    ]
    for args, message in cases:
        assert main([*args, "--out", str(out), *common] if args[0] == "generate" else [*args, *common]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_the_scaling_benchmark_refuses_a_plan_that_cannot_run(corpus_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Each refusal is one line with usage, status 2, before any training run starts."""
    from tests.benchmarks import bench_train_scaling

    base = ["bench", "--data", *map(str, corpus_dirs[0]), "--out", str(tmp_path / "out"), "--device", "cpu", "--gpus", "1", "2"]
    cases = [
        (["--steps", "10", "--log-every", "25"], "leaves no log window"),
        (["--curve-batch", "15"], "does not split over 2 GPUs"),
        (["--parts", "resume"], "run the curves part first"),
        (["--gpus", "3", "--curve-batch", "15"], "each of 3 ranks needs its own shard"),
        (["--batch", "0"], "--batch must be at least 1"),
        (["--data", str(tmp_path / "nowhere")], "data folder not found"),
    ]
    for extra, message in cases:
        monkeypatch.setattr("sys.argv", base + extra)
        with pytest.raises(SystemExit) as stop:
            bench_train_scaling.main()
        assert stop.value.code == 2
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "out").exists()
