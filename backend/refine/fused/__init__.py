"""Hand-fused Triton kernels for the Stage 2 training step on CUDA.

Each module pairs a kernel with the pure-torch function it replaces (the reference, which
the CPU runs and the GPU tests compare against). Without these, the step is a few hundred
small element-wise kernels; in a captured CUDA graph each still costs a launch slot of
about 1.5-2 us, which is most of what separates the step from the rasterizer's own time.
"""

from __future__ import annotations

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
