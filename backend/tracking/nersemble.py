"""NeRSemble sequences into subjects: calibrated multi-view frames with tracked FLAME parameters.

``convert_nersemble`` reads a sequence in one of the public layouts (``nersemble_layouts``),
takes a subset of its cameras and frames, and writes one subject (docs/tracking.md, "NeRSemble"):

- FLAME parameters come from the sequence's own tracking, fitted to the loaded head model: the
  vertex count must be the head's, identity components the head does not use are folded into
  ``static_offset`` (exact), expression components it does not use are dropped (their largest
  effect is reported in millimetres).
- The world is FLAME's: the capture's world is scaled to FLAME metres (the benchmark tracks a
  head ``scale`` times FLAME's size), then turned and shifted rigidly so that the head's mean
  rotation over the kept frames is the identity (the face looks along +z, +y up) and its mean
  ``translation`` is zero. Cameras move with it, so every pixel keeps its 3D point.
- Images are square crops around the tracked head, resized to ``size``, one box per frame and
  camera (smoothed over time), with the intrinsics cropped to match.
- Held-out cameras go into a second subject, ``OUT/heldout``, with the same frames and split.

Everything is written to ``OUT.partial`` first and moved into place when complete.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from backend.atomic_write import PARTIAL
from backend.configs import Config, SettingError, above, at_least
from backend.data.subject import SubjectInfo, write_frame, write_subject
from backend.head.model import FLAME_SHAPE_SPACE, HeadModel
from backend.head.params import FlameParams
from backend.tracking.crop import CropConfig, crop_boxes, crop_image, crop_intrinsics
from backend.tracking.nersemble_layouts import TRACKED_WITH, Capture, TrackedHead, read_capture
from backend.wire.errors import InputError

HELDOUT = "heldout"
# VHAP's FLAME appends 120 teeth vertices after FLAME's own; their offsets have no place in FLAME.
VHAP_TEETH = 120
# The head model names of the FLAME the public trackings used (backend/head/flame_files.py).
TRACKED_HEAD_NAMES = ("flame2023",)
# The crop's ball sits this many face sizes behind the face's landmarks and above them: the
# skull's middle, a little toward the hair (measured on FLAME-format heads' proportions).
HEAD_BACK = 0.45
HEAD_UP = 0.15

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class NersembleConfig(Config):
    """What to take from a NeRSemble sequence.

    Attributes:
        size: width and height of the square crops, pixels.
        cameras: camera serials for the subject, in this order (empty: every camera not held out).
        test_cameras: serials held out into the ``heldout`` subject (novel-view evaluation).
        stride: keep every ``stride``-th tracked frame.
        max_frames: keep at most this many frames (None: all).
        test_fraction: the last this fraction of the kept frames is the test split.
        crop_scale: crop side as a multiple of the face's size (the largest distance between
            two of its 68 tracked landmarks, about ear to chin), for a camera at the head's depth.
    """

    size: int = 512
    cameras: tuple[str, ...] = ()
    test_cameras: tuple[str, ...] = ()
    stride: int = 1
    max_frames: int | None = None
    test_fraction: float = 0.2
    crop_scale: float = 2.7

    def check(self) -> None:
        """Raise SettingError naming the first field that cannot work."""
        if not 64 <= self.size <= 4096:
            raise SettingError("size", self.size, "the crop size must be in [64, 4096] pixels")
        at_least("stride", self.stride, 1)
        if self.max_frames is not None:
            at_least("max_frames", self.max_frames, 1)
        if not 0.0 <= self.test_fraction < 1.0:
            raise SettingError("test_fraction", self.test_fraction, "must be in [0, 1)")
        above("crop_scale", self.crop_scale, 0.0)
        both = sorted(set(self.cameras) & set(self.test_cameras))
        if both:
            raise SettingError("test_cameras", ",".join(both), "a held-out camera cannot also be a training camera")


@dataclass
class NersembleResult:
    """What a conversion wrote: the subject, its frames and cameras, and notes worth reading."""

    out: Path
    layout: str
    frames: int
    cameras: list[str]
    heldout: list[str]
    split: dict[str, int]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        return {
            "subject": str(self.out),
            "layout": self.layout,
            "frames": self.frames,
            "cameras": self.cameras,
            "heldout_subject": str(self.out / HELDOUT) if self.heldout else None,
            "heldout_cameras": self.heldout,
            "split": self.split,
            "notes": self.notes,
            "seconds": round(self.seconds, 1),
        }


def convert_nersemble(
    folder: str | Path,
    out: str | Path,
    head: HeadModel,
    config: NersembleConfig = NersembleConfig(),
    calibration: str | Path | None = None,
    progress: Progress | None = None,
) -> NersembleResult:
    """Write the subject for one NeRSemble sequence to ``out`` (replacing one there); see the module doc.

    Args:
        folder: the sequence folder, either public layout.
        head: the head model the tracking was made with (FLAME 2023 for the public trackings).
        calibration: the release layout's camera_params.json, when not at its usual place.
        progress: called with (frames written, frames to write).
    """
    t0 = time.perf_counter()
    config.check()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; give a new folder for the subject")
    if out.exists() and not (out / "subject.json").is_file() and any(out.iterdir()):
        raise InputError(f"{out}: exists and is not a subject; give a new folder (a subject there would be replaced)")
    capture = read_capture(Path(folder), None if calibration is None else Path(calibration))
    train, test = _choose_cameras(capture, config)
    rows = list(range(len(capture.frame_ids)))[:: config.stride][: config.max_frames]
    local, notes = _local_params(capture.head, rows, head)
    root, local_landmarks = _pose(head, local)
    params, world_to_cam, world_from_capture = _to_flame_world(capture, rows, local, root)
    # The landmarks follow the head's global pose: x' = R' (x - J0) + J0 + T'.
    turn = Rotation.from_rotvec(params.rotation.double().numpy()).as_matrix()
    landmarks = np.einsum("tij,tnj->tni", turn, local_landmarks - root[:, None]) + (root + params.translation.double().numpy())[:, None]
    centres, radius = _head_ball(landmarks, params, config.crop_scale)
    crops = {c: _crops(centres, radius, capture.K[c], world_to_cam[c], config.size, capture.serials[c]) for c in train + test}
    split = _split(len(rows), config.test_fraction)
    partial = out.with_name(out.name + PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    total = len(rows) * len(crops)
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    provenance = {
        "layout": capture.layout,
        "sequence": capture.root.name,
        "frame_ids": [capture.frame_ids[r] for r in rows],
        "tracked_with": TRACKED_WITH,
        "world_from_capture": world_from_capture.tolist(),
        "notes": notes,
    }
    try:
        subjects = [(partial, out.name, train)] + ([(partial / HELDOUT, f"{out.name}-{HELDOUT}", test)] if test else [])
        for root, name, cams in subjects:
            for j, c in enumerate(cams):
                for t, (rgb, alpha) in enumerate(capture.frames(c, rows)):
                    box = crops[c][0][t]
                    img, valid = crop_image(rgb, box, config.size)
                    mask, _ = crop_image(
                        np.repeat(np.round(alpha * 255).astype(np.uint8)[..., None], 3, axis=2), box, config.size, fill=(0, 0, 0)
                    )
                    write_frame(root, t, j, img / 255.0, mask[..., 0] / 255.0 * valid)
                    tick()
            info = SubjectInfo(
                name=name,
                width=config.size,
                height=config.size,
                num_frames=len(rows),
                num_cameras=len(cams),
                background=(1.0, 1.0, 1.0),
                split=split,
                head_model=head.name,
                source="nersemble",
                extra={
                    "nersemble": {
                        **provenance,
                        "cameras": [capture.serials[c] for c in cams],
                        "crops": {capture.serials[c]: crops[c][0].tolist() for c in cams},
                    }
                },
            )
            K = torch.from_numpy(np.stack([crops[c][1] for c in cams], axis=1))  # [T, C, 3, 3]
            w2c = torch.from_numpy(np.stack([world_to_cam[c] for c in cams]))  # [C, 4, 4], fixed cameras
            write_subject(root, info, params, K, w2c.expand(len(rows), -1, -1, -1))
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return NersembleResult(
        out,
        capture.layout,
        len(rows),
        [capture.serials[c] for c in train],
        [capture.serials[c] for c in test],
        {k: len(v) for k, v in split.items()},
        notes,
        time.perf_counter() - t0,
    )


def _choose_cameras(capture: Capture, config: NersembleConfig) -> tuple[list[int], list[int]]:
    """Indices of the subject's cameras and of the held-out ones; InputError names unknown serials."""
    index = {s: i for i, s in enumerate(capture.serials)}
    unknown = [s for s in config.cameras + config.test_cameras if s not in index]
    if unknown:
        raise InputError(f"{capture.root}: has no camera {unknown[0]}; its cameras: {', '.join(capture.serials)}")
    test = [index[s] for s in config.test_cameras]
    train = [index[s] for s in config.cameras] if config.cameras else [i for i in range(len(capture.serials)) if i not in test]
    if not train:
        raise InputError(f"{capture.root}: no camera left for the subject once {', '.join(config.test_cameras)} are held out")
    return train, test


