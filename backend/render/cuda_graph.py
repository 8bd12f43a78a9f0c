"""A step of work replayed from one CUDA graph: a training step, or posing and rendering frames.

When every call launches the same kernels on tensors of the same shapes (a frozen layout,
a fixed batch) and only device-side values change (a step counter, the frame's parameters
copied into input buffers), the work is captured once and then is one graph launch instead
of a Python-driven launch per kernel: the GPU, not the host, sets the pace. The step must
not wait for the GPU anywhere: renders go through a ``TileBudget``.
"""

from __future__ import annotations

import gc
from typing import Callable, Generic, Protocol, Sequence, TypeVar

import torch

Out = TypeVar("Out")


class ZeroGrad(Protocol):
    """An optimizer, as far as capturing is concerned."""

    def zero_grad(self, set_to_none: bool = True) -> None: ...


class GraphedStep(Generic[Out]):
    """Runs ``step`` eagerly for ``warmup`` calls on a side stream, then captures it and
    replays the capture for every later call.

    ``step`` must read all its per-step inputs from device tensors that it updates itself
    (a step counter) or that the caller fills before each call (input buffers), begin with ``zero_grad(set_to_none=True)`` on its optimizers (if any), and
    return the same tensors each call (the capture's outputs are overwritten by each replay).
    """

    def __init__(self, step: Callable[[], Out], optimizers: Sequence[ZeroGrad], warmup: int = 3) -> None:
        self._step = step
        self._optimizers = optimizers
        self._warmup = warmup
        self._graph: torch.cuda.CUDAGraph | None = None
        self._out: Out | None = None
        self._calls = 0

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def __call__(self) -> Out:
        if self._graph is not None:
            self._graph.replay()
            assert self._out is not None
            return self._out
        if self._calls < self._warmup:
            # Side-stream warm-up, as CUDA graph capture asks: lazy initialisation (compiled
            # kernels, autograd's stream bookkeeping) happens outside the capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._step()
            torch.cuda.current_stream().wait_stream(side)
            self._calls += 1
            return out
        self.recapture()
        return self()

    def recapture(self) -> None:
        """Capture the step afresh (e.g. after a buffer it uses was resized)."""
        for opt in self._optimizers:
            opt.zero_grad(set_to_none=True)  # gradients are then allocated inside the capture
        torch.cuda.synchronize()
        self._graph = torch.cuda.CUDAGraph()
        # Python's collector must not run inside the capture: freeing a dead cycle's pinned
        # host or CUDA tensors there can record and query CUDA events, calls a capture
        # forbids. A frame-player capture failed so (cudaErrorStreamCaptureInvalidated)
        # after the generator's GPU tests had run in the same process; the collector is
        # the likely culprit. So: collect now, and not again until the capture ends.
        gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        try:
            # Thread-local: CUDA work that another thread of the process starts meanwhile
            # (the refinement's kernels compiling in the background, a server's other jobs)
            # must not invalidate this capture, as "global" mode lets it.
            with torch.cuda.graph(self._graph, capture_error_mode="thread_local"):
                self._out = self._step()
        finally:
            if collecting:
                gc.enable()
