"""The subject format: frames, masks, tracked FLAME parameters and cameras of one person.

A subject is a folder:

    subject.json       format, version, name, size, counts, background, split, head model
    images/TTTTT_CC.png   RGB frame T seen by camera C (8-bit)
    masks/TTTTT_CC.png    foreground mask (8-bit, 255 = head)
    flame_param.npz    per-frame FLAME parameters, VHAP / GaussianAvatars layout ([T, k] arrays)
    cameras.npz        K [T, C, 3, 3] (pixels), world_to_cam [T, C, 4, 4] (OpenCV: x right,
                       y down, z forward), per frame and camera
    landmarks.npz      optional, written by tracking (monocular subjects): mediapipe [T, 478, 3]
                       in the frames' pixels; the face region that metrics use is their hull

Tracked subjects record each frame's crop in subject.json (``extra.tracking.frames[t]``:
``box`` [x0, y0, side] in source pixels and the source's ``size`` [width, height]): where a
crop reaches past the source image, its pixels were padded with the background and are
unknown, not background (``Subject.known``).

The test split is the last 20% of frames (the INSTA / SplattingAvatar protocol) unless the
subject names its own. Synthetic, tracked and converted subjects all use this format.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from backend.data.regions import hull_mask
from backend.head.params import FlameParams
from backend.render.camera import Cameras
from backend.wire.errors import InputError

FORMAT = "spatialavatar.subject"
VERSION = 1
TEST_FRACTION = 0.2
LANDMARKS_FILE = "landmarks.npz"


def default_split(num_frames: int) -> dict[str, list[int]]:
    """Last 20% of frames for testing (at least one when there are two or more frames)."""
    n_test = int(round(num_frames * TEST_FRACTION)) if num_frames > 1 else 0
    n_test = max(n_test, 1) if num_frames > 1 else 0
    return {"train": list(range(num_frames - n_test)), "test": list(range(num_frames - n_test, num_frames))}


def frame_name(t: int, c: int) -> str:
    return f"{t:05d}_{c:02d}.png"


def inside_source(box: tuple[int, int, int], source_size: tuple[int, int], size: int) -> np.ndarray:
    """[size, size] bool: the pixels of a square crop (x0, y0, side in source pixels, resized
    to ``size``) whose centres fall inside the source image of ``source_size`` (width, height)."""
    x0, y0, side = box
    centres = (np.arange(size) + 0.5) * (side / size)
    cols = (x0 + centres >= 0) & (x0 + centres < source_size[0])
    rows = (y0 + centres >= 0) & (y0 + centres < source_size[1])
    return rows[:, None] & cols[None, :]


@dataclass
class SubjectInfo:
    """The contents of subject.json."""

    name: str
    width: int
    height: int
    num_frames: int
    num_cameras: int
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    split: dict[str, list[int]] = field(default_factory=dict)
    head_model: str = "builtin-v1"
    source: str = "synthetic"
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "width": self.width,
            "height": self.height,
            "num_frames": self.num_frames,
            "num_cameras": self.num_cameras,
            "background": list(self.background),
            "split": self.split or default_split(self.num_frames),
            "head_model": self.head_model,
            "source": self.source,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, d: dict, source: str) -> SubjectInfo:
        if d.get("format") != FORMAT:
            raise InputError(f"{source}: not a SpatialAvatar subject (format is {d.get('format')!r})")
        if d.get("version") != VERSION:
            raise InputError(f"{source}: subject format version {d.get('version')}; this build reads {VERSION}")
        try:
            info = cls(
                name=str(d["name"]),
                width=int(d["width"]),
                height=int(d["height"]),
                num_frames=int(d["num_frames"]),
                num_cameras=int(d["num_cameras"]),
                background=tuple(float(x) for x in d.get("background", (1, 1, 1))),  # type: ignore[arg-type]
                split={k: [int(i) for i in v] for k, v in d.get("split", {}).items()},
                head_model=str(d.get("head_model", "builtin-v1")),
                source=str(d.get("source", "unknown")),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{source}: malformed subject.json ({type(exc).__name__}: {exc})") from exc
        if info.width <= 0 or info.height <= 0 or info.num_frames <= 0 or info.num_cameras <= 0:
            raise InputError(f"{source}: sizes and counts must be positive")
        return info


class Subject:
    """A validated subject folder. Images are read lazily, per frame."""

    def __init__(self, root: Path, info: SubjectInfo, params: FlameParams, K: torch.Tensor, world_to_cam: torch.Tensor) -> None:
        self.root = root
        self.info = info
        self.params = params
        self.K = K  # [T, C, 3, 3]
        self.world_to_cam = world_to_cam  # [T, C, 4, 4]
        self._landmarks: np.ndarray | None = None  # [T, 478, 2], read on first use

    @property
    def num_frames(self) -> int:
        return self.info.num_frames

    @property
    def num_cameras(self) -> int:
        return self.info.num_cameras

    @property
    def split(self) -> dict[str, list[int]]:
        return self.info.split or default_split(self.num_frames)

    def cameras(self, t: int | list[int]) -> Cameras:
        """Cameras of frame(s) t: [C] for an int, [len(t), C] for a list."""
        return Cameras(K=self.K[t], world_to_cam=self.world_to_cam[t], width=self.info.width, height=self.info.height)

    def image(self, t: int, c: int = 0) -> torch.Tensor:
        """[H, W, 3] float32 in [0, 1]."""
        return _read_png(self.root / "images" / frame_name(t, c), "RGB", (self.info.width, self.info.height))

    def mask(self, t: int, c: int = 0) -> torch.Tensor:
        """[H, W, 1] float32 in [0, 1]."""
        return _read_png(self.root / "masks" / frame_name(t, c), "L", (self.info.width, self.info.height))[..., None]

    def face_mask(self, t: int) -> torch.Tensor | None:
        """[H, W, 1] float32: 1 inside the convex hull of frame t's tracked landmarks (camera 0),
        None for subjects without ``landmarks.npz`` (synthetic and converted ones)."""
        path = self.root / LANDMARKS_FILE
        if not path.is_file():
            return None
        if self._landmarks is None:
            with np.load(path, allow_pickle=False) as z:
                self._landmarks = z["mediapipe"][..., :2].astype(np.float64)
        inside = hull_mask(self._landmarks[t], self.info.height, self.info.width)
        return torch.from_numpy(inside.astype(np.float32))[..., None]

    def known(self, t: int, c: int = 0) -> torch.Tensor:
        """[H, W, 1] float32: 1 where frame t holds the source's pixels, 0 where its crop was
        padded past the source's edge (see the module doc). All ones where the subject does not
        record its crops (synthetic and converted subjects, and other cameras than 0)."""
        frames = self.info.extra.get("tracking", {}).get("frames", [])
        crop = frames[t] if c == 0 and t < len(frames) else {}
        if "box" not in crop or "size" not in crop or self.info.width != self.info.height:
            return torch.ones(self.info.height, self.info.width, 1)
        inside = inside_source(tuple(int(v) for v in crop["box"]), tuple(int(v) for v in crop["size"]), self.info.width)
        return torch.from_numpy(inside.astype(np.float32))[..., None]

    def background(self) -> torch.Tensor:
        return torch.tensor(self.info.background, dtype=torch.float32)

    @classmethod
    def load(cls, root: str | Path, check_images: bool = True) -> Subject:
        """Open and validate a subject folder; every problem is an InputError saying what and where."""
        root = Path(root)
        meta_path = root / "subject.json"
        if not meta_path.is_file():
            raise InputError(f"{root}: not a subject folder (no subject.json)")
        try:
            info = SubjectInfo.from_json(json.loads(meta_path.read_text()), str(meta_path))
        except json.JSONDecodeError as exc:
            raise InputError(f"{meta_path}: not valid JSON ({exc})") from exc
        params = FlameParams.load(root / "flame_param.npz")
        if params.batch_size != info.num_frames:
            raise InputError(f"{root}: flame_param.npz has {params.batch_size} frames, subject.json says {info.num_frames}")
        cam_path = root / "cameras.npz"
        if not cam_path.is_file():
            raise InputError(f"{root}: cameras.npz is missing")
        try:
            with np.load(cam_path, allow_pickle=False) as z:
                K = torch.from_numpy(z["K"].astype(np.float32))
                w2c = torch.from_numpy(z["world_to_cam"].astype(np.float32))
        except (KeyError, ValueError, OSError) as exc:
            raise InputError(f"{cam_path}: needs arrays K and world_to_cam ({exc})") from exc
        t, c = info.num_frames, info.num_cameras
        if tuple(K.shape) != (t, c, 3, 3) or tuple(w2c.shape) != (t, c, 4, 4):
            raise InputError(f"{cam_path}: K {list(K.shape)} and world_to_cam {list(w2c.shape)} must be [{t}, {c}, 3, 3] and [{t}, {c}, 4, 4]")
        if not bool(torch.isfinite(K).all() and torch.isfinite(w2c).all()):
            raise InputError(f"{cam_path}: cameras contain NaN or Inf")
        split = info.split or default_split(t)
        for name, idx in split.items():
            bad = [i for i in idx if not 0 <= i < t]
            if bad:
                raise InputError(f"{meta_path}: split '{name}' names frames {bad[:5]} outside [0, {t})")
        # The crop records Subject.known reads (module doc): a broken one fails here, not mid-fit.
        tracking = info.extra.get("tracking", {})
        crops = tracking.get("frames", []) if isinstance(tracking, dict) else None
        if not isinstance(crops, list):
            raise InputError(f"{meta_path}: extra.tracking must be an object whose frames are a list of per-frame crop records")
        for i, crop in enumerate(crops):
            problem = _crop_problem(crop)
            if problem:
                raise InputError(f"{meta_path}: crop record of frame {i} (extra.tracking.frames[{i}]): {problem}")
        if check_images:
            missing = [f"{sub}/{frame_name(i, j)}" for i in range(t) for j in range(c) for sub in ("images", "masks") if not (root / sub / frame_name(i, j)).is_file()]
            if missing:
                raise InputError(f"{root}: {len(missing)} frame files missing, first: {missing[0]}")
        return cls(root, info, params, K, w2c)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _crop_problem(crop: object) -> str | None:
    """What keeps one tracking crop record from ``Subject.known``, or None. ``box`` and ``size``
    may each be missing (older tracked subjects record no size; the frame is then all known)."""
    if not isinstance(crop, dict):
        return f"not an object ({type(crop).__name__})"
    # (field, its entries, those that must be positive after int() as Subject.known reads them)
    for key, names, positive in (("box", ("x0", "y0", "side"), {"side"}), ("size", ("width", "height"), {"width", "height"})):
        if key not in crop:
            continue
        v = crop[key]
        if not isinstance(v, list) or len(v) != len(names) or not all(_is_number(x) for x in v):
            return f"{key} {v!r} is not {len(names)} numbers [{', '.join(names)}]"
        if any(n in positive and int(x) <= 0 for n, x in zip(names, v)):
            return f"{key} {v!r} needs a positive {' and '.join(sorted(positive, key=names.index))}"
    return None


def write_frame(root: Path, t: int, c: int, rgb: np.ndarray, mask: np.ndarray) -> None:
    """rgb: [H, W, 3] float in [0, 1]; mask: [H, W] float in [0, 1]."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB").save(root / "images" / frame_name(t, c))
    Image.fromarray((np.clip(mask, 0, 1) * 255 + 0.5).astype(np.uint8), "L").save(root / "masks" / frame_name(t, c))


def write_subject(root: str | Path, info: SubjectInfo, params: FlameParams, K: torch.Tensor, world_to_cam: torch.Tensor) -> Path:
    """Write subject.json, flame_param.npz and cameras.npz (frames are written by write_frame)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "subject.json").write_text(json.dumps(info.to_json(), indent=1))
    params.save(root / "flame_param.npz")
    np.savez(root / "cameras.npz", K=K.detach().cpu().numpy().astype("<f4"), world_to_cam=world_to_cam.detach().cpu().numpy().astype("<f4"))
    return root


def _read_png(path: Path, mode: str, size: tuple[int, int]) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise InputError(f"missing frame file {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InputError(f"unreadable image {path} ({exc})") from exc
    if (arr.shape[1], arr.shape[0]) != size:
        raise InputError(f"{path}: image is {arr.shape[1]}x{arr.shape[0]}, the subject says {size[0]}x{size[1]}")
    return torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1) if mode == "RGB" else arr)