def _split(frames: int, test_fraction: float) -> dict[str, list[int]]:
    """The last ``test_fraction`` of the frames for testing (at least one when the fraction is > 0)."""
    n_test = min(max(round(frames * test_fraction), 1 if test_fraction > 0 else 0), frames - 1)
    return {"train": list(range(frames - n_test)), "test": list(range(frames - n_test, frames))}


def _local_params(tracked: TrackedHead, rows: list[int], head: HeadModel) -> tuple[FlameParams, list[str]]:
    """The tracked parameters of ``rows`` on ``head``, without global pose; and notes on what changed.

    InputError when the parameters cannot be this head's (another vertex count, more
    coefficients than the model has).
    """
    data, source = head.data, tracked.source
    notes = list(tracked.notes)
    if head.name not in TRACKED_HEAD_NAMES:
        notes.append(
            f"the parameters were tracked with {TRACKED_WITH}; the loaded head model is '{head.name}', on which they describe another face"
        )
    v = head.num_vertices
    loaded = f"head model '{head.name}'"
    static = tracked.static_offset
    if static is not None and static.shape[0] == v + VHAP_TEETH:
        static = static[:v]
    elif static is not None and static.shape[0] != v:
        raise InputError(
            f"{source}: static_offset has {static.shape[0]} vertices, the {loaded} has {v}: load the {TRACKED_WITH} model the sequence was tracked with (--flame PATH)"
        )
    shape = tracked.shape
    if shape.size > FLAME_SHAPE_SPACE:
        raise InputError(f"{source}: {shape.size} identity coefficients; FLAME has {FLAME_SHAPE_SPACE}")
    if np.abs(shape[head.n_shape :]).max(initial=0.0) > 0:
        # Identity is linear in the template: the unused components are an exact template offset.
        extra = np.einsum("vik,k->vi", data.shapedirs[:, :, head.n_shape : shape.size], shape[head.n_shape :])
        static = extra if static is None else static + extra
        notes.append(
            f"identity components {head.n_shape}-{shape.size - 1} (the {loaded} uses {head.n_shape}) are folded into static_offset"
        )
    expr = tracked.expr[rows]
    in_model = data.shapedirs.shape[2] - FLAME_SHAPE_SPACE
    if np.abs(expr[:, in_model:]).max(initial=0.0) > 0:
        raise InputError(
            f"{source}: {expr.shape[1]} expression coefficients, the {loaded} has {in_model}: load the {TRACKED_WITH} model the sequence was tracked with (--flame PATH)"
        )
    unused = expr[:, head.n_expr : in_model]
    if np.abs(unused).max(initial=0.0) > 0:
        dirs = data.shapedirs[:, :, FLAME_SHAPE_SPACE + head.n_expr : FLAME_SHAPE_SPACE + head.n_expr + unused.shape[1]]
        # In chunks of frames: all frames of a dense head at once would take gigabytes.
        shift = max(np.linalg.norm(np.einsum("vik,tk->tvi", dirs, unused[i : i + 64]), axis=-1).max() for i in range(0, len(unused), 64))
        notes.append(
            f"expression components {head.n_expr}-{expr.shape[1] - 1} are left out (the {loaded} uses {head.n_expr}); they moved vertices by up to {shift * 1000:.1f} mm"
        )

    def width(a: np.ndarray, n: int) -> torch.Tensor:
        return torch.from_numpy(np.pad(a[..., :n], [(0, 0)] * (a.ndim - 1) + [(0, max(0, n - a.shape[-1]))]).astype(np.float32))

    t = len(rows)
    params = FlameParams(
        shape=width(shape, head.n_shape),
        expr=width(expr, head.n_expr),
        rotation=torch.zeros(t, 3),
        neck_pose=width(tracked.neck[rows], 3),
        jaw_pose=width(tracked.jaw[rows], 3),
        eyes_pose=width(tracked.eyes[rows], 6),
        translation=torch.zeros(t, 3),
        static_offset=None if static is None else torch.from_numpy(static.astype(np.float32)),
    )
    params.validate()
    return params, notes


