"""Input sources: photos, video files (decoded with PyAV) and folders of frames.

A source yields frames in order and can be read again (the tracker reads twice: once for
landmarks, once to cut the output crops, so a long video never sits in memory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from backend.tracking.images import check_frame, is_image_path, is_video_path, load_image
from backend.wire.errors import InputError


@dataclass(frozen=True)
class FrameRange:
    """Which frames of a video or folder to use.

    Attributes:
        stride: keep every ``stride``-th frame (of those in the time range).
        start / end: time range in seconds (videos) or frame range scaled by ``fps`` (folders);
            None = from the beginning / to the end.
        max_frames: stop after this many kept frames (None = no limit).
        fps: frame rate assumed for folders of frames when a time range is given.
    """

    stride: int = 1
    start: float | None = None
    end: float | None = None
    max_frames: int | None = None
    fps: float = 25.0

    def check(self) -> None:
        if self.stride < 1:
            raise InputError(f"--stride must be >= 1, got {self.stride}")
        if self.start is not None and self.start < 0:
            raise InputError(f"--start must be >= 0 seconds, got {self.start}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise InputError(f"--end ({self.end}) must be after --start ({self.start})")
        if self.max_frames is not None and self.max_frames < 1:
            raise InputError(f"--max-frames must be >= 1, got {self.max_frames}")
        if not self.fps > 0:
            raise InputError(f"the frame rate of a folder of frames must be positive, got {self.fps}")


@dataclass(frozen=True)
class Frame:
    """One decoded frame: ``index`` counts frames of the source, ``time`` in seconds when known."""

    index: int
    time: float | None
    name: str
    rgb: np.ndarray


class Source:
    """A photo, a video or a folder of frames given on the command line."""

    kind = "source"

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def is_sequence(self) -> bool:
        return self.kind in ("video", "folder")

    def frames(self) -> Iterator[Frame]:  # pragma: no cover - abstract
        raise NotImplementedError

    def estimate(self) -> int | None:
        """Rough number of frames this source will yield (for progress bars), None if unknown."""
        return None

    @property
    def fps(self) -> float | None:
        """Frames a second of a video (its own) or a folder (``FrameRange.fps``); None for a photo."""
        return None

    def exif_focal(self) -> float | None:
        """Focal length in pixels from the file's metadata, when it says."""
        return None


class PhotoSource(Source):
    kind = "photo"

    def frames(self) -> Iterator[Frame]:
        yield Frame(0, None, self.path.name, load_image(self.path))

    def estimate(self) -> int:
        return 1

    def exif_focal(self) -> float | None:
        return exif_focal_px(self.path)


def exif_focal_px(path: Path) -> float | None:
    """Focal length in pixels from EXIF FocalLengthIn35mmFilm (35 mm film diagonal 43.27 mm), or None."""
    try:
        from PIL import Image, ImageOps

        with Image.open(path) as im:
            exif = im.getexif()
            f35 = exif.get_ifd(0x8769).get(0xA405) if exif else None
            if not f35:
                return None
            w, h = (ImageOps.exif_transpose(im) or im).size
        f35 = float(f35)
        if not 8.0 <= f35 <= 1200.0:
            return None
        return f35 / 43.27 * float(np.hypot(w, h))
    except Exception:  # metadata is a hint; a damaged EXIF block must not stop tracking
        return None


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


class FolderSource(Source):
    """Image files of one folder in natural order (frame_2 before frame_10)."""

    kind = "folder"

    def __init__(self, path: Path, frame_range: FrameRange) -> None:
        super().__init__(path)
        self.range = frame_range
        files = sorted((p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and is_image_path(p)), key=_natural_key)
        if not files:
            others = [p.name for p in path.iterdir() if not p.name.startswith(".")]
            hint = f" (it holds {len(others)} other entries, e.g. {others[0]})" if others else ""
            raise InputError(f"{path}: folder has no image files{hint}; give photos, a video, or a folder of .png/.jpg frames")
        first = 0 if frame_range.start is None else int(round(frame_range.start * frame_range.fps))
        last = len(files) if frame_range.end is None else int(round(frame_range.end * frame_range.fps))
        self.files = list(enumerate(files))[first:last][:: frame_range.stride]
        if frame_range.max_frames:
            self.files = self.files[: frame_range.max_frames]
        if not self.files:
            raise InputError(f"{path}: the time range {frame_range.start}-{frame_range.end} s (at {frame_range.fps} fps) selects none of its {len(files)} frames")

    def frames(self) -> Iterator[Frame]:
        """The folder's frames; an unreadable file is skipped and named in ``self.unreadable``."""
        self.unreadable: list[str] = []
        for i, p in self.files:
            try:
                rgb = load_image(p)
            except InputError as exc:
                self.unreadable.append(str(exc))
                continue
            yield Frame(i, i / self.range.fps, p.name, rgb)
        if len(self.unreadable) == len(self.files):
            raise InputError(f"{self.path}: none of its {len(self.files)} frames could be read; first: {self.unreadable[0]}")

    def estimate(self) -> int:
        return len(self.files)

    @property
    def fps(self) -> float:
        return self.range.fps


