"""Build the SpatialAvatar extension zip (run from anywhere; needs only Python, no Blender).

    python blender_addon/build.py [--out DIR] [--wheels] [--platform TAG ...] [--no-validate]

Steps:
1. stage: copy the add-on modules (blender_addon/*.py but this file) to the staging root,
   the folder backend/wire (what the add-on shares with the backend, torch-free; its
   ``__init__`` states the rule) whole to ``wire/``, and the repository's
   blender_manifest.toml; git holds one copy of each. The manifest packs everything staged;
2. optionally (``--wheels``, registry access at build time only) download pyzmq 26.x
   wheels for CPython 3.11 (Blender 4.2-5.0) and 3.13 (5.1+) and list them in the manifest;
3. run Blender's own extension tool ``blender_ext.py build`` and then ``validate``. The tool is
   found in a Blender install or in the ``bpy`` module (``--blender-ext PATH`` overrides).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ADDON = Path(__file__).resolve().parent
ROOT = ADDON.parent
MANIFEST = ROOT / "blender_manifest.toml"
WIRE = ROOT / "backend" / "wire"  # carried whole as wire/: the add-on's only part of the backend
PYZMQ = "pyzmq==26.4.0"  # 27.x ships cp312-abi3 wheels, which Blender reads as "3.12 only"
PYTHONS = ("3.11", "3.13")
PLATFORMS = {  # Blender platform -> pip platform tag
    "linux-x64": "manylinux_2_28_x86_64",
    "windows-x64": "win_amd64",
    "macos-arm64": "macosx_11_0_arm64",
    "macos-x64": "macosx_10_15_x86_64",
}


class BuildError(RuntimeError):
    pass


def addon_modules() -> list[Path]:
    return sorted(p for p in ADDON.glob("*.py") if p.name != "build.py")


def wire_modules() -> list[Path]:
    return sorted(WIRE.glob("*.py"))


def check_self_contained(source: str, name: str) -> None:
    """Raise unless the wire module ``source`` works inside the extension: it reaches its
    siblings relatively and imports neither another part of the backend nor torch."""
    backend = re.search(r"^\s*(from|import) backend\b.*$", source, re.M)
    if backend:
        raise BuildError(f"{name}: {backend[0].strip()}: a wire module imports its siblings relatively and nothing else of the backend")
    if re.search(r"^\s*(import|from) torch\b", source, re.M):
        raise BuildError(f"{name}: imports torch; it cannot go into the add-on")


def stage(dest: Path, wheels: list[Path] | None = None, platforms: list[str] | None = None) -> Path:
    """Assemble the extension's source folder in ``dest`` (created, must not exist)."""
    dest.mkdir(parents=True)
    for p in addon_modules():
        shutil.copy2(p, dest / p.name)
    (dest / "wire").mkdir()
    for p in wire_modules():
        check_self_contained(p.read_text(), f"backend/wire/{p.name}")
        shutil.copy2(p, dest / "wire" / p.name)
    manifest = MANIFEST.read_text()
    if wheels:
        (dest / "wheels").mkdir()
        for w in wheels:
            shutil.copy2(w, dest / "wheels" / w.name)
        entries = ",\n".join(f'  "./wheels/{w.name}"' for w in wheels)
        plats = ", ".join(f'"{p}"' for p in (platforms or ["linux-x64"]))
        manifest = manifest.replace("\n[permissions]", f"\nplatforms = [{plats}]\nwheels = [\n{entries},\n]\n\n[permissions]", 1)
    (dest / "blender_manifest.toml").write_text(manifest)
    return dest


def download_wheels(dest: Path, platforms: list[str]) -> list[Path]:
    """pyzmq wheels for every (Python, platform); needs the package registry (build time only)."""
    dest.mkdir(parents=True, exist_ok=True)
    for plat in platforms:
        for py in PYTHONS:
            cmd = [sys.executable, "-m", "pip", "download", PYZMQ, "--dest", str(dest), "--only-binary=:all:", "--no-deps",
                   f"--python-version={py}", f"--platform={PLATFORMS[plat]}", "-q"]
            if subprocess.run(cmd).returncode != 0:
                raise BuildError(f"pip could not download {PYZMQ} for Python {py} on {plat}")
    return sorted(dest.glob("*.whl"))


def find_blender_ext() -> Path:
    try:
        import importlib.util

        spec = importlib.util.find_spec("bpy")
    except (ImportError, ValueError):
        spec = None
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for root in roots:
        for hit in root.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"):
            return hit
    raise BuildError("Blender's blender_ext.py not found: install the bpy module or pass --blender-ext")


def run_tool(tool: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"blender_ext.py {args[0]} failed:\n{r.stdout}{r.stderr}")
    return r.stdout


def build(out: Path, *, wheels: bool = False, platforms: list[str] | None = None, validate: bool = True, tool: Path | None = None) -> list[Path]:
    """Build (and validate) the extension into ``out``; returns the zip(s) written."""
    tool = tool or find_blender_ext()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spatialavatar-build-") as tmp:
        platforms = platforms or ["linux-x64"]
        wheel_files = download_wheels(Path(tmp) / "dl", platforms) if wheels else None
        src = stage(Path(tmp) / "spatialavatar", wheel_files, platforms)
        before = set(out.glob("*.zip"))
        args = ["build", "--source-dir", str(src), "--output-dir", str(out)]
        if wheels and len(platforms) > 1:
            args.append("--split-platforms")
        run_tool(tool, *args)
    zips = sorted(set(out.glob("*.zip")) - before) or sorted(out.glob("spatialavatar-*.zip"))
    if validate:
        for z in zips:
            run_tool(tool, "validate", str(z))
    return zips


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default dist/)")
    ap.add_argument("--wheels", action="store_true", help="bundle pyzmq wheels for Python 3.11 and 3.13 (downloads them)")
    ap.add_argument("--platform", action="append", choices=sorted(PLATFORMS), help="with --wheels: a platform (repeatable; default linux-x64)")
    ap.add_argument("--no-validate", action="store_true")
    ap.add_argument("--blender-ext", type=Path, help="path of Blender's blender_ext.py")
    a = ap.parse_args(argv)
    try:
        zips = build(a.out, wheels=a.wheels, platforms=a.platform, validate=not a.no_validate, tool=a.blender_ext)
    except BuildError as e:
        print(f"build.py: {e}", file=sys.stderr)
        return 2
    for z in zips:
        print(z)
    return 0


if __name__ == "__main__":
    sys.exit(main())
