"""Reading and writing FLAME's own file layout.

A FLAME model folder, as smplx expects it, holds:

- the model pickle (``generic_model.pkl`` for FLAME 2020, ``flame2023.pkl`` for FLAME 2023,
  or ``FLAME_NEUTRAL.pkl``): v_template, f, shapedirs, posedirs, J_regressor, weights,
  kintree_table;
- ``flame_static_embedding.pkl``: the 51 inner iBUG landmarks (lmk_face_idx, lmk_b_coords);
- ``flame_dynamic_embedding.npy``: the 17 contour landmarks for 79 yaw bins;
- a UV layout: ``FLAME_texture.npz`` (vt, ft) from the FLAME texture space, or an .obj with
  ``vt`` and ``f v/vt`` lines such as ``head_template.obj``.

The official FLAME 2020 pickle stores some arrays as chumpy objects; they are read here
without chumpy (which no longer imports on current numpy) by taking the array each holds.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from backend.head.model import FLAME_SHAPE_SPACE, HeadModelData
from backend.head.uv_tiles import pack_uv_tiles
from backend.wire.errors import HeadModelError

FLAME_DOWNLOAD_HINT = (
    "FLAME is licensed separately and is not shipped with SpatialAvatar: register and download it "
    "from the FLAME project website (flame.is.tue.mpg.de), then pass the folder with --flame PATH or "
    "set SPATIALAVATAR_FLAME."
)
KNOWN_MODEL_NAMES = {"generic_model.pkl": "flame2020", "flame2023.pkl": "flame2023"}
MODEL_FILE_NAMES = ("FLAME_NEUTRAL.pkl", "generic_model.pkl", "flame2023.pkl", "FLAME_GENERIC.pkl")
STATIC_EMBEDDING = "flame_static_embedding.pkl"
DYNAMIC_EMBEDDING = "flame_dynamic_embedding.npy"
UV_FILE_NAMES = ("FLAME_texture.npz", "head_template.obj", "head_template_mesh.obj")
# Index of the frontal (zero-yaw) bin of the 79 contour bins in the dynamic embedding.
FRONTAL_CONTOUR_BIN = 39
NUM_FLAME_EXPR = 100


class _ChumpyArray:
    """Stands in for chumpy's classes while unpickling; keeps the state it is given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def to_array(self) -> np.ndarray:
        state = self.state
        if isinstance(state, dict):
            for key in ("x", "_x", "a"):
                if key in state:
                    return np.asarray(state[key])
        raise HeadModelError("a chumpy object in the FLAME pickle holds no array this reader knows")


class _FlameUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("chumpy"):
            return _ChumpyArray
        if module.startswith("scipy.sparse") or module.startswith("numpy") or module in ("builtins", "copy_reg", "__builtin__", "copyreg", "_codecs"):
            return super().find_class(module, name)
        raise HeadModelError(f"the FLAME pickle refers to '{module}.{name}', which a model file should not contain")


def _plain(value: Any) -> Any:
    if isinstance(value, _ChumpyArray):
        return value.to_array()
    if hasattr(value, "toarray"):  # scipy sparse J_regressor
        return value.toarray()
    return value


def _read_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = _FlameUnpickler(fh, encoding="latin1").load()
    except HeadModelError as exc:
        raise HeadModelError(f"{path}: {exc}") from None
    except Exception as exc:  # truncated or foreign files raise many kinds of errors
        raise HeadModelError(f"{path}: not a readable FLAME pickle ({type(exc).__name__}: {exc}). {FLAME_DOWNLOAD_HINT}") from exc
    if not isinstance(data, dict):
        raise HeadModelError(f"{path}: expected a dict of arrays, found {type(data).__name__}")
    return {k: _plain(v) for k, v in data.items()}


def _require(data: dict[str, Any], key: str, path: Path) -> np.ndarray:
    if key not in data:
        raise HeadModelError(f"{path}: missing '{key}'; is this a FLAME model file? {FLAME_DOWNLOAD_HINT}")
    return np.asarray(data[key])


