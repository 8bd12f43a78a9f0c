"""Build the SpatialAvatar extension zip (run from anywhere; needs only Python, no Blender).

    python blender_addon/build.py [--out DIR] [--wheels] [--platform TAG ...] [--no-validate]

Steps:
1. stage: copy the add-on modules (blender_addon/*.py but this file) to the staging root,
   the torch-free backend modules it shares (WIRE_FILES: the wire modules of backend/server,
   backend/errors.py, the camera conversion, the expression names of flame_param.npz and
   the ARKit CSV reader) to ``wire/``, with their ``backend.*`` imports made relative, and
   the repository's blender_manifest.toml; git holds one copy of each;
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
# The backend modules the add-on carries: (source, name in wire/). They import numpy and
# pyzmq, never torch.
WIRE_FILES = (
    ("backend/server/protocol.py", "protocol.py"),
    ("backend/server/client.py", "client.py"),
    ("backend/server/shared_frames.py", "shared_frames.py"),
    ("backend/server/windows.py", "windows.py"),
    ("backend/server/args.py", "args.py"),
    ("backend/server/security.py", "security.py"),
    ("backend/errors.py", "errors.py"),
    ("backend/render/blender_camera_math.py", "blender_camera_math.py"),  # the one Blender camera conversion
    ("backend/head/expression_names.py", "expression_names.py"),  # flame_param.npz's expr_names and their check
    ("backend/head/arkit_csv.py", "arkit_csv.py"),  # Live Link Face CSVs onto FLAME channels
)
PYZMQ = "pyzmq==26.4.0"  # 27.x ships cp312-abi3 wheels, which Blender reads as "3.12 only"
PYTHONS = ("3.11", "3.13")
PLATFORMS = {  # Blender platform -> pip platform tag
    "linux-x64": "manylinux_2_28_x86_64",
    "windows-x64": "win_amd64",
    "macos-arm64": "macosx_11_0_arm64",
    "macos-x64": "macosx_10_15_x86_64",
}
# ``backend.a.b`` -> its name in wire/, for the modules carried there.
WIRE_MODULES = {src.removesuffix(".py").replace("/", "."): name.removesuffix(".py") for src, name in WIRE_FILES}
_IMPORT = re.compile(r"^(\s*from )(backend(?:\.\w+)+)( import .*)$", re.M)


class BuildError(RuntimeError):
    pass


def addon_modules() -> list[Path]:
    return sorted(p for p in ADDON.glob("*.py") if p.name != "build.py")


def relative_imports(source: str, name: str) -> str:
    """``from backend.server.x import y`` / ``from backend.errors import y`` -> ``from .x import y``
    for the modules in WIRE_FILES; any other backend import is an error."""
    out = _IMPORT.sub(lambda m: f"{m[1]}.{WIRE_MODULES[m[2]]}{m[3]}" if m[2] in WIRE_MODULES else m[0], source)
    leftover = [line for line in out.splitlines() if re.match(r"\s*(from|import) backend\b", line)]
    if leftover:
        raise BuildError(f"{name}: imports the backend in a way the build cannot make relative: {leftover[0].strip()}")
    if re.search(r"^\s*(import|from) torch\b", out, re.M):
        raise BuildError(f"{name}: imports torch; it cannot go into the add-on")
    return out


def manifest_paths(text: str) -> list[str]:
    m = re.search(r"^\[build\]\s*\npaths\s*=\s*\[(.*?)\]", text, re.M | re.S)
    if not m:
        raise BuildError("blender_manifest.toml: no [build] paths list")
    return re.findall(r'"([^"]+)"', m.group(1))


def stage(dest: Path, wheels: list[Path] | None = None, platforms: list[str] | None = None) -> Path:
    """Assemble the extension's source folder in ``dest`` (created, must not exist)."""
    dest.mkdir(parents=True)
    manifest = MANIFEST.read_text()
    listed = set(manifest_paths(manifest))
    for p in addon_modules():
        if p.name not in listed:
            raise BuildError(f"blender_addon/{p.name} is not listed in blender_manifest.toml [build] paths")
        shutil.copy2(p, dest / p.name)
    wire = dest / "wire"
    wire.mkdir()
    (wire / "__init__.py").write_text('"""The service\'s wire modules, copied from backend/ when the extension is built."""\n')
    for src, name in WIRE_FILES:
        (wire / name).write_text(relative_imports((ROOT / src).read_text(), src))
    missing = sorted({f"wire/{p.name}" for p in wire.glob("*.py")} - listed)
    if missing:
        raise BuildError(f"blender_manifest.toml [build] paths lacks {', '.join(missing)}")
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
