"""Stage 1 training: the loss goes down, checkpoints resume, L2-SP, DDP equals one process on
the union batch, and the `train` / `generate` commands (run in-process, on the tiny head)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from backend.cli import main
from backend.gaussians.files import load_avatar
from backend.generate.data import Batch, Corpus, Sample, find_subjects
from backend.generate.model import Generator, preset
from backend.generate.train import TrainConfig, compute_loss, l2sp_penalty, train
from backend.head.flame_files import write_flame
from tests.test_generate_support import one_thread, tiny_corpus, tiny_head, tiny_head_data  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def corpus_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    return tiny_corpus(tmp_path_factory.mktemp("corpus"), mono=2, multi=1)


def fixed_batch(head, mono_dirs: list[Path]) -> Batch:  # type: ignore[no-untyped-def]
    corpus = Corpus(find_subjects(mono_dirs), head)
    samples = [Sample(0, ((0, 0), (2, 0)), ((4, 0),)), Sample(1, ((1, 0), (3, 0)), ((0, 0),))]
    return corpus.batch(samples)


def seeded_model(head) -> Generator:  # type: ignore[no-untyped-def]
    """The tiny generator with a random output layer, so every weight gets a gradient."""
    torch.manual_seed(0)
    model = Generator.for_head(preset("tiny"), head)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.decoder.head.weight.copy_(0.01 * torch.randn(model.decoder.head.weight.shape, generator=gen))
    return model


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


def test_l2sp_is_zero_at_the_anchor_and_positive_away() -> None:
    model = seeded_model(tiny_head())
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert float(l2sp_penalty(model, anchor).detach()) == 0.0
    with torch.no_grad():
        model.point[0].weight.add_(0.1)
    expect = 0.01 * model.point[0].weight.numel()
    assert float(l2sp_penalty(model, anchor).detach()) == pytest.approx(expect, rel=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, mono_dirs: list[Path], out: Path) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        head = tiny_head()
        model = seeded_model(head)
        part = fixed_batch(head, mono_dirs).split(world, rank)
        net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        loss, _ = compute_loss(net, part, TrainConfig())
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            torch.save({"loss": float(mean_loss) / world, "grads": grads}, out)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process_on_the_union_batch(corpus_dirs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), corpus_dirs[0], out), nprocs=2, join=True)
    head = tiny_head()
    model = seeded_model(head)
    loss, _ = compute_loss(model, fixed_batch(head, corpus_dirs[0]), TrainConfig())
    loss.backward()
    got = torch.load(out, weights_only=True)
    assert got["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    nonzero = 0
    for name, p in model.named_parameters():
        ref, ddp = p.grad, got["grads"][name]
        scale = float(ref.abs().max()) + 1e-12
        assert float((ref - ddp).abs().max()) <= 1e-4 * scale + 1e-9, name
        nonzero += int(scale > 1e-10)
    assert nonzero > 0.9 * len(got["grads"])


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
    # Clear one-line errors, exit status 2.
    cases = [
        (["generate", str(subject), "--frames", "0:0,0:1,0:2,0:3,0:4", "--checkpoint", str(run / "generator.pt")], "takes 1 to 4"),
        (["generate"], "no source views"),
        (["generate", str(subject), "--checkpoint", str(tmp_path / "nope.pt")], "generator checkpoint not found"),
        (["train", "--phase", "2", "--data", str(subject), "--out", str(tmp_path / "r2")], "--init"),
    ]
    for args, message in cases:
        assert main([*args, "--out", str(out), *common] if args[0] == "generate" else [*args, *common]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
