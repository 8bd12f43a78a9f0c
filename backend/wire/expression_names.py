"""The expression names a ``flame_param.npz`` stores (``expr_names``), and the check that a
file's channels mean what the head model in use calls them.

Numpy only, in ``backend/wire``: the Blender add-on carries this module, so the backend and
the add-on read, write and check the names the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import InputError

KEY = "expr_names"  # the array in flame_param.npz: [k] strings, k <= E, the head's names of expr[:, :k]


def to_array(names: Sequence[str]) -> np.ndarray:
    """[k] unicode strings, as ``np.savez`` stores them without pickling."""
    return np.asarray([str(n) for n in names], dtype=np.str_)


def from_arrays(arrays: Mapping[str, np.ndarray], width: int, source: str) -> tuple[str, ...]:
    """The names stored beside an ``expr`` of ``width`` columns; () for files without them
    (older files, and those made for a head whose expressions have no names)."""
    stored = arrays.get(KEY)
    if stored is None:
        return ()
    stored = np.asarray(stored)
    if stored.ndim != 1 or stored.dtype.kind != "U":
        raise InputError(f"{source}: '{KEY}' must be a list of strings [k], got {stored.dtype} {list(stored.shape)}")
    if len(stored) > width:
        raise InputError(f"{source}: '{KEY}' names {len(stored)} expressions, 'expr' has {width} columns")
    return tuple(str(n) for n in stored)


def check(stored: Sequence[str], head_names: Sequence[str], head: str, source: str) -> None:
    """InputError unless every stored name is the head's name of the same component.

    ``head``: how the message calls the head (e.g. "head model 'ict-facekit-v1'"). Nothing
    stored is nothing to check: such files load as they always did.
    """
    for i, name in enumerate(stored):
        have = head_names[i] if i < len(head_names) else ""
        if name != have:
            theirs = f"'{have}'" if have else "no name"
            raise InputError(
                f"{source}: expression {i} is '{name}' there but {theirs} in {head}; the file was made for another head, "
                "so its channels would drive the wrong expressions (make it again for this head)"
            )
