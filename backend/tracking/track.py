"""The tracking pipeline: photos / video / frame folders -> a subject folder.

1. Read every input (photos, videos through PyAV, folders of frames) and find the largest
   face's 478 mediapipe landmarks in each frame (frames without a face are skipped, with a
   warning).
2. Fit the head model to all frames at once: one identity, per-frame pose and expression,
   one focal length per input (``fit.LandmarkFitter``).
3. Read the inputs again, cut a square crop around each face (smoothed over time for
   sequences), resize it to ``size``, segment the person, and write the subject: images,
   masks, flame_param.npz, cameras.npz (intrinsics of the crop, the fixed tracking camera),
   subject.json, and one preview image per input under ``previews/``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from backend.configs import Config
from backend.data.subject import LANDMARKS_FILE, SubjectInfo, default_split, write_frame, write_subject
from backend.head.model import HeadModel
from backend.tracking.correspondence import ibug68_from_mediapipe, inter_ocular
from backend.tracking.crop import CropConfig, crop_boxes, crop_image, crop_intrinsics, head_mask, mesh_silhouette, to_crop
from backend.tracking.fit import FitConfig, FitInput, FitResult, LandmarkFitter, default_focal
from backend.tracking.landmarks import MIN_INTER_OCULAR_PX, FaceLandmarks, Landmarker
from backend.tracking.video import FrameRange, Source, open_sources
from backend.wire.errors import InputError

ProgressFactory = Callable[[str], Callable[[int, int], None]]
WarnFn = Callable[[str], None]

# Warn when the crop is blown up more than this (the output will look soft).
UPSAMPLE_WARNING = 2.5


@dataclass(frozen=True)
class TrackConfig(Config):
    """Everything ``track`` needs besides the inputs and the head model."""

    crop: CropConfig = CropConfig()
    fit: FitConfig = FitConfig()
    frames: FrameRange = FrameRange()
    min_confidence: float = 0.5
    previews: bool = True
    preview_frames: int = 4  # frames shown in a video's or folder's preview

    def check(self) -> None:
        """Raise InputError naming the first setting of the crop or the frame range that cannot work."""
        self.crop.check()
        self.frames.check()


@dataclass
class TrackedFrame:
    source: int
    index: int
    time: float | None
    name: str
    width: int
    height: int
    face: FaceLandmarks


@dataclass
class TrackResult:
    root: Path
    frames: list[TrackedFrame]
    fit: FitResult
    boxes: np.ndarray
    warnings: list[str] = field(default_factory=list)
    previews: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        err = self.fit.landmark_error()
        inner = self.fit.landmark_error(slice(17, 68))
        per_frame = (self.fit.errors_px[:, :68] / self.fit.iod_px[:, None]).mean(axis=1) * 100
        return {
            "subject": str(self.root),
            "frames": len(self.frames),
            "sources": len({f.source for f in self.frames}),
            "landmark_error_px": round(err["px"], 3),
            "landmark_error_iod_percent": round(err["iod_percent"], 3),
            "inner_landmark_error_iod_percent": round(inner["iod_percent"], 3),
            "worst_frame_iod_percent": round(float(per_frame.max()), 3),
            "focal_px": [round(float(f), 1) for f in self.fit.focal],
            "eyes_fitted": self.fit.has_eyes,
            "previews": self.previews,
            "warnings": self.warnings,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }


def _noop_factory(desc: str) -> Callable[[int, int], None]:
    return lambda done, total: None


def detect_all(
    sources: list[Source], landmarker: Landmarker, warn: WarnFn, progress: Callable[[int, int], None]
) -> list[TrackedFrame]:
    """Pass 1: landmarks of every frame of every source (largest face; frames without one skipped)."""
    estimates = [s.estimate() for s in sources]
    total = sum(e or 1 for e in estimates)
    done = 0
    frames: list[TrackedFrame] = []
    for si, src in enumerate(sources):
        misses: list[str] = []
        crowded = 0
        tiny = 0
        count = 0
        for fr in src.frames():
            count += 1
            face = landmarker.detect(fr.rgb)
            if face is None:
                misses.append(fr.name)
            else:
                iod = float(np.linalg.norm(face.points[33, :2] - face.points[263, :2]))
                if iod < MIN_INTER_OCULAR_PX:
                    tiny += 1
                    misses.append(fr.name)
                else:
                    crowded += face.faces > 1
                    frames.append(TrackedFrame(si, fr.index, fr.time, fr.name, fr.rgb.shape[1], fr.rgb.shape[0], face))
            done += 1
            if done < total:
                progress(done, total)
        label = str(src.path)
        for problem in getattr(src, "unreadable", []):
            warn(f"{problem}; frame skipped")
        if src.kind == "photo":
            if tiny:
                warn(f"{label}: the face is too small to fit (eyes under {MIN_INTER_OCULAR_PX:.0f} px apart); skipped, use a closer or larger photo")
            elif misses:
                warn(f"{label}: no face found; skipped")
            if crowded:
                warn(f"{label}: found several faces; using the largest")
        else:
            if misses:
                warn(f"{label}: no usable face in {len(misses)} of {count} frames (first: {misses[0]}); those frames are skipped")
            if crowded:
                warn(f"{label}: several faces in {crowded} frames; the largest is used in each")
    progress(total, total)
    if not frames:
        names = ", ".join(str(s.path) for s in sources[:3]) + (" ..." if len(sources) > 3 else "")
        raise InputError(f"no face found in {names}: each input needs one clearly visible face (frontal or up to about 60 degrees turned)")
    return frames


def build_fit_input(frames: list[TrackedFrame], sources: list[Source], config: FitConfig, has_eyes: bool) -> FitInput:
    b = len(frames)
    mp = np.stack([f.face.points for f in frames])
    sizes = np.array([(f.width, f.height) for f in frames], np.float64)
    src = np.array([f.source for f in frames], np.int64)
    used = sorted(set(src.tolist()))
    remap = {s: i for i, s in enumerate(used)}
    src_c = np.array([remap[s] for s in src], np.int64)
    focal = np.zeros(len(used))
    for s in used:
        first = next(i for i in range(b) if frames[i].source == s)
        w, h = sizes[first]
        focal[remap[s]] = sources[s].exif_focal() or default_focal(int(w), int(h), config)
    pairs = []
    for i in range(b - 1):
        a, c = frames[i], frames[i + 1]
        if a.source == c.source and sources[a.source].is_sequence:
            pairs.append((i, i + 1))
    return FitInput.from_mediapipe(
        mp,
        has_eyes,
        source=src_c,
        image_size=sizes,
        focal_init=focal,
        sequence_pairs=np.array(pairs, np.int64).reshape(-1, 2),
    )


def track(
    inputs: list[str | Path],
    out: str | Path,
    head: HeadModel,
    config: TrackConfig = TrackConfig(),
    progress: ProgressFactory | None = None,
    warn: WarnFn | None = None,
) -> TrackResult:
    """Track photos / videos / folders of one person into a subject folder at ``out``."""
    config.crop.check()
    progress = progress or _noop_factory
    warnings: list[str] = []

    def _warn(msg: str) -> None:
        warnings.append(msg)
        if warn:
            warn(msg)

    t0 = time.perf_counter()
    head = head.to("cpu")
    sources = open_sources(list(inputs), config.frames)
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise InputError(f"--out {root}: exists and is not a folder")
    if root.is_dir() and (root / "subject.json").exists():
        _warn(f"{root}: overwriting the subject that was there")
    seconds: dict[str, float] = {}
    with Landmarker(config.min_confidence) as lm:
        frames = detect_all(sources, lm, _warn, progress("landmarks"))
        seconds["landmarks"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        fitter = LandmarkFitter(head, config.fit)
        data = build_fit_input(frames, sources, config.fit, fitter.has_eyes)
        fit = fitter.fit(data, progress("fit"))
        seconds["fit"] = time.perf_counter() - t1
        if not fitter.has_eyes:
            _warn(f"head model '{head.name}' has no eyeballs: eye rotations are not fitted")

        t2 = time.perf_counter()
        groups = [np.array([i for i, f in enumerate(frames) if f.source == s]) for s, src in enumerate(sources) if src.is_sequence]
        boxes = crop_boxes(np.stack([f.face.points for f in frames]), config.crop, [g for g in groups if len(g)])
        size = config.crop.size
        up = size / boxes[:, 2].astype(np.float64)
        if up.max() > UPSAMPLE_WARNING:
            worst = int(up.argmax())
            _warn(f"{frames[worst].name}: the face crop is only {boxes[worst, 2]} px and is enlarged {up.max():.1f}x to {size} px; the subject will look soft")
        K_crop = np.stack([crop_intrinsics(fit.K[i].numpy(), boxes[i], size) for i in range(len(frames))])
        # Frames of an old subject there must not outlive it (only files of the subject layout go).
        for sub in ("images", "masks", "previews"):
            for old in sorted((root / sub).glob("*.png")) if (root / sub).is_dir() else []:
                old.unlink()
        previews = _write_frames(root, sources, frames, fit, boxes, K_crop, head, lm, config, progress("write"))
        seconds["write"] = time.perf_counter() - t2

    photos_only = all(s.kind == "photo" for s in sources)
    split = {"train": list(range(len(frames))), "test": []} if photos_only else default_split(len(frames))
    info = SubjectInfo(
        name=root.name,
        width=size,
        height=size,
        num_frames=len(frames),
        num_cameras=1,
        background=(1.0, 1.0, 1.0),
        split=split,
        head_model=head.name,
        source="tracked",
        extra={
            "tracking": {
                "inputs": [{"path": str(s.path), "kind": s.kind} for s in sources],
                "frames": [{"input": f.source, "index": f.index, "time": f.time, "name": f.name, "box": [int(v) for v in boxes[i]], "size": [f.width, f.height]} for i, f in enumerate(frames)],
                "focal_px_source": [float(f) for f in fit.focal],
                "landmark_error_px": fit.landmark_error()["px"],
                "landmark_error_iod_percent": fit.landmark_error()["iod_percent"],
                "eyes_fitted": fit.has_eyes,
                "fit_config": asdict(config.fit),
                "crop_config": asdict(config.crop),
            }
        },
    )
    K_t = torch.as_tensor(K_crop, dtype=torch.float32)[:, None]
    w2c = fit.world_to_cam[:, None]
    write_subject(root, info, fit.params, K_t, w2c)
    write_landmarks(root, frames, boxes, size)
    seconds["total"] = time.perf_counter() - t0
    return TrackResult(root, frames, fit, boxes, warnings, previews, seconds)


def write_landmarks(root: Path, frames: list[TrackedFrame], boxes: np.ndarray, size: int) -> Path:
    """``landmarks.npz`` beside the subject: what the fit saw, in the crops' pixels.

    mediapipe [T, 478, 3] (x, y, relative depth), ibug68 [T, 68, 2] (the fit's targets),
    iod [T] (outer eye corners, pixels).
    """
    mp = np.stack([np.concatenate([to_crop(f.face.points, boxes[i], size), f.face.points[:, 2:] * size / boxes[i, 2]], axis=1) for i, f in enumerate(frames)])
    path = root / LANDMARKS_FILE
    np.savez(path, mediapipe=mp.astype("<f4"), ibug68=ibug68_from_mediapipe(mp[..., :2]).astype("<f4"), iod=inter_ocular(mp).astype("<f4"))
    return path


def _write_frames(
    root: Path,
    sources: list[Source],
    frames: list[TrackedFrame],
    fit: FitResult,
    boxes: np.ndarray,
    K_crop: np.ndarray,
    head: HeadModel,
    lm: Landmarker,
    config: TrackConfig,
    progress: Callable[[int, int], None],
) -> list[str]:
    """Pass 2: crops, masks and previews; returns the preview paths (relative to ``root``)."""
    from backend.tracking import preview as pv

    size = config.crop.size
    by_key = {(f.source, f.index): i for i, f in enumerate(frames)}
    previews: list[str] = []
    done = 0
    faces = head.faces.numpy().astype(np.int64)
    for si, src in enumerate(sources):
        mine = [i for i, f in enumerate(frames) if f.source == si]
        if not mine:
            continue
        show = set(np.array(mine)[np.linspace(0, len(mine) - 1, min(config.preview_frames, len(mine))).round().astype(int)].tolist())
        rows = []
        for fr in src.frames():
            t = by_key.get((si, fr.index))
            if t is None:
                continue
            rgb, valid = crop_image(fr.rgb, boxes[t], size)
            person = lm.segment(rgb)
            pts_crop = to_crop(frames[t].face.points, boxes[t], size)
            with torch.no_grad():
                verts = head(fit.params.index([t])).vertices[0].numpy().astype(np.float64)
            w2c = fit.world_to_cam[t].numpy().astype(np.float64)
            silhouette = mesh_silhouette(verts, faces, K_crop[t], w2c, size)
            mask = head_mask(person, pts_crop, valid, config.crop, silhouette)
            write_frame(root, t, 0, rgb.astype(np.float32) / 255.0, mask)
            if config.previews and t in show:
                rows.append(_preview_row(pv, rgb, mask, pts_crop, fit, t, boxes[t], K_crop[t], w2c, verts, faces, size))
            done += 1
            progress(done, len(frames))
        if rows:
            name = f"{si:02d}_{_safe(src.name)}.png"
            pv.save_png(pv.stack_rows(rows), root / "previews" / name)
            previews.append(f"previews/{name}")
    return previews


def _preview_row(pv, rgb, mask, pts_crop, fit: FitResult, t: int, box, K, w2c, verts, faces, size: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    detected = ibug68_from_mediapipe(pts_crop)
    fitted = to_crop(fit.projected[t, :68], box, size)
    if fit.has_eyes:
        detected = np.concatenate([detected, pts_crop[[468, 473]]])
        fitted = np.concatenate([fitted, to_crop(fit.projected[t, 68:70], box, size)])
    return pv.preview_strip([pv.landmark_panel(rgb, detected, fitted, pts_crop), pv.mesh_panel(rgb, verts, faces, K, w2c), pv.mask_panel(rgb, mask)])


def _safe(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return keep[:60] or "input"


__all__ = ["TrackConfig", "TrackResult", "track"]
