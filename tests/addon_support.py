"""Helpers for the add-on tests (no tests here): the built extension installed into the bpy
module, a real ``python -m backend serve`` subprocess, and pumping the add-on's timer.

Background Blender runs no timers by itself, so tests call the add-on's timer function
(``runtime.RUNTIME.tick``) in a loop, exactly as Blender's event loop would.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from tests.test_server_support import ServiceProcess

ROOT = Path(__file__).resolve().parents[1]
REPO = "sa_test"
MODULE = f"bl_ext.{REPO}.spatialavatar"
SUBMODULES = ("pointcloud", "flame_data", "animation_io", "operators", "runtime", "preview", "overlay", "tasks", "media_files", "avatars")
_built: dict[str, Path] = {}


def build_zip(out: Path) -> Path:
    """The validated extension zip, built once per test process."""
    if "zip" not in _built:
        sys.path.insert(0, str(ROOT / "blender_addon"))
        try:
            import build
        finally:
            sys.path.pop(0)
        zips = build.build(out)
        assert [z.name for z in zips] == ["spatialavatar-0.1.0.zip"]
        _built["zip"] = zips[0]
    return _built["zip"]


def install_addon(zip_path: Path, user_dir: Path, repo_dir: Path) -> ModuleType:
    """Install the zip into a fresh extension repository and enable it (once per process)."""
    os.environ.setdefault("BLENDER_USER_RESOURCES", str(user_dir))
    import bpy

    prefs = bpy.context.preferences
    if MODULE not in {a.module for a in prefs.addons}:
        if REPO not in {r.module for r in prefs.extensions.repos}:
            prefs.extensions.repos.new(name=REPO, module=REPO, custom_directory=str(repo_dir), source="USER")
        assert bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo=REPO, enable_on_install=True) == {"FINISHED"}
    assert MODULE in {a.module for a in prefs.addons}
    for name in SUBMODULES:
        importlib.import_module(f"{MODULE}.{name}")
    return sys.modules[MODULE]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_backend(store: Path, *extra: str) -> ServiceProcess:
    """``python -m backend serve --device cpu`` on a free loopback port; always ``stop()`` it."""
    return ServiceProcess(store, extra=extra)


def set_prefs(bpy: ModuleType, endpoint: str, timeout_s: float = 60.0, retries: int = 0) -> None:
    p = bpy.context.preferences.addons[MODULE].preferences
    p.endpoint, p.timeout_s, p.retries, p.key_dir = endpoint, timeout_s, retries, ""


def pump(addon: ModuleType, until: Callable[[], bool], limit_s: float = 120.0) -> None:
    """Run the add-on's timer function until ``until()`` holds (a guard against hangs, not a timing check)."""
    deadline = time.monotonic() + limit_s
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached after {limit_s} s of pumping")
        addon.runtime.RUNTIME.tick()
        time.sleep(0.01)