def find_model_file(folder: Path) -> Path:
    for name in MODEL_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise HeadModelError(f"no FLAME model file in {folder} (looked for {', '.join(MODEL_FILE_NAMES)}). {FLAME_DOWNLOAD_HINT}")


def _read_obj_uv(path: Path, num_faces: int) -> tuple[np.ndarray, np.ndarray]:
    vt: list[list[float]] = []
    ft: list[list[int]] = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "vt":
            vt.append([float(parts[1]), float(parts[2])])
        elif parts[0] == "f":
            corners = [p.split("/") for p in parts[1:4]]
            if any(len(c) < 2 or not c[1] for c in corners):
                raise HeadModelError(f"{path}: face lines carry no texture indices (f v/vt ...)")
            ft.append([int(c[1]) - 1 for c in corners])
    if len(ft) != num_faces:
        raise HeadModelError(f"{path}: {len(ft)} faces, the model has {num_faces}")
    return np.asarray(vt, np.float32), np.asarray(ft, np.int64)


def _read_uv(folder: Path, num_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """(uv [T, 2] in [0, 1], uv_faces [F, 3]); a map over several UV tiles is packed into one."""
    for name in UV_FILE_NAMES:
        path = folder / name
        if not path.is_file():
            continue
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "vt" not in z.files or "ft" not in z.files:
                    raise HeadModelError(f"{path}: needs arrays 'vt' and 'ft'")
                return pack_uv_tiles(z["vt"].astype(np.float32), z["ft"].astype(np.int64))
        return pack_uv_tiles(*_read_obj_uv(path, num_faces))
    raise HeadModelError(
        f"no UV layout for the FLAME model in {folder}: put FLAME_texture.npz (from the FLAME texture "
        f"space download) or head_template.obj beside the model file."
    )


def _read_landmarks(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """68 iBUG landmarks: 17 contour points (frontal bin) followed by the 51 static ones."""
    static_path = folder / STATIC_EMBEDDING
    dynamic_path = folder / DYNAMIC_EMBEDDING
    if not static_path.is_file():
        raise HeadModelError(f"missing {static_path}; it ships with the FLAME landmark embeddings. {FLAME_DOWNLOAD_HINT}")
    if not dynamic_path.is_file():
        raise HeadModelError(
            f"missing {dynamic_path}: the contour landmarks (the 17 jaw-line points, per head yaw). Only the tracker's "
            f"fit uses them, but a head model carries all 68 iBUG landmarks, so it does not load without them: put "
            f"{DYNAMIC_EMBEDDING} from the FLAME landmark embeddings (it ships beside {STATIC_EMBEDDING}) into {folder}. "
            f"{FLAME_DOWNLOAD_HINT}"
        )
    static = _read_pickle(static_path)
    try:
        dynamic = np.load(dynamic_path, allow_pickle=True, encoding="latin1")[()]
    except Exception as exc:
        raise HeadModelError(f"{dynamic_path}: not a readable landmark embedding ({exc})") from exc
    s_faces = np.asarray(static["lmk_face_idx"], np.int64).reshape(-1)
    s_bary = np.asarray(static["lmk_b_coords"], np.float32).reshape(-1, 3)
    d_faces = np.asarray(dynamic["lmk_face_idx"], np.int64)[FRONTAL_CONTOUR_BIN]
    d_bary = np.asarray(dynamic["lmk_b_coords"], np.float32)[FRONTAL_CONTOUR_BIN]
    if s_faces.shape != (51,) or d_faces.shape != (17,):
        raise HeadModelError(f"landmark embeddings in {folder} have {s_faces.shape[0]} static and {d_faces.shape[0]} contour points, expected 51 and 17")
    return np.concatenate([d_faces, s_faces]), np.concatenate([d_bary, s_bary])


def read_flame(path: str | Path, n_shape: int = 100, n_expr: int = 50) -> HeadModelData:
    """Load a FLAME-format model from a folder (or the model file inside one).

    Raises HeadModelError naming the missing or malformed file and where FLAME is obtained.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise HeadModelError(f"FLAME path does not exist: {path}. {FLAME_DOWNLOAD_HINT}")
    model_file = path if path.is_file() else find_model_file(path)
    folder = model_file.parent
    data = _read_pickle(model_file)
    faces = _require(data, "f", model_file).astype(np.int64)
    shapedirs = _require(data, "shapedirs", model_file).astype(np.float32)
    total_expr = shapedirs.shape[-1] - FLAME_SHAPE_SPACE
    if total_expr <= 0:
        raise HeadModelError(f"{model_file}: shapedirs has {shapedirs.shape[-1]} components, expected 300 identity + expression")
    parents = _require(data, "kintree_table", model_file)[0].astype(np.int64)
    parents[0] = -1
    uv_coords, uv_faces = _read_uv(folder, faces.shape[0])
    lmk_faces, lmk_bary = _read_landmarks(folder)
    expr_names = tuple(str(n) for n in data.get("expr_names", ()))
    part_masks = {k[len("part_mask_"):]: np.asarray(v, bool) for k, v in data.items() if k.startswith("part_mask_")}
    head = HeadModelData(
        name=str(data.get("model_name", KNOWN_MODEL_NAMES.get(model_file.name, model_file.stem))),
        v_template=_require(data, "v_template", model_file).astype(np.float32),
        faces=faces,
        shapedirs=shapedirs,
        posedirs=_require(data, "posedirs", model_file).astype(np.float32),
        j_regressor=_require(data, "J_regressor", model_file).astype(np.float32),
        weights=_require(data, "weights", model_file).astype(np.float32),
        parents=parents,
        uv_coords=uv_coords,
        uv_faces=uv_faces,
        lmk_faces=lmk_faces,
        lmk_bary=lmk_bary,
        n_shape=min(n_shape, FLAME_SHAPE_SPACE),
        n_expr=min(n_expr, total_expr),
        expr_names=expr_names,
        part_masks=part_masks,
    )
    try:
        head.validate()
    except Exception as exc:
        raise HeadModelError(f"{model_file}: {exc}") from exc
    return head


def write_flame(head: HeadModelData, folder: str | Path) -> Path:
    """Write ``head`` in FLAME's layout (plain numpy, no chumpy) so smplx.FLAME loads it.

    Files: FLAME_NEUTRAL.pkl, flame_static_embedding.pkl, flame_dynamic_embedding.npy and
    FLAME_texture.npz. Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kintree = np.stack([head.parents, np.arange(head.num_joints)]).astype(np.int64)
    kintree[0, 0] = 4294967295  # FLAME's own files mark the root's parent this way
    model = {
        "model_name": head.name,
        "v_template": head.v_template.astype(np.float64),
        "f": head.faces.astype(np.uint32),
        "shapedirs": head.shapedirs.astype(np.float64),
        "posedirs": head.posedirs.astype(np.float64),
        "J_regressor": head.j_regressor.astype(np.float64),
        "weights": head.weights.astype(np.float64),
        "kintree_table": kintree,
        "bs_type": "lrotmin",
        "bs_style": "lbs",
        "expr_names": list(head.expr_names),
        **{f"part_mask_{k}": v for k, v in head.part_masks.items()},
    }
    with open(folder / "FLAME_NEUTRAL.pkl", "wb") as fh:
        pickle.dump(model, fh, protocol=2)
    with open(folder / STATIC_EMBEDDING, "wb") as fh:
        pickle.dump({"lmk_face_idx": head.lmk_faces[17:].astype(np.int64), "lmk_b_coords": head.lmk_bary[17:].astype(np.float64)}, fh, protocol=2)
    bins = 2 * FRONTAL_CONTOUR_BIN + 1
    dynamic = {
        "lmk_face_idx": np.repeat(head.lmk_faces[None, :17], bins, axis=0).astype(np.int64),
        "lmk_b_coords": np.repeat(head.lmk_bary[None, :17], bins, axis=0).astype(np.float64),
    }
    np.save(folder / DYNAMIC_EMBEDDING, np.array(dynamic, dtype=object), allow_pickle=True)
    np.savez(folder / "FLAME_texture.npz", vt=head.uv_coords.astype(np.float32), ft=head.uv_faces.astype(np.int64))
    return folder
