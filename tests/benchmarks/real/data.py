"""The real benchmark's media: which public files, where they go, and their manifest.

``sources.json`` lists every clip and photo by repository, path and git blob id. The media
are never committed: ``prepare`` copies them out of snapshots of those repositories (a git
directory or a checkout each) into the ignored data folder and writes ``manifest.json``
(repository, commit, path, the repository's stated licence, resolution, frames, fps). None
of the repositories states a licence for its media: they are for evaluation only.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

SOURCES = Path(__file__).with_name("sources.json")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class Layout:
    """Folders of one benchmark data root (ignored by git). Subjects and results of a head
    model other than the default (``head``, e.g. "ict") live in folders of their own."""

    root: Path
    head: str | None = None

    @property
    def _suffix(self) -> str:
        return f"_{Path(self.head).name}" if self.head else ""

    @property
    def media(self) -> Path:
        return self.root / "media"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def subjects(self) -> Path:
        return self.root / f"subjects{self._suffix}"

    @property
    def packs(self) -> Path:
        return self.root / f"packs{self._suffix}"

    @property
    def results(self) -> Path:
        return self.root / f"results{self._suffix}"


def clip_script_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every per-clip script of the benchmark shares: ``--data`` and ``--clips``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/real"), help="benchmark data folder (ignored by git)")
    ap.add_argument("--clips", nargs="+", required=True, help="subject names in DATA/subjects or DATA/packs")
    return ap


@dataclass(frozen=True)
class MediaFile:
    repo: str
    path: str
    blob: str  # git blob id of the file in the snapshot

    @property
    def local_name(self) -> str:
        return f"{self.repo.replace('/', '__')}__{self.path.replace('/', '__')}"


@dataclass(frozen=True)
class Clip:
    name: str
    file: MediaFile


@dataclass(frozen=True)
class PhotoSet:
    """Photos of one person; the last is held out, the others are the generator's sources."""

    name: str
    files: tuple[MediaFile, ...]


@dataclass(frozen=True)
class Sources:
    repos: dict[str, dict]
    clips: tuple[Clip, ...]
    photos: tuple[PhotoSet, ...]

    @classmethod
    def load(cls, path: Path = SOURCES) -> Sources:
        d = json.loads(path.read_text())
        clips = tuple(Clip(c["name"], MediaFile(c["repo"], c["path"], c["blob"])) for c in d["clips"])
        photos = tuple(PhotoSet(p["name"], tuple(MediaFile(p["repo"], f["path"], f["blob"]) for f in p["files"])) for p in d["photos"])
        return cls(d["repos"], clips, photos)

    def all_files(self) -> list[MediaFile]:
        return [c.file for c in self.clips] + [f for p in self.photos for f in p.files]

    def select_clips(self, names: list[str] | None) -> list[Clip]:
        """The named clips (all of them for none)."""
        return _select(self.clips, names, "clip")

    def select_photos(self, names: list[str] | None) -> list[PhotoSet]:
        """The named photo identities (all of them for none)."""
        return _select(self.photos, names, "photo identity")


def _select(items: tuple, names: list[str] | None, kind: str) -> list:
    if not names:
        return list(items)
    known = {item.name: item for item in items}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {kind} name(s) {unknown}; known: {sorted(known)}")
    return [known[n] for n in names]


def _git(git_dir: Path, *args: str) -> bytes:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True).stdout


def _git_dir(snapshot: Path) -> Path:
    """A snapshot is a bare git directory or a checkout with .git inside."""
    return snapshot / ".git" if (snapshot / ".git").exists() else snapshot


def video_info(path: Path) -> dict:
    """Resolution, frame count, fps and duration of a video (PyAV)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        return {"width": stream.codec_context.width, "height": stream.codec_context.height, "frames": stream.frames, "fps": round(fps, 3), "seconds": round(stream.frames / fps, 3)}


def prepare(snapshots: dict[str, Path], layout: Layout, sources: Sources) -> dict:
    """Copy every listed file out of its repository's snapshot into ``layout.media`` (checking
    its blob id), then write and return the manifest. ``snapshots``: "owner/name" -> path."""
    missing = sorted(set(sources.repos) - set(snapshots))
    if missing:
        raise SystemExit(f"no snapshot given for {missing}: pass --snapshot OWNER/NAME=PATH for each")
    layout.media.mkdir(parents=True, exist_ok=True)
    commits = {repo: _git(_git_dir(snapshots[repo]), "rev-parse", "HEAD").decode().strip() for repo in sources.repos}
    entries = []
    for f in sources.all_files():
        git_dir = _git_dir(snapshots[f.repo])
        blob = _git(git_dir, "rev-parse", f"HEAD:{f.path}").decode().strip()
        if blob != f.blob:
            raise SystemExit(f"{f.repo}:{f.path} is blob {blob} in the snapshot, sources.json records {f.blob}")
        dest = layout.media / f.local_name
        if not dest.is_file():
            dest.write_bytes(_git(git_dir, "cat-file", "blob", blob))
        entry = {"repo": f.repo, "commit": commits[f.repo], "path": f.path, "blob": blob, "licence": sources.repos[f.repo]["licence"], "media_licence": "not stated", "file": dest.name}
        if dest.suffix.lower() in VIDEO_SUFFIXES:
            entry |= video_info(dest)
        else:
            with Image.open(dest) as im:
                entry |= {"width": im.width, "height": im.height}
        entries.append(entry)
    manifest = {"files": entries}
    layout.manifest.write_text(json.dumps(manifest, indent=1))
    return manifest


def clip_stride(frames: int, max_frames: int) -> int:
    """The stride that keeps at most ``max_frames`` frames spread over the whole clip."""
    return max(1, math.ceil(frames / max_frames))
