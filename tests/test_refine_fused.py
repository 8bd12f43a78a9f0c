"""The Triton kernels of the training step (backend/refine/fused) against the torch functions
they replace: compiled on a CUDA GPU, and on the CPU through Triton's interpreter, which runs
the same kernel code element by element (so CI without a GPU checks their maths too)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fused_cases import check_photometric, check_placement

ROOT = Path(__file__).resolve().parents[1]
# Where `make test` puts Triton when torch did not bring it (a CPU build): outside the venv's
# own packages, so that only these subprocesses import it (see the Makefile).
SIDE_TRITON = ROOT / ".venv" / "triton-interpreter"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _triton_path() -> list[str]:
    """Entries for the subprocess's PYTHONPATH that make Triton importable."""
    if importlib.util.find_spec("triton") is not None:
        return []
    if (SIDE_TRITON / "triton").is_dir():
        return [str(SIDE_TRITON)]
    pytest.skip("Triton is not installed (make test installs it)")


@pytest.mark.parametrize("case", ["check_photometric", "check_placement"])
def test_kernels_in_the_triton_interpreter(case: str) -> None:
    # The interpreter is chosen when Triton is first imported: a process of its own.
    path = os.pathsep.join([str(ROOT), *_triton_path()])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path, CUDA_VISIBLE_DEVICES="")
    code = f"from tests.fused_cases import {case}; {case}('cpu')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.cuda
@cuda
def test_photometric_kernel_matches_torch_on_the_gpu() -> None:
    check_photometric("cuda")


@pytest.mark.cuda
@cuda
def test_placement_kernel_matches_torch_on_the_gpu() -> None:
    check_placement("cuda")
