"""Reply buffers through shared memory, for a client on the service's own machine.

Moving a 512 x 512 float RGBA + depth frame (5 MiB) through loopback TCP costs more than the
rest of a render request's overhead together. A client on the same machine can ask for a
render's buffers ``shared_memory``: the service then writes them into a *slot*, a file in a
private folder of the shared-memory file system that both sides map, and the reply's header
names the slot (``"shared": {"path", "generation", "offsets"}``) instead of carrying the bytes.
The client reads the buffers in place and marks the slot free, for the service to reuse,
once it lets go of them. A render can also be copied off the device straight into a slot
(``SlotPool.reserve``), so the frame is never copied on the host at all. Pure Python + numpy:
the add-on's client uses it too.

A slot file is a 64-byte header, then the buffers::

    magic "SAFRAME1" | generation (u64) | state (u64: 0 free, 1 holds a reply) | ...

The service rewrites only free slots. A client that vanishes leaves its slot full; after
``lease_s`` the service unlinks that file and makes a new one, so a client that still maps
it keeps its data. The folder is named after the service's process id, so a service that
starts removes the folders of services that were killed before they could. When every slot
is busy, or a reply is too large, the reply travels inline as usual.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import struct
import tempfile
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"SAFRAME1"
HEADER_BYTES = 64  # buffers start here; 64-byte aligned like every offset below
_HEAD = struct.Struct("<8sQQ")
_FREE, _FULL = 0, 1
_ALIGN = 64
_SLOT_NAME = re.compile(r"slot-[0-9]{1,9}")
_DIR_PREFIX = "spatialavatar-frames-"

Buffer = bytes | bytearray | memoryview


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Aligned offsets of buffers of ``sizes`` bytes in a slot, and the bytes they need past its header."""
    offsets, end = [], HEADER_BYTES
    for n in sizes:
        offsets.append(end)
        end = _aligned(end + n)
    return offsets, end - HEADER_BYTES


def _address(buffer: Buffer) -> int:
    return np.frombuffer(buffer, np.uint8).__array_interface__["data"][0]  # a few times cheaper than .ctypes


def _shm_root() -> str | None:
    """The memory-backed file system where there is one (Linux), else the temp folder."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _remove_orphans(root: Path) -> None:
    """Remove the slot folders of services that died without closing them (kill -9): shared
    memory would otherwise stay taken until the machine restarts."""
    if os.name != "posix":  # os.kill(pid, 0) terminates the process on Windows
        return
    for folder in root.glob(f"{_DIR_PREFIX}*-*"):
        pid = folder.name[len(_DIR_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or folder.stat().st_uid != os.getuid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


class _Slot:
    def __init__(self, path: Path, capacity: int) -> None:
        self.path = path
        self.capacity = capacity
        with open(path, "w+b") as f:
            f.truncate(HEADER_BYTES + capacity)
            self.map = mmap.mmap(f.fileno(), HEADER_BYTES + capacity)
        self.generation = 0
        self.written = 0.0
        _HEAD.pack_into(self.map, 0, MAGIC, 0, _FREE)

    @property
    def free(self) -> bool:
        return _HEAD.unpack_from(self.map, 0)[2] == _FREE

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # arrays made in it are still alive: it unmaps when they go
            pass
        try:
            self.path.unlink(missing_ok=True)
        except OSError:  # Windows keeps a file that a client still maps
            pass


class SlotPool:
    """The service's slots: at most ``max_slots`` files of up to ``max_bytes`` of buffers each.

    One thread (the device worker) calls ``reserve`` and ``put``.
    """

    def __init__(self, max_slots: int = 8, max_bytes: int = 256 << 20, lease_s: float = 30.0) -> None:
        self.max_slots = max_slots
        self.max_bytes = max_bytes
        self.lease_s = lease_s
        root = _shm_root()
        _remove_orphans(Path(root or tempfile.gettempdir()))
        self.folder = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-", dir=root))  # mode 0700
        self._slots: list[_Slot] = []
        self._made = 0
        self._reserved: _Slot | None = None  # lent by reserve() to the next put()

    def reserve(self, sizes: Sequence[int]) -> list[np.ndarray] | None:
        """Writable byte arrays [sizes[i]] in a free slot, to make a reply's buffers in; when
        the next ``put`` gets buffers that lie in them, it copies nothing. None when no slot
        is free: make them elsewhere. An unused reservation lapses at the next call."""
        self._reserved = None
        offsets, need = _layout(sizes)
        if not sizes or need > self.max_bytes:
            return None
        slot = self._take(need)
        if slot is None:
            return None
        self._reserved = slot
        whole = np.frombuffer(slot.map, np.uint8)
        return [whole[o : o + n] for o, n in zip(offsets, sizes)]

    def put(self, buffers: Sequence[Buffer]) -> dict[str, Any] | None:
        """Publish a reply's buffers (their wire bytes) in a slot: in place when they were made
        in the one ``reserve`` lent, else copied into a free one. The reply header's ``shared``
        entry, or None when the reply should travel inline."""
        views = [memoryview(b).cast("B") for b in buffers]
        reserved, self._reserved = self._reserved, None
        if reserved is not None and views:
            base = _address(reserved.map)
            offsets = [_address(v) - base for v in views]
            end = HEADER_BYTES + reserved.capacity
            if all(HEADER_BYTES <= o and o + v.nbytes <= end for o, v in zip(offsets, views)):
                return self._publish(reserved, offsets)
        offsets, need = _layout([v.nbytes for v in views])
        if not views or need > self.max_bytes:
            return None
        slot = self._take(need)
        if slot is None:
            return None
        for off, v in zip(offsets, views):
            slot.map[off : off + v.nbytes] = v
        return self._publish(slot, offsets)

    def _publish(self, slot: _Slot, offsets: list[int]) -> dict[str, Any]:
        slot.generation += 1
        slot.written = time.monotonic()
        _HEAD.pack_into(slot.map, 0, MAGIC, slot.generation, _FULL)
        return {"path": str(slot.path), "generation": slot.generation, "offsets": offsets}

    def _take(self, need: int) -> _Slot | None:
        free = [s for s in self._slots if s.free]
        fitting = [s for s in free if s.capacity >= need]
        if fitting:
            return min(fitting, key=lambda s: s.capacity)
        if len(self._slots) >= self.max_slots:
            stale = [s for s in self._slots if not s.free and time.monotonic() - s.written > self.lease_s]
            victims = free or stale
            if not victims:
                return None
            self._slots.remove(victims[0])
            victims[0].close()
        slot = _Slot(self.folder / f"slot-{self._made}", max(need, 1 << 20))
        self._made += 1
        self._slots.append(slot)
        return slot

    def close(self) -> None:
        self._reserved = None
        for slot in self._slots:
            slot.close()
        self._slots.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


class SharedReadError(Exception):
    """A reply's slot could not be read (the protocol turns it into a WireError)."""


