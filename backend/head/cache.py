"""An on-disk cache of head models that are built by code rather than read from files.

The built-in head takes about 2.5 s of CPU to build, in every process that uses it: most of a
cold ``generate``. Built once, its arrays are written under the user's cache folder and read
back in tens of milliseconds. The file's name carries a hash of the code that builds it (and
of NumPy's version), so a change to that code makes a new file rather than reading a stale
one, and writing it removes the files of that head under other keys (about 51 MB each for
the built-in head). A cache that cannot be read or written is rebuilt or skipped, never an
error: it only ever saves time.

Folder: ``$SPATIALAVATAR_CACHE``, else ``$XDG_CACHE_HOME/spatialavatar``, else
``~/.cache/spatialavatar``; the heads go in its ``heads/`` subfolder.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from backend.head.model import HeadModelData

CACHE_ENV = "SPATIALAVATAR_CACHE"
_ARRAYS = ("v_template", "faces", "shapedirs", "posedirs", "j_regressor", "weights", "parents", "uv_coords", "uv_faces", "lmk_faces", "lmk_bary")
_MASK = "mask:"


def cache_folder() -> Path:
    """Where built heads are kept (see the module doc)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spatialavatar"


def code_key(files: Iterable[Path]) -> str:
    """16 hex digits of a hash over ``files``' bytes (sorted by name) and NumPy's version."""
    h = hashlib.sha256(np.__version__.encode())
    for path in sorted(files):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cached_head(name: str, key: str, build: Callable[[], HeadModelData]) -> HeadModelData:
    """The head ``build()`` makes, read from ``<cache>/heads/<name>-<key>.npz`` when that exists
    and is whole, else built and written there (atomically, so concurrent processes never read
    half a file; each writer has a scratch file of its own)."""
    path = cache_folder() / "heads" / f"{name}-{key}.npz"
    try:
        return read_head_file(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # not there yet, or damaged: build it again
    data = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(dir=path.parent, suffix=".part")
    except OSError:
        return data
    try:
        with os.fdopen(fd, "wb") as f:
            write_head_file(f, data)
        os.replace(part, path)
    except OSError:
        Path(part).unlink(missing_ok=True)
        return data
    # Files of the same head under other keys were made by code that has changed since.
    for old in path.parent.glob(f"{name}-*.npz"):
        if old != path:
            old.unlink(missing_ok=True)
    return data


def write_head_file(file, data: HeadModelData) -> None:  # type: ignore[no-untyped-def]
    """Every field of ``data`` into one uncompressed .npz (a path or an open binary file);
    ``write_flame``'s files would not round-trip ``n_shape`` and ``n_expr``, nor be one file."""
    arrays: dict[str, np.ndarray] = {k: getattr(data, k) for k in _ARRAYS}
    arrays |= {f"{_MASK}{n}": m for n, m in data.part_masks.items()}
    arrays |= {"name": np.array(data.name), "n_shape": np.array(data.n_shape), "n_expr": np.array(data.n_expr), "expr_names": np.array(data.expr_names, dtype=str)}
    np.savez(file, **arrays)


def read_head_file(path: Path) -> HeadModelData:
    """A head written by ``write_head_file``, exactly as it was."""
    with np.load(path, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    data = HeadModelData(
        name=str(a["name"]),
        **{k: a[k] for k in _ARRAYS},
        n_shape=int(a["n_shape"]),
        n_expr=int(a["n_expr"]),
        expr_names=tuple(str(n) for n in a["expr_names"]),
        part_masks={k[len(_MASK) :]: v for k, v in a.items() if k.startswith(_MASK)},
    )
    data.validate()
    return data