class VideoSource(Source):
    """A video file decoded with PyAV (FFmpeg): stride, time range, rotation metadata honoured."""

    kind = "video"

    def __init__(self, path: Path, frame_range: FrameRange) -> None:
        super().__init__(path)
        self.range = frame_range
        self._fps, self._duration, self._count = self._probe()

    def _open(self):  # type: ignore[no-untyped-def]
        import av

        try:
            container = av.open(str(self.path))
        except av.FFmpegError as exc:
            raise InputError(f"{self.path}: cannot be opened as a video ({exc}); is the file complete and a common format (mp4, mov, mkv, webm)?") from exc
        if not container.streams.video:
            container.close()
            raise InputError(f"{self.path}: has no video stream")
        return container

    def _probe(self) -> tuple[float, float | None, int | None]:
        container = self._open()
        try:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 25.0
            duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
            if duration is None and container.duration:
                duration = container.duration / 1_000_000
            count = int(stream.frames) if stream.frames else (int(duration * fps) if duration else None)
        finally:
            container.close()
        return fps, duration, count

    @property
    def fps(self) -> float:
        return self._fps

    def estimate(self) -> int | None:
        if self._count is None:
            return None
        r = self.range
        start = r.start or 0.0
        end = r.end if r.end is not None else (self._duration or self._count / self._fps)
        n = max(0, int((min(end, self._count / self._fps) - start) * self._fps))
        n = (n + r.stride - 1) // r.stride
        return min(n, r.max_frames) if r.max_frames else n

    def frames(self) -> Iterator[Frame]:
        import av

        r = self.range
        container = self._open()
        kept = 0
        decoded_any = False
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if r.start and stream.time_base:
                # Seek to the keyframe before start; frames before it are skipped below.
                container.seek(int(r.start / stream.time_base), stream=stream, backward=True)
            k = -1
            for frame in container.decode(stream):
                decoded_any = True
                t = float(frame.time) if frame.time is not None else None
                if t is None:
                    t = (k + 1) / self._fps
                if r.start is not None and t < r.start - 1e-6:
                    continue
                if r.end is not None and t >= r.end:
                    break
                k += 1
                if k % r.stride:
                    continue
                rgb = frame.to_ndarray(format="rgb24")
                rot = int(getattr(frame, "rotation", 0) or 0)
                if rot % 360:
                    rgb = np.ascontiguousarray(np.rot90(rgb, k=(rot // 90) % 4))
                index = int(round(t * self._fps))
                yield Frame(index, t, f"{self.path.name}@{t:.3f}s", check_frame(rgb, f"{self.path}, frame at {t:.2f} s"))
                kept += 1
                if r.max_frames and kept >= r.max_frames:
                    break
        except av.FFmpegError as exc:
            raise InputError(f"{self.path}: video cannot be decoded ({exc})") from exc
        finally:
            container.close()
        if not decoded_any:
            raise InputError(f"{self.path}: no video frame could be decoded")
        if kept == 0:
            raise InputError(f"{self.path}: the time range {r.start}-{r.end} s selects no frames (the video lasts {self._duration or 0:.2f} s)")


def open_sources(inputs: list[str | Path], frame_range: FrameRange = FrameRange()) -> list[Source]:
    """Classify and validate the inputs (photos, videos, folders); errors name the bad input."""
    frame_range.check()
    if not inputs:
        raise InputError("no input given: pass photos, a video file or a folder of frames")
    out: list[Source] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise InputError(f"{p}: no such file or folder")
        if p.is_dir():
            out.append(FolderSource(p, frame_range))
        elif is_video_path(p):
            out.append(VideoSource(p, frame_range))
        elif is_image_path(p):
            out.append(PhotoSource(p))
        else:
            # Unknown suffix: sniff it as an image first, then as a video.
            try:
                load_image(p)
                out.append(PhotoSource(p))
                continue
            except InputError:
                pass
            try:
                out.append(VideoSource(p, frame_range))
            except InputError:
                raise InputError(f"{p}: neither an image nor a video this build can read") from None
    return out
