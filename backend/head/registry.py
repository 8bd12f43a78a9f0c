"""Which head model to use: a real FLAME from a user path, the built-in head or the ICT head."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from backend.head.model import HeadModel, HeadModelData
from backend.wire.errors import HeadModelError

FLAME_ENV = "SPATIALAVATAR_FLAME"
BUILTIN = "builtin"
ICT = "ict"  # ICT-FaceKit in FLAME's layout, shipped in backend/head/ict/data
SHIPPED_HEADS = (BUILTIN, ICT)


def resolve_flame_path(flame: str | os.PathLike | None) -> str:
    """The explicit path, else $SPATIALAVATAR_FLAME, else "builtin"."""
    if flame:
        return str(flame)
    return os.environ.get(FLAME_ENV) or BUILTIN


# The code the built-in head is made by: its cached arrays are keyed on these files.
_BUILTIN_CODE = Path(__file__).parent / "builtin"


def _build_builtin() -> HeadModelData:
    # Imported only when the cache misses: the builder's package pulls in SciPy (0.4 s).
    from backend.head.builtin import build_builtin_head

    return build_builtin_head()


@lru_cache(maxsize=4)
def _load_data(source: str) -> HeadModelData:
    if source == BUILTIN:
        import backend.head.cache as cache
        import backend.head.model as model

        key = cache.code_key([*_BUILTIN_CODE.glob("*.py"), Path(model.__file__), Path(cache.__file__)])
        return cache.cached_head(BUILTIN, key, _build_builtin)
    if source == ICT:
        from backend.head.ict import load_ict_head

        return load_ict_head()
    from backend.head.flame_files import read_flame

    return read_flame(Path(source))


def load_head_data(flame: str | os.PathLike | None = None) -> HeadModelData:
    return _load_data(resolve_flame_path(flame))


def load_head_model(flame: str | os.PathLike | None = None) -> HeadModel:
    """A HeadModel on the CPU. ``flame``: a FLAME folder or file, "builtin", "ict", or None for the default."""
    return HeadModel(load_head_data(flame))


def fingerprint(data: HeadModelData) -> str:
    """Short hash of topology and template: an avatar only fits the model it was made on."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(data.faces, dtype=np.int64).tobytes())
    h.update(np.round(np.asarray(data.v_template, np.float64), 6).tobytes())
    return h.hexdigest()[:16]


def how_to_load(head_name: str) -> str:
    """The command-line option that loads the head model named ``head_name``."""
    from backend.head.builtin import NAME as BUILTIN_NAME
    from backend.head.ict import NAME as ICT_NAME

    shipped = {BUILTIN_NAME: BUILTIN, ICT_NAME: ICT}
    return f"--head {shipped[head_name]}" if head_name in shipped else f"--flame FLAME_PATH, the FLAME model '{head_name}' came from"


def check_fits(data: HeadModelData, head_name: str, head_fingerprint: str) -> None:
    """Raise HeadModelError if an avatar made on (head_name, head_fingerprint) does not fit ``data``."""
    if fingerprint(data) != head_fingerprint:
        raise HeadModelError(
            f"this avatar was made on head model '{head_name}' ({head_fingerprint}), but the loaded model is "
            f"'{data.name}' ({fingerprint(data)}); load the head it was made on ({how_to_load(head_name)})"
        )