class SlotReader:
    """The client's side: maps the slots replies name (a few kept open) and hands out views.

    The slot is marked free when the last view of its reply is gone. The service never
    rewrites a slot that is not free (a stale one it unlinks and replaces), so a view stays
    valid for as long as it is held.
    """

    def __init__(self, keep: int = 16) -> None:
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._keep = keep
        self._held: dict[tuple[str, int], int] = {}  # (slot, generation) -> views handed out

    def read(self, shared: Any, sizes: Sequence[int]) -> list[np.ndarray]:
        """Read-only byte views [sizes[i]] of the buffers a reply's ``shared`` entry names.
        Raises SharedReadError."""
        if not isinstance(shared, dict) or set(shared) != {"path", "generation", "offsets"}:
            raise SharedReadError("'shared' must be an object with exactly 'path', 'generation' and 'offsets'")
        path, generation, offsets = shared["path"], shared["generation"], shared["offsets"]
        if not isinstance(path, str) or (path not in self._maps and not _is_slot_path(path)):  # a mapped path was checked before
            raise SharedReadError("'shared.path' does not name a frame slot")
        if type(generation) is not int or not isinstance(offsets, list) or len(offsets) != len(sizes):
            raise SharedReadError("'shared' needs an integer generation and one offset per buffer")
        m = self._map(path)
        if not all(type(o) is int and HEADER_BYTES <= o and o + n <= len(m) for o, n in zip(offsets, sizes)):
            raise SharedReadError("a buffer lies outside its slot")
        magic, gen, _ = _HEAD.unpack_from(m, 0)
        if magic != MAGIC or gen != generation:
            raise SharedReadError(f"the slot holds another reply (generation {gen}, not {generation}): it was read too late")
        whole = np.frombuffer(m, np.uint8)
        whole.flags.writeable = False
        key = (path, generation)
        self._held[key] = self._held.get(key, 0) + 1  # one reply may be decoded more than once
        weakref.finalize(whole, self._release, key, m)
        return [whole[o : o + n] for o, n in zip(offsets, sizes)]

    def _release(self, key: tuple[str, int], m: mmap.mmap) -> None:
        """Mark a slot free once the last view of its reply is gone (if it still holds it)."""
        self._held[key] -= 1
        if self._held[key] > 0:
            return
        del self._held[key]
        if not m.closed and _HEAD.unpack_from(m, 0)[:2] == (MAGIC, key[1]):
            _HEAD.pack_into(m, 0, MAGIC, key[1], _FREE)

    def _map(self, path: str) -> mmap.mmap:
        m = self._maps.pop(path, None)
        if m is None:
            try:
                with open(path, "r+b") as f:
                    m = mmap.mmap(f.fileno(), 0)
            except (OSError, ValueError) as exc:
                raise SharedReadError(f"cannot map {path} ({exc}); a client on another machine must not ask for shared_memory") from None
        self._maps[path] = m  # most recent last
        while len(self._maps) > self._keep:
            _close(self._maps.popitem(last=False)[1])
        return m

    def close(self) -> None:
        for m in self._maps.values():
            _close(m)
        self._maps.clear()


def _is_slot_path(path: str) -> bool:
    folder, name = os.path.split(path)
    return bool(_SLOT_NAME.fullmatch(name)) and os.path.basename(folder).startswith(_DIR_PREFIX)


def _close(m: mmap.mmap) -> None:
    try:
        m.close()
    except BufferError:  # views of it are still held: it unmaps when the last one goes
        pass
