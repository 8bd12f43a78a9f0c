"""NeRSemble captures as their public releases lay them out, read into one description.

Two layouts, told apart by what the sequence folder holds (docs/tracking.md, "NeRSemble"):

``release`` -- a sequence of the NeRSemble dataset or of its benchmark, as their download
toolkits (``nersemble-data``, ``nersemble-benchmark``) write it, ``<participant>/sequences/<SEQ>/``::

    images/cam_<serial>.mp4              one video per camera
    alpha_maps/cam_<serial>.mp4          foreground alpha per camera
    tracking/flame2023_tracking.npz      FLAME 2023 tracking: shape [1, 300], expression [T, 100],
                                         rotation [T, 3] (Euler 'XYZ'), rotation_matrices [T, 3, 3],
                                         translation [T, 3], jaw [T, 3], neck [T, 3], eyes [T, 6],
                                         scale [1, 1], frames [T]; row i is video frame i
    ../../calibration/camera_params.json world_2_cam {serial: [4, 4]} (world -> OpenCV camera),
                                         intrinsics [3, 3] shared or {serial: [3, 3]}, OpenCV pixels

  The tracked head is ``x = scale * R @ v + t`` with v FLAME posed without global rotation or
  translation, in the calibration's world.

``export`` -- a GaussianAvatars / VHAP export (VHAP's ``export_as_nerf_dataset``; the
preprocessed NeRSemble sequences GaussianAvatars publishes)::

    transforms.json                      (or transforms_train/_val/_test.json) frames with
                                         timestep_index, camera_index, camera_id, fl_x, fl_y, cx,
                                         cy, w, h, transform_matrix (camera -> world, OpenGL axes:
                                         y up, z backward), file_path, fg_mask_path, flame_param_path
    images/TTTTT_CC.png, fg_masks/TTTTT_CC.png
    flame_param/TTTTT.npz                VHAP layout: shape [300], expr [1, 100], rotation,
                                         neck_pose, jaw_pose, translation [1, 3], eyes_pose [1, 6],
                                         static_offset [1, V, 3] (V counts the 120 teeth vertices
                                         VHAP's FLAME appends)

  The tracked head is FLAME's own: rotation about the root joint, then translation, in metres.

Both come out as a ``Capture``: fixed cameras in our pixel convention (pixel (0, 0)'s centre
at (0.5, 0.5)), the tracked parameters as stated, and a reader of the frames.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy.spatial.transform import Rotation

from backend.tracking.images import load_image
from backend.tracking.video import FrameRange, VideoSource
from backend.wire.errors import InputError

RELEASE = "release"
EXPORT = "export"
# Every public NeRSemble tracking (the benchmark's, GaussianAvatars' release) used FLAME 2023.
TRACKED_WITH = "FLAME 2023"
# The calibration's intrinsics are for full-resolution frames; frames downscaled by these factors are recognised.
DOWNSCALES = (1, 2, 4, 8)
EXPORT_FILES = ("transforms.json", "transforms_train.json", "transforms_val.json", "transforms_test.json")
NO_TRACKING_HINT = (
    "this converter needs tracked FLAME parameters and does not fit FLAME to several views itself: "
    "use the benchmark's FLAME tracking, or track the sequence with VHAP and convert its export "
    "(or track one camera's video with `spatialavatar track` for a monocular subject)"
)

Frames = Callable[[int, list[int]], Iterator[tuple[np.ndarray, np.ndarray]]]


@dataclass
class TrackedHead:
    """Tracked FLAME parameters of T frames, as the capture states them.

    Attributes:
        shape: [S] identity coefficients.
        expr: [T, E] expression coefficients.
        neck, jaw: [T, 3] axis-angle; eyes: [T, 6] (left, right).
        static_offset: [V', 3] template offset in metres, or None.
        rotation: [T, 3, 3] the head's global rotation in the capture's world.
        translation: [T, 3] capture units.
        scale: capture units per FLAME metre (the head is ``scale`` times FLAME's size).
        about_root: True: x = R (v - J0) + J0 + t with J0 FLAME's root joint (VHAP, FLAME);
            False: x = scale * R v + t (the benchmark's tracking).
        source: the file the parameters came from, for messages.
        notes: what the reader left out, for the conversion's summary.
    """

    shape: np.ndarray
    expr: np.ndarray
    neck: np.ndarray
    jaw: np.ndarray
    eyes: np.ndarray
    static_offset: np.ndarray | None
    rotation: np.ndarray
    translation: np.ndarray
    scale: float
    about_root: bool
    source: str
    notes: tuple[str, ...] = ()


@dataclass
class Capture:
    """One NeRSemble sequence as read from disk.

    Attributes:
        layout: RELEASE or EXPORT.
        root: the sequence folder.
        serials: camera names, in the capture's order.
        K: [C, 3, 3] intrinsics in pixels of the frames as stored (pixel (0, 0)'s centre at 0.5).
        world_to_cam: [C, 4, 4] world -> OpenCV camera (x right, y down, z forward), capture units.
        frame_ids: [T] the capture's number of each tracked frame.
        head: the tracked parameters.
        frames: ``frames(c, rows)`` yields (rgb [H, W, 3] uint8, alpha [H, W] float32 in [0, 1])
            of camera c for the tracked frames ``rows`` (ascending), in that order.
    """

    layout: str
    root: Path
    serials: list[str]
    K: np.ndarray
    world_to_cam: np.ndarray
    frame_ids: list[int]
    head: TrackedHead
    frames: Frames


def read_capture(folder: Path, calibration: Path | None = None) -> Capture:
    """The capture in ``folder``, either layout; InputError names the file that is missing or wrong."""
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder (give a NeRSemble sequence folder)")
    if any((folder / name).is_file() for name in EXPORT_FILES):
        return _read_export(folder)
    if (folder / "images").is_dir() and any((folder / "images").glob("cam_*.mp4")):
        return _read_release(folder, calibration)
    raise InputError(
        f"{folder}: not a NeRSemble sequence: expected images/cam_<serial>.mp4 (the dataset's or benchmark's "
        f"release) or transforms.json (a GaussianAvatars / VHAP export)"
    )


# -- the dataset's and benchmark's release --------------------------------------------------


def _read_release(seq: Path, calibration: Path | None) -> Capture:
    videos = {p.stem[len("cam_") :]: p for p in sorted((seq / "images").glob("cam_*.mp4"))}
    calib_path = calibration or _find_calibration(seq)
    world_2_cam, intrinsics = _read_calibration(calib_path)
    unknown = [s for s in videos if s not in world_2_cam or (isinstance(intrinsics, dict) and s not in intrinsics)]
    if unknown:
        raise InputError(
            f"{calib_path}: has no calibration for camera {unknown[0]} (images/cam_{unknown[0]}.mp4); cameras there: {sorted(world_2_cam)}"
        )
    serials = list(videos)
    # The tracking first: a raw release has neither it nor alpha maps, and it is what matters.
    head = _read_benchmark_tracking(seq / "tracking" / "flame2023_tracking.npz")
    alphas = {s: seq / "alpha_maps" / f"cam_{s}.mp4" for s in serials}
    missing = [p for p in alphas.values() if not p.is_file()]
    if missing:
        raise InputError(f"{missing[0]}: missing; the conversion needs each camera's alpha map video (the benchmark ships alpha_maps/)")
    K, w2c = [], []
    for s in serials:
        width, height = _video_size(videos[s])
        K.append(_frame_intrinsics(np.asarray(intrinsics[s] if isinstance(intrinsics, dict) else intrinsics), width, height, calib_path, s))
        w2c.append(np.asarray(world_2_cam[s], np.float64))
    n = head.expr.shape[0]

    def frames(c: int, rows: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        s = serials[c]
        for rgb, alpha in zip(_video_frames(videos[s], rows), _video_frames(alphas[s], rows)):
            yield rgb, alpha[..., 0].astype(np.float32) / 255.0

    return Capture(RELEASE, seq, serials, np.stack(K), np.stack(w2c), list(range(n)), head, frames)


def _find_calibration(seq: Path) -> Path:
    """The participant's calibration/camera_params.json (two levels up), or one beside the sequence."""
    candidates = [seq.parent.parent / "calibration" / "camera_params.json", seq / "camera_params.json"]
    for p in candidates:
        if p.is_file():
            return p
    raise InputError(
        f"{candidates[0]}: missing (nor is there {candidates[1]}); give the participant's camera_params.json with --calibration"
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _read_calibration(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray | dict[str, np.ndarray]]:
    """world_2_cam {serial: [4, 4]} and intrinsics ([3, 3] or {serial: [3, 3]}), checked."""
    data = _read_json(path)
    try:
        w2c = {str(s): np.asarray(m, np.float64) for s, m in data["world_2_cam"].items()}
        raw = data["intrinsics"]
        intr = {str(s): np.asarray(m, np.float64) for s, m in raw.items()} if isinstance(raw, dict) else np.asarray(raw, np.float64)
    except (KeyError, AttributeError, TypeError, ValueError) as exc:
        raise InputError(
            f"{path}: needs world_2_cam {{serial: 4x4}} and intrinsics (3x3, or {{serial: 3x3}}) ({type(exc).__name__}: {exc})"
        ) from exc
    for s, m in w2c.items():
        if m.shape != (4, 4) or not np.isfinite(m).all() or not _is_rotation(m[:3, :3]):
            raise InputError(f"{path}: world_2_cam of camera {s} is not a 4x4 rigid transform")
    for s, k in intr.items() if isinstance(intr, dict) else [("(shared)", intr)]:
        if k.shape != (3, 3) or not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0:
            raise InputError(f"{path}: intrinsics of camera {s} are not a 3x3 matrix with positive focal lengths")
    return w2c, intr


def _is_rotation(R: np.ndarray) -> bool:
    return bool(np.allclose(R @ R.T, np.eye(3), atol=1e-4) and np.linalg.det(R) > 0)


def _frame_intrinsics(K_cv: np.ndarray, width: int, height: int, calib_path: Path, serial: str) -> np.ndarray:
    """OpenCV intrinsics of the full-resolution frames -> ours for frames of width x height.

    OpenCV puts pixel (0, 0)'s centre at (0, 0), we at (0.5, 0.5); frames downscaled by a
    power of two (DOWNSCALES) are recognised by where the principal point falls.
    """
    K = np.array(K_cv, np.float64)
    K[:2, 2] += 0.5
    off = {d: abs(K[0, 2] / d / width - 0.5) + abs(K[1, 2] / d / height - 0.5) for d in DOWNSCALES}
    d = min(off, key=off.__getitem__)
    if off[d] > 0.3:
        raise InputError(
            f"{calib_path}: the intrinsics of camera {serial} (principal point {K_cv[0, 2]:.0f}, {K_cv[1, 2]:.0f}) do not fit its {width}x{height} frames at any downscale of {DOWNSCALES}"
        )
    K[:2] /= d
    return K


def _read_benchmark_tracking(path: Path) -> TrackedHead:
    if not path.is_file():
        raise InputError(f"{path}: missing; {NO_TRACKING_HINT}")
    z = _load_npz(path)
    need = ("shape", "expression", "translation", "jaw", "neck", "eyes", "scale")
    absent = [k for k in need if k not in z] + ([] if "rotation" in z or "rotation_matrices" in z else ["rotation"])
    if absent:
        raise InputError(f"{path}: lacks {', '.join(absent)} (a NeRSemble benchmark FLAME tracking has {', '.join(need)}, rotation)")
    expr = np.asarray(z["expression"], np.float64)
    t = expr.shape[0]
    _check_rows(path, {"translation": 3, "jaw": 3, "neck": 3, "eyes": 6}, z, t)
    R = _benchmark_rotations(path, z, t)
    scale = np.asarray(z["scale"], np.float64).reshape(-1)
    if scale.size != 1 or not scale[0] > 0:
        raise InputError(f"{path}: 'scale' must be one positive number, got {scale.tolist()}")
    return TrackedHead(
        shape=np.asarray(z["shape"], np.float64).reshape(-1),
        expr=expr,
        neck=np.asarray(z["neck"], np.float64),
        jaw=np.asarray(z["jaw"], np.float64),
        eyes=np.asarray(z["eyes"], np.float64),
        static_offset=None,
        rotation=R,
        translation=np.asarray(z["translation"], np.float64),
        scale=float(scale[0]),
        about_root=False,
        source=str(path),
    )


def _benchmark_rotations(path: Path, z: dict[str, np.ndarray], t: int) -> np.ndarray:
    """[T, 3, 3] from rotation_matrices, checked against the Euler angles when both are there."""
    euler = None
    if "rotation" in z:
        _check_rows(path, {"rotation": 3}, z, t)
        # The benchmark's toolkit builds the pose with scipy's intrinsic 'XYZ' convention.
        euler = Rotation.from_euler("XYZ", np.asarray(z["rotation"], np.float64)).as_matrix()
    if "rotation_matrices" not in z:
        assert euler is not None
        return euler
    R = np.asarray(z["rotation_matrices"], np.float64)
    if R.shape != (t, 3, 3) or not all(_is_rotation(r) for r in R):
        raise InputError(f"{path}: 'rotation_matrices' must be [{t}, 3, 3] rotations, got {list(R.shape)}")
    if euler is not None and not np.allclose(R, euler, atol=1e-3):
        raise InputError(
            f"{path}: 'rotation' (Euler XYZ) and 'rotation_matrices' disagree; the file does not follow the benchmark's conventions"
        )
    return R


def _video_size(path: Path) -> tuple[int, int]:
    rgb = next(iter(_video_frames(path, [0])))
    return rgb.shape[1], rgb.shape[0]


def _video_frames(path: Path, rows: list[int]) -> Iterator[np.ndarray]:
    """Frames ``rows`` (ascending decode order numbers) of a video, [H, W, 3] uint8."""
    wanted = set(rows)
    last = max(rows)
    for k, frame in enumerate(VideoSource(path, FrameRange()).frames()):
        if k in wanted:
            yield frame.rgb
        if k == last:
            return
    raise InputError(f"{path}: ends after {k + 1} frames; the tracking covers frame {last}")


# -- GaussianAvatars / VHAP export ------------------------------------------------------------


def _read_export(folder: Path) -> Capture:
    entries, index_path = _export_entries(folder)
    cams: dict[int, dict] = {}
    grid: dict[int, dict[int, dict]] = {}
    for e in entries:
        try:
            ti, ci = int(e["timestep_index"]), int(e["camera_index"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{index_path}: a frame lacks timestep_index or camera_index ({exc})") from exc
        cams.setdefault(ci, e)
        grid.setdefault(ti, {})[ci] = e
    order = sorted(cams)
    timesteps = sorted(grid)
    for ti in timesteps:
        absent = [c for c in order if c not in grid[ti]]
        if absent:
            raise InputError(
                f"{index_path}: timestep {ti} has no frame of camera {_serial(cams[absent[0]])}; every camera needs every timestep"
            )
    serials = [_serial(cams[c]) for c in order]
    K, w2c = [], []
    for c in order:
        k, m = _export_camera(cams[c], index_path)
        for ti in timesteps:
            k2, m2 = _export_camera(grid[ti][c], index_path)
            if not (np.allclose(k, k2, atol=1e-4) and np.allclose(m, m2, atol=1e-6)):
                raise InputError(
                    f"{index_path}: camera {_serial(cams[c])} moves between timesteps {timesteps[0]} and {ti}; the converter takes fixed cameras"
                )
        K.append(k)
        w2c.append(m)
    for e in entries:
        for key in ("file_path", "fg_mask_path", "flame_param_path"):
            if key not in e:
                hint = NO_TRACKING_HINT if key == "flame_param_path" else "export with foreground masks"
                raise InputError(f"{index_path}: frame {e.get('file_path', '?')} has no {key}; {hint}")
            if not (folder / e[key]).is_file():
                raise InputError(f"{folder / e[key]}: missing (named in {index_path.name})")
    head = _read_vhap_params([folder / grid[ti][order[0]]["flame_param_path"] for ti in timesteps])

    def frames(c: int, rows: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        cam = cams[order[c]]
        for row in rows:
            e = grid[timesteps[row]][order[c]]
            rgb = load_image(folder / e["file_path"])
            alpha = _read_mask(folder / e["fg_mask_path"])
            size = (int(cam.get("w", rgb.shape[1])), int(cam.get("h", rgb.shape[0])))
            if (rgb.shape[1], rgb.shape[0]) != size or alpha.shape != rgb.shape[:2]:
                raise InputError(f"{folder / e['file_path']}: image or mask is not {size[0]}x{size[1]} as {index_path.name} says")
            yield rgb, alpha

    return Capture(EXPORT, folder, serials, np.stack(K), np.stack(w2c), timesteps, head, frames)


def _export_entries(folder: Path) -> tuple[list[dict], Path]:
    """The frames of transforms.json, else of the train/val/test files together (each frame once),
    with the top level's shared intrinsics filled in."""
    paths = (
        [folder / EXPORT_FILES[0]]
        if (folder / EXPORT_FILES[0]).is_file()
        else [folder / n for n in EXPORT_FILES[1:] if (folder / n).is_file()]
    )
    seen: dict[str, dict] = {}
    for path in paths:
        data = _read_json(path)
        shared = {k: v for k, v in data.items() if k in ("fl_x", "fl_y", "cx", "cy", "w", "h")}
        frames = data.get("frames")
        if not isinstance(frames, list) or not frames:
            raise InputError(f"{path}: has no frames")
        for f in frames:
            if not isinstance(f, dict):
                raise InputError(f"{path}: a frame is not a JSON object")
            seen.setdefault(str(f.get("file_path")), {**shared, **f})
    return list(seen.values()), paths[0]


def _serial(entry: dict) -> str:
    return str(entry.get("camera_id", entry["camera_index"]))


def _export_camera(e: dict, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(K [3, 3], world_to_cam [4, 4] OpenCV) of one transforms.json frame."""
    try:
        K = np.array([[float(e["fl_x"]), 0.0, float(e["cx"])], [0.0, float(e["fl_y"]), float(e["cy"])], [0.0, 0.0, 1.0]])
        c2w = np.asarray(e["transform_matrix"], np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: frame {e.get('file_path', '?')} lacks a camera (fl_x, fl_y, cx, cy, transform_matrix: {exc})") from exc
    if c2w.shape != (4, 4) or not np.isfinite(c2w).all() or not _is_rotation(c2w[:3, :3]):
        raise InputError(f"{path}: frame {e.get('file_path', '?')}: transform_matrix is not a 4x4 rigid camera-to-world transform")
    c2w = c2w.copy()
    c2w[:3, 1:3] *= -1.0  # OpenGL camera axes (y up, z backward) -> OpenCV (y down, z forward)
    return K, np.linalg.inv(c2w)


def _read_vhap_params(paths: list[Path]) -> TrackedHead:
    """One VHAP flame_param .npz per timestep -> the sequence; identity must be the same in all."""
    need = ("shape", "expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "translation")
    rows: dict[str, list[np.ndarray]] = {k: [] for k in need[1:]}
    first: dict[str, np.ndarray] = {}
    notes: list[str] = []
    for path in paths:
        z = _load_npz(path)
        absent = [k for k in need if k not in z]
        if absent:
            raise InputError(f"{path}: lacks {', '.join(absent)} (a VHAP flame_param file has {', '.join(need)})")
        for k, values in rows.items():
            values.append(np.asarray(z[k], np.float64).reshape(-1))
        if not first:
            first = z
            continue
        for k in ("shape", "static_offset"):
            if (k in z) != (k in first) or (k in z and not np.allclose(z[k], first[k], atol=1e-6)):
                raise InputError(f"{path}: '{k}' differs from {paths[0].name}'s; one sequence has one identity")
        if "dynamic_offset" in z and np.abs(z["dynamic_offset"]).max() > 0 and not notes:
            notes.append(f"{path.parent}: per-frame dynamic_offset is not part of a subject and was left out")
    widths = {"expr": None, "rotation": 3, "neck_pose": 3, "jaw_pose": 3, "eyes_pose": 6, "translation": 3}
    arrays = {}
    for k, w in widths.items():
        sizes = {a.size for a in rows[k]}
        if len(sizes) != 1 or (w is not None and sizes != {w}):
            raise InputError(
                f"{paths[0].parent}: '{k}' has {sorted(sizes)} values per frame across the files, expected {w or 'the same count'}"
            )
        arrays[k] = np.stack(rows[k])
    static = first.get("static_offset")
    return TrackedHead(
        shape=np.asarray(first["shape"], np.float64).reshape(-1),
        expr=arrays["expr"],
        neck=arrays["neck_pose"],
        jaw=arrays["jaw_pose"],
        eyes=arrays["eyes_pose"],
        static_offset=None if static is None else np.asarray(static, np.float64).reshape(-1, 3),
        rotation=Rotation.from_rotvec(arrays["rotation"]).as_matrix(),
        translation=arrays["translation"],
        scale=1.0,
        about_root=True,
        source=str(paths[0].parent),
        notes=tuple(notes),
    )


def _check_rows(path: Path, widths: dict[str, int], z: dict[str, np.ndarray], t: int) -> None:
    for k, w in widths.items():
        if np.shape(z[k]) != (t, w):
            raise InputError(f"{path}: '{k}' has shape {list(np.shape(z[k]))}, expected [{t}, {w}]")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except Exception as exc:  # numpy raises several types for damaged archives
        raise InputError(f"{path}: not a readable .npz file ({exc})") from exc
    bad = [k for k, a in arrays.items() if a.dtype.kind in "fi" and not np.isfinite(a).all()]
    if bad:
        raise InputError(f"{path}: '{bad[0]}' contains NaN or Inf")
    return arrays


def _read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: unreadable mask ({exc})") from exc
