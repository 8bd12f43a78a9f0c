"""Shared fixtures. Tests run on the CPU; tests marked `cuda` skip without a CUDA GPU."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from backend.batch import bpy_process
from backend.data.synthetic import SynthConfig, synthesize
from backend.head.model import HeadModel
from backend.head.registry import load_head_model


@pytest.fixture(scope="session")
def head() -> HeadModel:
    """The built-in head model (no FLAME file needed)."""
    return load_head_model("builtin")


@pytest.fixture()
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def addon(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The extension zip (built and validated once per process), installed and enabled in bpy."""
    from tests.addon_support import build_zip, install_addon

    zip_path = build_zip(tmp_path_factory.mktemp("dist"))
    return install_addon(zip_path, tmp_path_factory.mktemp("user"), tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def portrait(head: HeadModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic portrait (PNG): the built-in head, rendered from the front."""
    root = synthesize(head, tmp_path_factory.mktemp("synth") / "s", SynthConfig(frames=1, size=256, reference_gaussians=20_000, motion=0.0))
    return next((root / "images").glob("*.png"))


_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """After the report: a run that imported bpy ends without Python's teardown, which bpy
    4.2 and 4.5 as modules do not survive once the add-on is registered (bpy_process)."""
    if "bpy" in sys.modules:
        bpy_process.exit(config.stash.get(_EXIT_STATUS, 1))
