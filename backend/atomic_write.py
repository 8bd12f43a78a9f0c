"""Files written whole or not at all."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL = ".partial"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A sibling of ``path`` to write into; moved onto ``path`` when the block ends, removed
    when it raises. A reader (or a run that resumes) never sees a half-written file, and a
    failed write leaves the earlier file as it was. Makes the parent folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + PARTIAL)
    try:
        yield scratch
        scratch.replace(path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
