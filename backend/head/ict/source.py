"""Reading an ICT-FaceKit snapshot: its OBJs, its part table and its expression list.

A snapshot is either a checkout of the repository (a folder holding ``FaceXModel/``) or a
bare git directory of it (files are read from its ``HEAD`` with ``git show``), so the build
runs on a clone without a work tree. All geometry here is in ICT's own frame: centimetres,
+y up, +z the direction the face looks.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend.wire.errors import InputError

MODEL_DIR = "FaceXModel"
NEUTRAL = "generic_neutral_mesh.obj"
CONFIG = "vertex_indices.json"
NUM_IDENTITIES = 100


@dataclass(frozen=True)
class IctPart:
    """One geometry of ICT's mesh: a contiguous range of vertices and of polygons."""

    name: str
    vertices: tuple[int, int]  # [start, stop)
    polygons: tuple[int, int]  # [start, stop)


# The part table of ICT-FaceKit's README (vertex and polygon ranges, stop exclusive).
PARTS = (
    IctPart("face", (0, 9409), (0, 9230)),
    IctPart("head_and_neck", (9409, 11248), (9230, 11144)),
    IctPart("mouth_socket", (11248, 13294), (11144, 13226)),
    IctPart("eye_socket_left", (13294, 13678), (13226, 13630)),
    IctPart("eye_socket_right", (13678, 14062), (13630, 14034)),
    IctPart("gums_and_tongue", (14062, 17039), (14034, 17006)),
    IctPart("teeth", (17039, 21451), (17006, 21496)),
    IctPart("eyeball_left", (21451, 23021), (21496, 23094)),
    IctPart("eyeball_right", (23021, 24591), (23094, 24692)),
    IctPart("lacrimal_fluid_left", (24591, 24795), (24692, 24855)),
    IctPart("lacrimal_fluid_right", (24795, 24999), (24855, 25018)),
    IctPart("eye_blend_left", (24999, 25023), (25018, 25033)),
    IctPart("eye_blend_right", (25023, 25047), (25033, 25048)),
    IctPart("eye_occlusion_left", (25047, 25199), (25048, 25176)),
    IctPart("eye_occlusion_right", (25199, 25351), (25176, 25304)),
    IctPart("eyelashes_left", (25351, 26035), (25304, 25844)),
    IctPart("eyelashes_right", (26035, 26719), (25844, 26384)),
)
NUM_VERTICES = 26719
NUM_POLYGONS = 26384

# The README's Multi-PIE 68 landmark vertices (iBUG order, 0-indexed, on the face part).
LANDMARK_VERTICES = (
    1225, 1888, 1052, 367, 1719, 1722, 2199, 1447, 966, 3661, 4390, 3927, 3924, 2608, 3272, 4088, 3443,
    268, 493, 1914, 2044, 1401, 3615, 4240, 4114, 2734, 2509, 978, 4527, 4942, 4857, 1140, 2075, 1147,
    4269, 3360, 1507, 1542, 1537, 1528, 1518, 1511, 3742, 3751, 3756, 3721, 3725, 3732, 5708, 5695, 2081,
    0, 4275, 6200, 6213, 6346, 6461, 5518, 5957, 5841, 5702, 5711, 5533, 6216, 6207, 6470, 5517, 5966,
)  # fmt: skip


@dataclass(frozen=True)
class IctMesh:
    """ICT's neutral mesh as read from its OBJ (ICT frame, centimetres).

    Attributes:
        vertices: [26719, 3] float64 positions.
        uv: [T, 2] float64 texture coordinates over several UV tiles (u in [k, k + 1]).
        polygons: list of vertex index tuples (triangles and quads), in file order.
        uv_polygons: the matching texture index tuples.
    """

    vertices: np.ndarray
    uv: np.ndarray
    polygons: list[tuple[int, ...]]
    uv_polygons: list[tuple[int, ...]]


class Snapshot:
    """Files of an ICT-FaceKit snapshot: a checkout folder or a bare git directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if (self.root / MODEL_DIR / NEUTRAL).is_file():
            self.bare = False
        elif (self.root / "HEAD").is_file() and (self.root / "objects").is_dir():
            self.bare = True
        else:
            raise InputError(f"{self.root} is neither an ICT-FaceKit checkout (with {MODEL_DIR}/{NEUTRAL}) nor a bare git directory of one")

    def read_text(self, path: str) -> str:
        """Text of ``path`` (relative to the repository root)."""
        if not self.bare:
            file = self.root / path
            if not file.is_file():
                raise InputError(f"the ICT-FaceKit snapshot {self.root} has no {path}")
            return file.read_text()
        done = subprocess.run(["git", f"--git-dir={self.root}", "show", f"HEAD:{path}"], capture_output=True, text=True)
        if done.returncode != 0:
            raise InputError(f"the ICT-FaceKit snapshot {self.root} has no {path} at HEAD")
        return done.stdout

    def expression_names(self) -> tuple[str, ...]:
        """The 53 expression names in the order of ICT's vertex_indices.json (ARKit spelling, _L/_R)."""
        return tuple(json.loads(self.read_text(f"{MODEL_DIR}/{CONFIG}"))["expressions"])

    def neutral(self) -> IctMesh:
        return _parse_obj(self.read_text(f"{MODEL_DIR}/{NEUTRAL}"), with_faces=True)

    def positions(self, stem: str) -> np.ndarray:
        """[26719, 3] float64 vertex positions of ``FaceXModel/{stem}.obj`` (centimetres)."""
        return _parse_obj(self.read_text(f"{MODEL_DIR}/{stem}.obj"), with_faces=False).vertices

    def license_text(self) -> str:
        return self.read_text("LICENSE")


def _parse_obj(text: str, with_faces: bool) -> IctMesh:
    lines = text.splitlines()
    v = np.array([ln.split()[1:4] for ln in lines if ln.startswith("v ")], np.float64)
    if v.shape != (NUM_VERTICES, 3):
        raise InputError(f"an ICT-FaceKit OBJ has {v.shape[0]} vertices, expected {NUM_VERTICES}")
    if not with_faces:
        return IctMesh(v, np.zeros((0, 2)), [], [])
    uv = np.array([ln.split()[1:3] for ln in lines if ln.startswith("vt ")], np.float64)
    polygons: list[tuple[int, ...]] = []
    uv_polygons: list[tuple[int, ...]] = []
    for ln in lines:
        if ln.startswith("f "):
            corners = [c.split("/") for c in ln.split()[1:]]
            polygons.append(tuple(int(c[0]) - 1 for c in corners))
            uv_polygons.append(tuple(int(c[1]) - 1 for c in corners))
    if len(polygons) != NUM_POLYGONS:
        raise InputError(f"the ICT-FaceKit neutral OBJ has {len(polygons)} polygons, expected {NUM_POLYGONS}")
    return IctMesh(v, uv, polygons, uv_polygons)
