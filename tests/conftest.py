"""Shared fixtures. Tests run on the CPU; tests marked `cuda` skip without a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from backend.head.model import HeadModel
from backend.head.registry import load_head_model


@pytest.fixture(scope="session")
def head() -> HeadModel:
    """The built-in head model (no FLAME file needed)."""
    return load_head_model("builtin")


@pytest.fixture()
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