def _pose(head: HeadModel, local: FlameParams) -> tuple[np.ndarray, np.ndarray]:
    """FLAME's root joint [T, 3] and the 68 landmarks [T, 68, 3] of the head posed without
    global rotation or translation, metres; in chunks of frames, as a long sequence of a dense
    head would not fit in memory at once."""
    roots, landmarks = [], []
    with torch.no_grad():
        for i in range(0, local.batch_size, 64):
            posed = head(local.index(slice(i, i + 64)))
            roots.append(posed.joints[:, 0].double().numpy())
            landmarks.append(posed.landmarks.double().numpy())
    return np.concatenate(roots), np.concatenate(landmarks)


def _to_flame_world(capture: Capture, rows: list[int], local: FlameParams, root: np.ndarray) -> tuple[FlameParams, np.ndarray, np.ndarray]:
    """The tracked head and cameras in FLAME's world (see the module doc).

    ``root``: [T, 3] FLAME's root joint of ``local`` (posed without global pose). Returns the
    parameters [T] with global pose, world_to_cam [C, 4, 4] (OpenCV) and the similarity
    [4, 4] that maps capture points to the new world.
    """
    tracked = capture.head
    R, t, s = tracked.rotation[rows], tracked.translation[rows], tracked.scale
    pivot = root if tracked.about_root else np.zeros_like(root)
    # The capture's head: x = s * (R (v - pivot) + pivot) + t. The new world: x' = M x / s + m.
    M = Rotation.from_matrix(R).mean().as_matrix().T
    R_new = M @ R
    # FLAME's own form x' = R' (v - J0) + J0 + T' gives T' for each frame, up to the shift m.
    base = np.einsum("tij,tj->ti", R_new, root - pivot) - root + pivot @ M.T + t @ M.T / s
    m = -base.mean(axis=0)
    params = FlameParams(
        shape=local.shape,
        expr=local.expr,
        rotation=torch.from_numpy(Rotation.from_matrix(R_new).as_rotvec().astype(np.float32)),
        neck_pose=local.neck_pose,
        jaw_pose=local.jaw_pose,
        eyes_pose=local.eyes_pose,
        translation=torch.from_numpy((base + m).astype(np.float32)),
        static_offset=local.static_offset,
    )
    world_from_capture = np.eye(4)
    world_from_capture[:3, :3] = M / s
    world_from_capture[:3, 3] = m
    # A camera point p = Rc x + tc; x = s M^T (x' - m), and p / s projects to the same pixel.
    Rc, tc = capture.world_to_cam[:, :3, :3], capture.world_to_cam[:, :3, 3]
    w2c = np.tile(np.eye(4), (len(Rc), 1, 1))
    w2c[:, :3, :3] = Rc @ M.T
    w2c[:, :3, 3] = tc / s - np.einsum("cij,j->ci", Rc @ M.T, m)
    return params, w2c, world_from_capture


