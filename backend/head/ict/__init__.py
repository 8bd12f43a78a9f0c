"""The ICT head ("ict-facekit-v1"): ICT-FaceKit's morphable face model in FLAME's layout.

ICT-FaceKit (github.com/ICT-VGL/ICT-FaceKit, MIT license, USC Institute for Creative
Technologies) is a scan-based head: 100 identity PCA modes and 53 ARKit-named expression
blendshapes over one topology. ``build.py`` turns a snapshot of it into FLAME's arrays
once; the result ships in ``data/`` and is read here. See docs/head.md.

``data/ict_head.npz`` holds (V vertices, F triangles, T UVs):

- ``v_template`` [V, 3] float32 metres, FLAME frame; ``faces`` [F, 3] int32;
- ``uv_coords`` [T, 2] float32 over several UV tiles as ICT has them, ``uv_faces`` [F, 3]
  int32 (packed into one square on load, as for any multi-tile FLAME-format model);
- ``identity`` [100, V, 3] and ``expression`` [53, V, 3] int16: each blendshape's per-vertex
  displacement in steps of ``DELTA_STEP_M``, stored as differences between consecutive
  vertices (they deflate far better than the values);
- ``expr_names`` [53] str; ``j_regressor`` [5, V], ``weights`` [V, 5] float32; ``parents`` [5] int32;
- ``lmk_faces`` [68] int32, ``lmk_bary`` [68, 3] float32; ``mask_names`` [M] str, ``masks`` [M, V] bool.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from backend.head.model import FLAME_SHAPE_SPACE, HeadModelData
from backend.head.uv_tiles import pack_uv_tiles
from backend.wire.errors import HeadModelError

NAME = "ict-facekit-v1"
DATA_DIR = Path(__file__).parent / "data"
ARRAYS_FILE = "ict_head.npz"
CHECKSUMS_FILE = "ict_head.json"
LICENSE_FILE = "LICENSE-ICT-FaceKit.txt"
# Blendshape displacements are stored in 0.01 mm steps: at most 0.005 mm off per unit
# coefficient, no more than float16 loses on these values (numbers in ict_head.json).
DELTA_STEP_M = 1e-5


def decode_deltas(encoded: np.ndarray) -> np.ndarray:
    """[K, V, 3] int16 vertex-to-vertex differences in DELTA_STEP_M steps -> [K, V, 3] float32 metres."""
    return (np.cumsum(encoded, axis=1, dtype=np.int32) * DELTA_STEP_M).astype(np.float32)


def read_ict_head(folder: str | Path = DATA_DIR) -> HeadModelData:
    """The ICT head from ``folder``'s ict_head.npz (built by ``python -m backend.head.ict.build``)."""
    path = Path(folder) / ARRAYS_FILE
    if not path.is_file():
        raise HeadModelError(f"the ICT head's arrays are missing ({path}); rebuild them with python -m backend.head.ict.build")
    with np.load(path, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    identity, expression = decode_deltas(a["identity"]), decode_deltas(a["expression"])
    v = a["v_template"].shape[0]
    shapedirs = np.zeros((v, 3, FLAME_SHAPE_SPACE + len(expression)), np.float32)
    shapedirs[..., : len(identity)] = identity.transpose(1, 2, 0)
    shapedirs[..., FLAME_SHAPE_SPACE:] = expression.transpose(1, 2, 0)
    uv_coords, uv_faces = pack_uv_tiles(a["uv_coords"], a["uv_faces"].astype(np.int64))
    j = a["parents"].shape[0]
    head = HeadModelData(
        name=NAME,
        v_template=a["v_template"],
        faces=a["faces"].astype(np.int64),
        shapedirs=shapedirs,
        posedirs=np.zeros((v, 3, (j - 1) * 9), np.float32),
        j_regressor=a["j_regressor"],
        weights=a["weights"],
        parents=a["parents"].astype(np.int64),
        uv_coords=uv_coords,
        uv_faces=uv_faces,
        lmk_faces=a["lmk_faces"].astype(np.int64),
        lmk_bary=a["lmk_bary"],
        n_shape=len(identity),
        n_expr=len(expression),
        expr_names=tuple(str(n) for n in a["expr_names"]),
        part_masks={str(n): m for n, m in zip(a["mask_names"], a["masks"])},
    )
    head.validate()
    return head


@lru_cache(maxsize=1)
def load_ict_head() -> HeadModelData:
    """The shipped ICT head, read once per process (treat the arrays as read-only)."""
    return read_ict_head(DATA_DIR)
