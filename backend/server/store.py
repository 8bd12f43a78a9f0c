"""The service's store on disk: avatars, subjects and job records under one folder.

Layout::

    STORE/avatars/av_<16 hex>.npz    the avatar (backend.gaussians.files format)
    STORE/avatars/av_<16 hex>.json   its summary (name, counts, head model, times, source)
    STORE/subjects/sb_<16 hex>/      a subject folder (backend.data.subject format)
    STORE/jobs/jb_<16 hex>.json      a job record (see jobs.py)
    STORE/jobs/jb_<16 hex>.ckpt      its resumable state, for jobs that keep one (written as .ckpt.partial
                                     first; one a crash left behind is removed at start-up)
    STORE/inputs/<id>/inputN.<ext>   uploads (portraits, video) of the job that will make <id>, kept
                                     while a run of that job may still read them
    STORE/tmp/                       scratch for imports, exports and subjects being written

Ids are made here (a kind prefix and 16 random hex digits) and every id a client sends is
checked against that pattern before it comes near a path, so no request can name a file
outside the store. Files are written to scratch first, flushed, then renamed into place: a
crash leaves either the old file or the new one. The .json summary follows its .npz and is
rebuilt from it at start-up when missing. One service uses a store at a time (STORE/.lock).

The store serves only what lies inside it. A symlink among avatars, subjects or job
records could point anywhere, and ids never resolve through one, so such an entry is
skipped at start-up with one warning and never listed; the store's own folders must not be
symlinks at all.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backend.atomic_write import PARTIAL  # RefineState.save writes <checkpoint>.partial, then renames it into place
from backend.gaussians.avatar import Avatar
from backend.gaussians.files import load_avatar, save_avatar
from backend.wire.errors import InputError
from backend.wire.protocol import ErrorCode, WireError

log = logging.getLogger("spatialavatar.server")

ID = re.compile(r"(av|sb|jb)_[0-9a-f]{16}")
KIND_NAMES = {"av": "avatar", "sb": "subject", "jb": "job"}


@dataclass(frozen=True)
class AvatarInfo:
    """What ``list`` and ``get`` report about a stored avatar."""

    id: str
    name: str
    gaussians: int
    sh_degree: int
    head_name: str
    head_fingerprint: str
    source: str
    created: float
    updated: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_id(value: Any, prefix: str, field: str = "id") -> str:
    """``value`` when it is a well-formed id of kind ``prefix`` ("av", "sb", "jb"); else invalid_argument."""
    if not isinstance(value, str) or not ID.fullmatch(value) or not value.startswith(prefix + "_"):
        kind = KIND_NAMES[prefix]
        raise WireError(ErrorCode.INVALID_ARGUMENT, f"'{field}' must be {'an' if kind[0] in 'aeiou' else 'a'} {kind} id like {prefix}_0123456789abcdef")
    return value


def _fsync_replace(src: Path, dst: Path) -> None:
    with open(src, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(src, dst)
    dir_fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Store:
    """Avatars, subjects and job records under ``root``; safe to use from several threads."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.avatars_dir, self.subjects_dir, self.jobs_dir, self.inputs_dir, self.tmp_dir = folders = tuple(
            self.root / d for d in ("avatars", "subjects", "jobs", "inputs", "tmp")
        )
        for d in folders:
            if d.is_symlink():
                raise InputError(f"{d} is a symlink; the store's folders must be real folders inside {self.root}")
        for d in (self.avatars_dir, self.subjects_dir, self.jobs_dir, self.inputs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise InputError(f"store {self.root} is in use by another running service") from None
        shutil.rmtree(self.tmp_dir, ignore_errors=True)  # leftovers of a crash
        self.tmp_dir.mkdir()
        self._remove_partials()
        self._lock = threading.RLock()
        self._avatars: dict[str, AvatarInfo] = {}
        self._versions: dict[str, int] = {}
        self._linked = self._find_links()
        self._scan_avatars()

    def close(self) -> None:
        """Release the store for another service (the lock also ends with the process)."""
        self._lock_file.close()

    # -- paths and ids ---------------------------------------------------------------------

    def new_id(self, prefix: str) -> str:
        while True:
            candidate = f"{prefix}_{secrets.token_hex(8)}"
            if not any(
                d.joinpath(candidate + ext).exists()
                for d in (self.avatars_dir, self.subjects_dir, self.jobs_dir)
                for ext in ("", ".npz", ".json")
            ):
                return candidate

    def _inside(self, folder: Path, name: str) -> Path:
        path = (folder / name).resolve()
        if path.parent != folder:  # unreachable with checked ids; kept as the last line of defence
            raise WireError(ErrorCode.INVALID_ARGUMENT, "that id does not name anything in the store")
        return path

    def relative(self, text: str) -> str:
        """``text`` with every path into the store written relative to it: messages that leave
        the service never tell where the store lies on its machine."""
        return text.replace(f"{self.root}{os.sep}", "").replace(str(self.root), ".")

    def scratch(self, suffix: str = "") -> Path:
        """A fresh path in the store's scratch folder."""
        return self.tmp_dir / f"{secrets.token_hex(8)}{suffix}"

    def _write_json(self, path: Path, data: dict) -> None:
        tmp = self.scratch(".json")
        tmp.write_text(json.dumps(data, indent=1, allow_nan=False))
        _fsync_replace(tmp, path)

    def _find_links(self) -> frozenset[str]:
        """The names (up to the first dot) of symlinked entries, each logged once; they are never listed."""
        names = set()
        for folder in (self.avatars_dir, self.subjects_dir, self.jobs_dir):
            for path in sorted(folder.iterdir()):
                if path.is_symlink():
                    name = path.relative_to(self.root).as_posix()
                    log.warning("store: skipping %s, a symlink (the store serves only what lies inside it)", name)
                    names.add(path.name.split(".", 1)[0])
        return frozenset(names)

    # -- avatars ---------------------------------------------------------------------------

    def _scan_avatars(self) -> None:
        for npz in sorted(self.avatars_dir.glob("av_*.npz")):
            aid = npz.stem
            if not ID.fullmatch(aid) or aid in self._linked:
                continue
            summary = npz.with_suffix(".json")
            try:
                self._avatars[aid] = AvatarInfo(**json.loads(summary.read_text()))
            except (OSError, ValueError, TypeError):
                try:
                    avatar = load_avatar(npz)
                except InputError as exc:
                    log.error("store: skipping unreadable avatar %s (%s)", npz.name, exc)
                    continue
                stamp = npz.stat().st_mtime
                info = self._info(aid, avatar, avatar.meta.get("name", aid), "recovered", stamp, stamp)
                self._write_json(summary, info.to_json())
                self._avatars[aid] = info
            self._versions[aid] = 0
        for summary in self.avatars_dir.glob("av_*.json"):
            if summary.stem not in self._avatars and summary.stem not in self._linked:
                summary.unlink(missing_ok=True)

    @staticmethod
    def _info(aid: str, avatar: Avatar, name: str, source: str, created: float, updated: float) -> AvatarInfo:
        return AvatarInfo(
            aid, name, avatar.count, avatar.local.sh_degree, avatar.head_name, avatar.head_fingerprint, source, created, updated
        )

    def put_avatar(self, aid: str, avatar: Avatar, name: str | None = None, source: str = "") -> AvatarInfo:
        """Create or overwrite (checkpoint) avatar ``aid``; name and creation time stay once set."""
        check_id(aid, "av")
        with self._lock:
            old = self._avatars.get(aid)
        now = time.time()
        info = self._info(
            aid, avatar, name or (old.name if old else aid), source or (old.source if old else "unknown"), old.created if old else now, now
        )
        staged = self.scratch(".npz")
        save_avatar(avatar, staged)
        with self._lock:
            _fsync_replace(staged, self._inside(self.avatars_dir, aid + ".npz"))
            self._write_json(self._inside(self.avatars_dir, aid + ".json"), info.to_json())
            self._avatars[aid] = info
            self._versions[aid] = self._versions.get(aid, 0) + 1
        return info

    def avatar_info(self, aid: str) -> AvatarInfo:
        with self._lock:
            info = self._avatars.get(check_id(aid, "av", "avatar"))
        if info is None:
            raise WireError(ErrorCode.NOT_FOUND, f"no avatar {aid} in the store")
        return info

    def avatar_version(self, aid: str) -> int:
        """Bumped at every write of ``aid``: caches compare it."""
        self.avatar_info(aid)
        with self._lock:
            return self._versions[aid]

    def load_avatar(self, aid: str) -> Avatar:
        self.avatar_info(aid)
        return load_avatar(self._inside(self.avatars_dir, aid + ".npz"))

    def avatar_bytes(self, aid: str) -> bytes:
        self.avatar_info(aid)
        return self._inside(self.avatars_dir, aid + ".npz").read_bytes()

    def avatars(self) -> list[AvatarInfo]:
        with self._lock:
            return sorted(self._avatars.values(), key=lambda a: a.created)

    def delete_avatar(self, aid: str) -> None:
        self.avatar_info(aid)
        with self._lock:
            # The .npz goes first: a crash in between leaves an orphan summary, removed at start-up.
            self._inside(self.avatars_dir, aid + ".npz").unlink(missing_ok=True)
            self._inside(self.avatars_dir, aid + ".json").unlink(missing_ok=True)
            del self._avatars[aid]
            self._versions.pop(aid, None)

    # -- subjects --------------------------------------------------------------------------

    def commit_subject(self, sid: str, staged: Path) -> Path:
        """Move a subject written in scratch (``scratch()``) into place as ``sid``."""
        target = self._inside(self.subjects_dir, check_id(sid, "sb"))
        os.replace(staged, target)
        return target

    def subject_dir(self, sid: str) -> Path:
        path = self.subjects_dir / check_id(sid, "sb", "subject")
        # A symlinked subject is skipped by listings, so it is absent here too rather than an escape.
        if path.is_symlink() or not (self._inside(self.subjects_dir, sid) / "subject.json").is_file():
            raise WireError(ErrorCode.NOT_FOUND, f"no subject {sid} in the store")
        return path

    def subjects(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.subjects_dir.iterdir()):
            # Checked on every listing: a link made after start-up is skipped too.
            if ID.fullmatch(path.name) and path.name.startswith("sb_") and not path.is_symlink():
                try:
                    info = json.loads((path / "subject.json").read_text())
                    out.append(
                        {k: info.get(k) for k in ("num_frames", "num_cameras", "width", "height", "source")}
                        | {"id": path.name, "created": path.stat().st_mtime}
                    )
                except (OSError, ValueError):
                    log.error("store: subject %s has no readable subject.json", path.name)
        return out

    def delete_subject(self, sid: str) -> None:
        shutil.rmtree(self.subject_dir(sid))

    # -- uploaded inputs of jobs -----------------------------------------------------------

    def put_inputs(self, key: str, files: list[tuple[str, bytes]]) -> None:
        """Keep a job's uploads (suffix, bytes) under the id of what the job will make, so a
        resumed job finds them; names are made here: input0.png, input1.jpg, ..."""
        folder = self._input_dir(key)
        staged = self.scratch("-inputs")
        staged.mkdir()
        for i, (suffix, data) in enumerate(files):
            (staged / f"input{i}{suffix}").write_bytes(data)
        os.replace(staged, folder)

    def _input_dir(self, key: str) -> Path:
        return self._inside(self.inputs_dir, check_id(key, "sb" if key.startswith("sb_") else "av"))

    def inputs(self, key: str) -> list[Path]:
        folder = self._input_dir(key)
        return sorted(folder.iterdir(), key=lambda p: int(p.stem.removeprefix("input"))) if folder.is_dir() else []

    def delete_inputs(self, key: str) -> None:
        shutil.rmtree(self._input_dir(key), ignore_errors=True)

    def prune_inputs(self, keep: set[str]) -> None:
        """Remove the uploads kept under every key not in ``keep`` (no job can read them any more)."""
        for entry in self.inputs_dir.iterdir():
            if entry.name in keep or entry.is_symlink():  # a link is left alone, as everywhere in the store
                continue
            log.info("store: removing inputs/%s, uploads no job can use", entry.name)
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    # -- job records -----------------------------------------------------------------------

    def put_job(self, record: dict[str, Any]) -> None:
        self._write_json(self._inside(self.jobs_dir, check_id(record["id"], "jb") + ".json"), record)

    def job_records(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.jobs_dir.glob("jb_*.json")):
            if ID.fullmatch(path.stem) and path.stem not in self._linked:
                try:
                    out.append(json.loads(path.read_text()))
                except (OSError, ValueError):
                    log.error("store: skipping unreadable job record %s", path.name)
        return out

    def job_checkpoint(self, jid: str) -> Path:
        """Where job ``jid`` keeps its resumable state (e.g. a refinement checkpoint)."""
        return self._inside(self.jobs_dir, check_id(jid, "jb") + ".ckpt")

    def _remove_partials(self) -> None:
        """Checkpoints a crash left half-written: no run will ever finish them."""
        for stale in self.jobs_dir.glob("*" + PARTIAL):
            if stale.is_symlink():  # a link is left alone, as everywhere in the store
                continue
            log.info("store: removing jobs/%s, a checkpoint that was being written when the service stopped", stale.name)
            stale.unlink()

    def delete_job(self, jid: str) -> None:
        ckpt = self.job_checkpoint(jid)
        ckpt.unlink(missing_ok=True)
        ckpt.with_name(ckpt.name + PARTIAL).unlink(missing_ok=True)
        self._inside(self.jobs_dir, check_id(jid, "jb") + ".json").unlink(missing_ok=True)
