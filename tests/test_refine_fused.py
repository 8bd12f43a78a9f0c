"""The Triton kernels of the training step (backend/refine/fused) against the torch functions
they replace: compiled on a CUDA GPU, and on the CPU through Triton's interpreter, which runs
the same kernel code element by element (so CI without a GPU checks their maths too)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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
        # Before 3.7 the interpreter turns a kernel's runtime loop count into an int with
        # int(array of one element), which numpy 2.5 refuses (a bug of Triton's, not ours).
        triton_version = tuple(int(p) for p in importlib.metadata.version("triton").split(".")[:2])
        numpy_version = tuple(int(p) for p in np.__version__.split(".")[:2])
        if triton_version < (3, 7) and numpy_version >= (2, 5):
            pytest.skip(f"Triton {importlib.metadata.version('triton')}'s interpreter fails with numpy {np.__version__}")
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


@pytest.mark.cuda
@cuda
def test_compiling_ahead_covers_every_size(tmp_path: Path) -> None:
    # After compile_ahead on a tiny image and one Gaussian, the checks above (other image
    # sizes, batches, layouts) must not compile anything more: refine() compiles ahead in the
    # background and relies on that. A fresh process with an empty on-disk cache sees every
    # compile as new files there.
    code = (
        "import os, torch\n"
        "from backend.refine.fused import compile_ahead\n"
        "from tests.fused_cases import check_photometric, check_placement\n"
        "count = lambda: sum(len(f) for _, _, f in os.walk(os.environ['TRITON_CACHE_DIR']))\n"
        "compile_ahead(torch.device('cuda'), mesh=True)()\n"
        "before = count()\n"
        "check_photometric('cuda'); check_placement('cuda')\n"
        "print(before, count())\n"
    )
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = map(int, done.stdout.split()[-2:])
    assert before > 0 and after == before
