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

import numpy as np

from tests.test_server_support import ServiceProcess, free_port

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


def read_image(path: Path) -> np.ndarray:
    """An image file as Blender reads it: [H, W, 4] float32, bottom row first."""
    import bpy

    img = bpy.data.images.load(str(path))
    try:
        return np.array(img.pixels[:], np.float32).reshape(img.size[1], img.size[0], 4)
    finally:
        bpy.data.images.remove(img)


class FakeLayout:
    """Stands in for ``Panel.layout``, which background Blender cannot make (no window to draw
    in). It checks what a panel's ``draw`` names: every property exists on its data, every
    operator is registered and every operator property it sets exists."""

    def __init__(self, drawn: list[str]) -> None:
        self.drawn = drawn

    def _same(self, *args: object, **kwargs: object) -> FakeLayout:
        return self

    row = column = box = split = _same

    def label(self, text: str = "", **kwargs: object) -> None:
        self.drawn.append(f"label:{text}")

    def prop(self, data, name: str, **kwargs: object) -> None:
        assert name in data.bl_rna.properties, f"{type(data).__name__} has no property {name}"
        self.drawn.append(f"prop:{name}")
        if "text" in kwargs:
            self.drawn.append(f"text:{kwargs['text']}")

    def operator(self, idname: str, **kwargs: object):
        import bpy

        group, name = idname.split(".")
        props = getattr(getattr(bpy.ops, group), name).get_rna_type().properties
        self.drawn.append(f"operator:{idname}")

        class Props:
            def __setattr__(self, key: str, value: object) -> None:
                assert key in props, f"{idname} has no property {key}"

        return Props()

    def template_list(self, list_type: str, list_id: str, data, prop: str, active_data, active_prop: str, **kwargs: object) -> None:
        import bpy

        assert hasattr(bpy.types, list_type) and prop in data.bl_rna.properties and active_prop in active_data.bl_rna.properties
        self.drawn.append(f"list:{prop}")

    def template_icon(self, icon_value: int, **kwargs: object) -> None:
        self.drawn.append("icon")

    def progress(self, factor: float, **kwargs: object) -> None:
        assert 0.0 <= factor <= 1.0
        self.drawn.append("progress")

    def separator(self) -> None:
        pass


def draw_panels(addon, context) -> list[str]:
    """Run every sidebar panel's ``draw`` that its ``poll`` allows; what they drew, in order."""
    from types import SimpleNamespace

    import bpy

    drawn: list[str] = []
    for cls in addon.panel.classes:
        if issubclass(cls, bpy.types.Panel) and (not hasattr(cls, "poll") or cls.poll(context)):
            cls.draw(SimpleNamespace(layout=FakeLayout(drawn)), context)
    return drawn
