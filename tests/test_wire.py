"""backend/wire on its own: every module imports with torch, bpy and scipy unavailable, and
reaches nothing of the backend outside the folder (the Blender add-on carries it whole)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: this one has torch loaded already. A meta-path finder placed
# first refuses the packages Blender's Python lacks, so an import of them anywhere in the
# folder (however deep) fails the way it would inside Blender.
IMPORT_ALL = """
import importlib, importlib.abc, json, pkgutil, sys

class Unavailable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"torch", "bpy", "scipy"}:
            raise ImportError(f"{name} is not available in Blender's Python")
        return None

sys.meta_path.insert(0, Unavailable())
import backend.wire
modules = [f"backend.wire.{m.name}" for m in pkgutil.iter_modules(backend.wire.__path__)]
for name in modules:
    importlib.import_module(name)
outside = sorted(m for m in sys.modules if m.startswith("backend.") and not m.startswith("backend.wire"))
print(json.dumps({"modules": modules, "outside": outside}))
"""


def test_every_wire_module_imports_without_torch_bpy_or_scipy() -> None:
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads(proc.stdout.splitlines()[-1])
    files = sorted(f"backend.wire.{p.stem}" for p in (ROOT / "backend" / "wire").glob("*.py") if p.stem != "__init__")
    assert sorted(seen["modules"]) == files
    assert {"backend.wire.protocol", "backend.wire.client", "backend.wire.security"} <= set(files)
    assert {"backend.wire.arkit_csv", "backend.wire.expression_names"} <= set(files)
    assert seen["outside"] == [], "wire modules import only their siblings"


def test_the_blocker_catches_a_torch_import() -> None:
    """The check above would pass vacuously if the finder never fired."""
    code = IMPORT_ALL.replace("import backend.wire\n", "import backend.wire\nimport torch\n", 1)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "torch is not available in Blender's Python" in proc.stderr
