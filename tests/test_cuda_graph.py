"""A captured step survives Python's collector: garbage that holds pinned host memory and
CUDA tensors, collected while a capture is under way, must not invalidate it."""

from __future__ import annotations

import gc

import pytest
import torch

from backend.render.cuda_graph import GraphedStep

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class _Cycle:
    """A dead reference cycle holding a pinned buffer and the CUDA copy made from it."""

    def __init__(self) -> None:
        self.me = self
        self.pinned = torch.ones(1 << 16).pin_memory()
        self.copy = self.pinned.to("cuda", non_blocking=True)


def test_a_capture_survives_garbage_with_pinned_and_cuda_tensors() -> None:
    state = torch.zeros(1024, device="cuda")
    out = torch.empty_like(state)

    def step() -> torch.Tensor:
        state.add_(1.0)
        torch.mul(state, 2.0, out=out)
        return out

    threshold = gc.get_threshold()
    gc.set_threshold(1)  # the collector then runs at almost every new Python object
    try:
        for _ in range(32):
            _Cycle()
        graphed = GraphedStep(step, (), warmup=0)
        for _ in range(3):
            result = graphed()
        torch.cuda.synchronize()
    finally:
        gc.set_threshold(*threshold)
    assert graphed.captured
    # Capturing records the step without running it; each of the 3 calls replays it once.
    assert torch.equal(result, torch.full_like(state, 6.0))
