"""Files written whole or not at all."""

from __future__ import annotations

import pytest

from backend.atomic_write import PARTIAL, atomic_path


def test_the_file_appears_only_when_the_block_ends(tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "sub" / "out.bin"
    with atomic_path(target) as scratch:
        scratch.write_bytes(b"new")
        assert not target.exists() and scratch.name == "out.bin" + PARTIAL
    assert target.read_bytes() == b"new" and not scratch.exists()


def test_a_failed_write_keeps_the_earlier_file_and_leaves_no_scratch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as scratch:
        scratch.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]
