"""Hand-fused Triton kernels for the Stage 2 training step on CUDA.

Each module pairs a kernel with the pure-torch function it replaces (the reference, which
the CPU runs and the GPU tests compare against). Without these, the step is a few hundred
small element-wise kernels; in a captured CUDA graph each still costs a launch slot of
about 1.5-2 us, which is most of what separates the step from the rasterizer's own time.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def _triton_present() -> bool:
    try:
        import triton  # noqa: F401  (CUDA builds of torch ship it)
    except ImportError:
        return False
    return True


def usable(device: torch.device) -> bool:
    """True where the fused kernels run: a CUDA device and Triton installed."""
    return device.type == "cuda" and _triton_present()


def compile_ahead(device: torch.device, placement: bool = True, mesh: bool = False) -> Callable[[], None]:
    """Start compiling the fused kernels (the placement's too with ``placement``, and its
    backward to the mesh with ``mesh``) for ``device`` in the background, one thread per
    kernel; returns a function that waits for them and raises what they raised.

    On a machine's first run Triton compiles each kernel and builds its launcher at first
    launch, most of it waiting on ptxas and the C compiler, which run side by side from
    threads. Later runs load them from Triton's on-disk cache. Triton's driver, which every
    launch needs (and builds once per machine), is set up first.
    """
    import triton

    from backend.refine.fused import photometric
    from backend.refine.fused import placement as placing

    launches = photometric.first_launches(device) + (placing.first_launches(device, mesh) if placement else [])
    pool = ThreadPoolExecutor(1 + len(launches))

    def run() -> None:
        triton.runtime.driver.active.get_current_device()
        for job in [pool.submit(launch) for launch in launches]:
            job.result()
        torch.cuda.synchronize(device)

    started = pool.submit(run)

    def wait() -> None:
        try:
            started.result()
        finally:
            pool.shutdown()

    return wait