def _head_ball(landmarks: np.ndarray, params: FlameParams, crop_scale: float) -> tuple[np.ndarray, float]:
    """Centres [T, 3] (metres, FLAME world) and radius of a ball around the head in each frame.

    Model-independent: from the 68 landmarks [T, 68, 3], the face's size e (its landmarks'
    largest distance, median over frames) and centre, moved back toward the skull and up
    toward the hair along the head's own axes (global rotation, then neck), so that a profile
    view frames the whole head as a frontal one does.
    """
    size = float(np.median([np.linalg.norm(p[:, None] - p[None], axis=-1).max() for p in landmarks]))
    turn = Rotation.from_rotvec(params.rotation.double().numpy()) * Rotation.from_rotvec(params.neck_pose.double().numpy())
    centres = landmarks.mean(axis=1) + turn.apply(np.array([0.0, HEAD_UP, -HEAD_BACK]) * size)
    return centres, crop_scale * size / 2


def _crops(
    centres: np.ndarray, radius: float, K: np.ndarray, world_to_cam: np.ndarray, size: int, serial: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per frame square crop boxes [T, 3] (x0, y0, side) around the head's ball seen by one camera,
    smoothed over time like a tracked video's, and the crops' intrinsics [T, 3, 3]."""
    cam = centres @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    if (cam[:, 2] <= radius).any():
        raise InputError(
            f"camera {serial} sees the head from {cam[:, 2].min():.2f} m, inside or behind it: its calibration does not fit the tracking"
        )
    uv = cam[:, :2] / cam[:, 2:3] * np.diag(K)[:2] + K[:2, 2]
    half = radius * np.diag(K)[:2] / cam[:, 2:3]  # [T, 2] pixels
    corners = np.stack([uv - half, uv + half], axis=1)  # [T, 2, 2]: the ball's bounding square
    boxes = crop_boxes(corners, CropConfig(size=size, scale=1.0, lift=0.0), [np.arange(len(uv))])
    return boxes, np.stack([crop_intrinsics(K, b, size) for b in boxes])
