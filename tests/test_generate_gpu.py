"""Stage 1 on CUDA: the corpus's pinned, non-blocking gathers match the CPU's, the outline
step's hair weights come out the same from a layout on the GPU, and two GPUs under nccl DDP
average to one GPU's gradients on the union batch (skipped with fewer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from backend.generate.data import Corpus, PhaseSampler, find_subjects
from backend.generate.model import Generator, preset
from backend.generate.outline import OutlineFit, hair_weight
from backend.head.registry import load_head_model
from tests.test_generate_support import assert_ddp_matches_union_batch, ddp_gradient_worker, one_thread, tiny_corpus, tiny_head  # noqa: F401 (autouse fixture)
from tests.test_server_support import free_port

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def mono_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return tiny_corpus(tmp_path_factory.mktemp("corpus"), mono=3, multi=0)[0]


def test_corpus_batches_on_cuda_equal_the_cpu_ones(mono_dirs: list[Path]) -> None:
    roots = find_subjects(mono_dirs)
    on_cpu, on_gpu = Corpus(roots, tiny_head()), Corpus(roots, tiny_head().to("cuda"), "cuda")
    sampler = PhaseSampler(on_cpu.layouts(), phase=1, targets=2, seed=3)
    for _ in range(5):
        _, samples = sampler.batch(4)
        a, b = on_cpu.batch(samples), on_gpu.batch(samples)
        assert b.target_rgb.is_cuda
        # uint8 / 255 may round one ulp apart on the two devices; a wrong pixel is >= 1/255 off.
        assert torch.allclose(a.sources.images, b.sources.images.cpu(), atol=1e-6) and torch.allclose(a.target_rgb, b.target_rgb.cpu(), atol=1e-6)
        assert torch.allclose(a.sources.vertices, b.sources.vertices.cpu(), atol=1e-6)
        assert torch.equal(a.target_world_to_cam, b.target_world_to_cam.cpu())


def test_a_generator_made_for_a_cuda_head_leaves_the_head_on_the_gpu() -> None:
    """Generator.for_head works on a CPU copy; the caller's head stays where it was (an
    in-place move to the CPU once broke every later use of a CUDA head)."""
    head = tiny_head().to("cuda")
    model = Generator.for_head(preset("tiny"), head)
    assert head.v_template.is_cuda and head.dirs.is_cuda
    assert not any(p.is_cuda for p in model.parameters())


def test_the_hair_region_of_a_layout_on_the_gpu_is_the_cpus() -> None:
    """``generate`` on CUDA keeps the generator's layout on the GPU; the outline step's hair
    weights are made on the CPU from it (indexing CPU arrays with CUDA indices once failed
    every CUDA generate on a head with a scalp)."""
    head = load_head_model()  # the built-in head: it has a scalp mask
    binding = Generator.for_head(preset("tiny"), head).binding
    on_cpu = hair_weight(head.data, binding, OutlineFit().hairline_ramp)
    assert on_cpu.max() > 0
    torch.testing.assert_close(hair_weight(head.data, binding.to("cuda"), OutlineFit().hairline_ramp).cpu(), on_cpu)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_nccl_ddp_on_two_gpus_matches_one_gpu_on_the_union_batch(mono_dirs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    mp.spawn(ddp_gradient_worker, args=(2, free_port(), "nccl", mono_dirs, out), nprocs=2, join=True)
    # TF32 and reduction order differ between the two sides: compare at 1e-3 of each tensor's scale.
    assert_ddp_matches_union_batch(torch.load(out, weights_only=True), mono_dirs, "cuda:0", rel=1e-3)
