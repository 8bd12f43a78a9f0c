"""Many clips, one subject each: tracking a corpus (CelebV-HQ clips, a folder of talking-head
videos) in parallel over CPU cores.

Each clip is tracked alone, into ``OUT/<clip name>`` (a video's stem, a frame folder's name),
by a pool of worker processes. A clip is written to ``OUT/<name>.partial`` first and moved
into place when it is complete, so a subject folder always holds a whole subject; a batch
run again skips the clips whose subject exists and retries the rest. A clip that fails (no
face, an unreadable file) is reported with its reason and does not stop the others.
Tracking runs on the CPU (mediapipe and a small fit), so GPUs do not speed it up.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from backend.tracking.images import is_image_path, is_video_path
from backend.tracking.track import TrackConfig
from backend.wire.errors import SpatialAvatarError

PARTIAL = ".partial"


@dataclass(frozen=True)
class BatchConfig:
    """Attributes:
    workers: clips tracked at once, one process each (default: one per two cores).
    track: how each clip is tracked.
    """

    workers: int = max(1, (os.cpu_count() or 1) // 2)
    track: TrackConfig = field(default_factory=TrackConfig)

    def check(self) -> None:
        if self.workers < 1:
            raise SpatialAvatarError(f"--workers must be at least 1, got {self.workers}")


@dataclass
class BatchResult:
    """Attributes:
    tracked: clip name -> seconds its tracking took.
    skipped: clips whose subject was already there.
    failed: clip name -> the reason, one line.
    """

    out: Path
    tracked: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict:
        return {
            "out": str(self.out),
            "tracked": len(self.tracked),
            "skipped": len(self.skipped),
            "failed": self.failed,
            "seconds": round(self.seconds, 1),
        }


def find_clips(inputs: list[Path]) -> list[Path]:
    """The clips in ``inputs``: video files as given, and in each folder its videos and its
    sub-folders of frames (a folder holding images is itself one clip)."""
    clips: list[Path] = []
    for path in inputs:
        if not path.exists():
            raise SpatialAvatarError(f"{path}: no such file or folder")
        if path.is_file():
            if not is_video_path(path):
                raise SpatialAvatarError(f"{path}: not a video (a batch takes videos and folders of clips)")
            clips.append(path)
        elif any(is_image_path(p) for p in path.iterdir()):
            clips.append(path)
        else:
            clips += sorted(p for p in path.iterdir() if (p.is_file() and is_video_path(p)) or (p.is_dir() and any(is_image_path(q) for q in p.iterdir())))
    names = [clip_name(c) for c in clips]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SpatialAvatarError(f"two clips would share a subject folder: {', '.join(twice)}; rename one")
    return clips


def clip_name(clip: Path) -> str:
    return clip.stem if clip.is_file() else clip.name


def _track_one(clip: str, dest: str, head_source: str, config: TrackConfig, threads: int) -> float:
    """Worker: track one clip into ``dest`` + PARTIAL, then move it to ``dest``. Seconds taken."""
    import torch

    from backend.head.registry import load_head_model
    from backend.tracking.track import track

    torch.set_num_threads(threads)  # the pool shares the cores; each fit gets its part
    t0 = time.perf_counter()
    partial = Path(dest + PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    track([clip], partial, load_head_model(head_source), config)
    partial.rename(dest)
    return time.perf_counter() - t0


def track_batch(
    clips: list[Path],
    out: Path,
    head_source: str,
    config: BatchConfig = BatchConfig(),
    progress: Callable[[str], None] | None = None,
) -> BatchResult:
    """Track every clip into ``out/<name>``; ``head_source`` names the head model as
    ``load_head_model`` takes it (a FLAME path, "builtin", "ict"). ``progress`` gets a line
    per clip as it ends."""
    config.check()
    config.track.crop.check()
    say = progress or (lambda line: None)
    out.mkdir(parents=True, exist_ok=True)
    result = BatchResult(out)
    t0 = time.perf_counter()
    todo = []
    for clip in clips:
        name = clip_name(clip)
        if (out / name / "subject.json").is_file():
            result.skipped.append(name)
        else:
            todo.append(clip)
    threads = max(1, (os.cpu_count() or 1) // min(config.workers, max(len(todo), 1)))
    # Spawned, not forked: the parent may hold torch's thread pools, which a fork inherits broken.
    with ProcessPoolExecutor(max_workers=config.workers, mp_context=get_context("spawn")) as pool:
        jobs = {pool.submit(_track_one, str(clip), str(out / clip_name(clip)), head_source, config.track, threads): clip_name(clip) for clip in todo}
        for done, job in enumerate(as_completed(jobs), start=1):
            name = jobs[job]
            try:
                result.tracked[name] = job.result()
                say(f"[{done}/{len(todo)}] {name}: {result.tracked[name]:.0f} s")
            except (SpatialAvatarError, OSError) as e:  # this clip's input; a bug still stops the batch
                result.failed[name] = str(e)
                shutil.rmtree(out / (name + PARTIAL), ignore_errors=True)
                say(f"[{done}/{len(todo)}] {name}: failed: {e}")
    result.seconds = time.perf_counter() - t0
    return result
