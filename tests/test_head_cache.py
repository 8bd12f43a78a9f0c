"""Built heads kept on disk: read back exactly, keyed on the code that builds them, never an error."""

from __future__ import annotations

import numpy as np
import pytest

from backend.head.builtin import build_builtin_head
from backend.head.cache import CACHE_ENV, cached_head, code_key
from backend.head.model import HeadModelData
from backend.head.registry import fingerprint


def _never() -> HeadModelData:
    raise AssertionError("built again although the cache holds it")


def _same(a: HeadModelData, b: HeadModelData) -> None:
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, np.ndarray):
            assert value.dtype == other.dtype and np.array_equal(value, other), name
        elif isinstance(value, dict):
            assert value.keys() == other.keys() and all(np.array_equal(value[k], other[k]) for k in value), name
        else:
            assert value == other, name


def test_a_built_head_is_read_back_exactly_and_a_code_change_builds_anew(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    built = build_builtin_head()
    first = cached_head("builtin", "k1", build_builtin_head)
    assert first is built and len(list((tmp_path / "heads").glob("builtin-k1.npz"))) == 1
    again = cached_head("builtin", "k1", _never)
    _same(built, again)
    assert fingerprint(again) == fingerprint(built)
    # Another key (the building code changed) does not read the old file, and the new file
    # replaces it; other heads' files stay.
    with pytest.raises(AssertionError, match="built again"):
        cached_head("builtin", "k2", _never)
    assert sorted(p.name for p in (tmp_path / "heads").iterdir()) == ["builtin-k1.npz"]
    (tmp_path / "heads" / "other-k1.npz").write_bytes(b"another head's file")
    cached_head("builtin", "k2", build_builtin_head)
    assert sorted(p.name for p in (tmp_path / "heads").iterdir()) == ["builtin-k2.npz", "other-k1.npz"]


def test_a_damaged_or_unwritable_cache_only_costs_a_build(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    built = build_builtin_head()
    cached_head("builtin", "k", build_builtin_head)
    path = tmp_path / "heads" / "builtin-k.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert cached_head("builtin", "k", build_builtin_head) is built  # rebuilt, and written whole again
    _same(built, cached_head("builtin", "k", _never))
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv(CACHE_ENV, str(blocked))
    assert cached_head("builtin", "k", build_builtin_head) is built
    assert blocked.read_text().startswith("a file")


def test_the_key_follows_the_codes_bytes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    key = code_key([a, b])
    assert code_key([b, a]) == key
    b.write_text("y = 3\n")
    assert code_key([a, b]) != key
