"""Tracking stage (CPU, mediapipe) and the compact packs that carry subjects to the GPU machine.

A pack is one tar per subject: subject.json, flame_param.npz, cameras.npz, landmarks.npz,
frames as JPEG and masks as PNG. ``unpack`` turns it back into a subject folder with PNG
frames (the decoded JPEGs), so every method is scored against the same pixels.

``refit`` fits a tracked subject's stored detections again (no mediapipe, no crops, no
masks: about half a minute a clip on the CPU), to compare fit settings on the same points:

    python tests/benchmarks/real/tracking.py --flame ict --clips vr_1 lp_d3 [--own-landmarks]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.benchmarks.real.data import Clip, Layout, PhotoSet, clip_stride
from tests.benchmarks.real.protocol import Protocol

TRACK_SUMMARY = "track_summary.json"
SUBJECT_FILES = ("subject.json", "flame_param.npz", "cameras.npz", "landmarks.npz", TRACK_SUMMARY)


def _track(inputs: list[Path], out: Path, head: str | None, protocol: Protocol, stride: int, log) -> dict:  # type: ignore[no-untyped-def]
    from backend.head.registry import load_head_model
    from backend.tracking import TrackConfig, track
    from backend.tracking.crop import CropConfig
    from backend.tracking.video import FrameRange

    config = TrackConfig(crop=CropConfig(size=protocol.size), frames=FrameRange(stride=stride))
    t0 = time.perf_counter()
    result = track([str(p) for p in inputs], out, load_head_model(head), config, warn=lambda m: log(f"  warning: {m}"))
    summary = result.summary() | {"stride": stride, "wall_seconds": round(time.perf_counter() - t0, 1)}
    (out / TRACK_SUMMARY).write_text(json.dumps(summary, indent=1))
    return summary


def track_clip(clip: Clip, layout: Layout, protocol: Protocol, log) -> dict:  # type: ignore[no-untyped-def]
    """Track one clip into ``subjects/<clip>`` (skipped when done); its tracking summary."""
    out = layout.subjects / clip.name
    if (out / TRACK_SUMMARY).is_file():
        return json.loads((out / TRACK_SUMMARY).read_text())
    manifest = {e["file"]: e for e in json.loads(layout.manifest.read_text())["files"]}
    frames = manifest[clip.file.local_name]["frames"]
    return _track([layout.media / clip.file.local_name], out, layout.head, protocol, clip_stride(frames, protocol.max_frames), log)


def track_photos(photos: PhotoSet, layout: Layout, protocol: Protocol, log) -> dict:  # type: ignore[no-untyped-def]
    """Track one person's photos together (one identity, a pose and focal length per photo)."""
    out = layout.subjects / photos.name
    if (out / TRACK_SUMMARY).is_file():
        return json.loads((out / TRACK_SUMMARY).read_text())
    return _track([layout.media / f.local_name for f in photos.files], out, layout.head, protocol, 1, log)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def pack(subject_dir: Path, dest: Path, quality: int) -> Path:
    """One tar with the subject's arrays, JPEG frames and PNG masks."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w") as tar:
        for name in SUBJECT_FILES:
            if (subject_dir / name).is_file():
                tar.add(subject_dir / name, arcname=name)
        for png in sorted((subject_dir / "images").glob("*.png")):
            buf = io.BytesIO()
            with Image.open(png) as im:
                im.convert("RGB").save(buf, "JPEG", quality=quality)
            _add(tar, f"images/{png.stem}.jpg", buf.getvalue())
        for png in sorted((subject_dir / "masks").glob("*.png")):
            tar.add(png, arcname=f"masks/{png.name}")
    return dest


def unpack(pack_file: Path, dest: Path) -> Path:
    """A subject folder from a pack (frames decoded to PNG); skipped when already there."""
    if (dest / "subject.json").is_file():
        return dest
    (dest / "images").mkdir(parents=True, exist_ok=True)
    with tarfile.open(pack_file) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member)
            if data is None:
                continue
            name = Path(member.name)
            if name.parent.name == "images":
                rgb = np.asarray(Image.open(io.BytesIO(data.read())).convert("RGB"))
                Image.fromarray(rgb).save(dest / "images" / f"{name.stem}.png", compress_level=1)
            else:
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                (dest / name).write_bytes(data.read())
    return dest


def stored_detections(subject_dir: Path) -> tuple[list, list]:  # type: ignore[type-arg]
    """A tracked subject's detections again, in its inputs' pixels: (TrackedFrame list, Source list).

    landmarks.npz keeps mediapipe's points in crop pixels and subject.json each frame's crop
    box (x0, y0, side); this undoes ``track.write_landmarks``. The inputs are opened again
    for their image sizes, EXIF focal lengths and kinds.
    """
    from backend.data.subject import LANDMARKS_FILE
    from backend.tracking.landmarks import FaceLandmarks
    from backend.tracking.track import TrackedFrame
    from backend.tracking.video import open_sources

    info = json.loads((subject_dir / "subject.json").read_text())
    tracking, size = info["extra"]["tracking"], info["width"]
    crop_points = np.load(subject_dir / LANDMARKS_FILE)["mediapipe"].astype(np.float64)  # [T, 478, 3]
    sources = open_sources([i["path"] for i in tracking["inputs"]])
    shapes = [next(iter(src.frames())).rgb.shape for src in sources]
    frames = []
    for t, f in enumerate(tracking["frames"]):
        x0, y0, side = f["box"]
        points = crop_points[t] * (side / size) + np.array([x0, y0, 0.0])
        lo, hi = points[:, :2].min(axis=0), points[:, :2].max(axis=0)
        h, w = shapes[f["input"]][:2]
        face = FaceLandmarks(points, (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])), 1, 1.0)
        frames.append(TrackedFrame(f["input"], f["index"], f["time"], f["name"], w, h, face))
    return frames, sources


def refit(subject_dir: Path, head: str | None, config) -> dict:  # type: ignore[no-untyped-def]
    """Fit the subject's stored detections with ``config`` (a FitConfig); errors in % of the IOD."""
    from backend.head.registry import load_head_model
    from backend.tracking.fit import LandmarkFitter
    from backend.tracking.track import build_fit_input

    frames, sources = stored_detections(subject_dir)
    fitter = LandmarkFitter(load_head_model(head), config)
    t0 = time.perf_counter()
    fit = fitter.fit(build_fit_input(frames, sources, config, fitter.has_eyes))
    return {
        "frames": len(frames),
        "landmark_error_iod_percent": fit.landmark_error()["iod_percent"],
        "inner_landmark_error_iod_percent": fit.landmark_error(slice(17, 68))["iod_percent"],
        "jaw_landmark_error_iod_percent": fit.landmark_error(slice(0, 17))["iod_percent"],
        "fit_seconds": time.perf_counter() - t0,
    }


def main() -> None:
    from backend.tracking.fit import FitConfig

    ap = argparse.ArgumentParser(description="Fit tracked subjects' stored detections again and print their landmark errors.")
    ap.add_argument("--data", type=Path, default=Path("data/real"), help="benchmark data folder (ignored by git)")
    ap.add_argument("--flame", help="head model the subjects were tracked with ('ict', a FLAME folder; default the built-in head)")
    ap.add_argument("--clips", nargs="+", required=True, help="subject names under the head's subjects folder")
    ap.add_argument("--own-landmarks", action="store_true", help="fit the head's own iBUG landmarks even when it ships a mediapipe embedding")
    args = ap.parse_args()
    layout = Layout(args.data, args.flame)
    config = replace(FitConfig(), mediapipe_embedding=not args.own_landmarks)
    for name in args.clips:
        r = refit(layout.subjects / name, args.flame, config)
        print(
            f"{name}: {r['frames']} frames, landmarks {r['landmark_error_iod_percent']:.3f}% IOD "
            f"(inner {r['inner_landmark_error_iod_percent']:.3f}%, jaw {r['jaw_landmark_error_iod_percent']:.3f}%), fit {r['fit_seconds']:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
