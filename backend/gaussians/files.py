"""Avatar files: the versioned ``.npz`` avatar and the standard 3DGS ``.ply`` export.

Avatar .npz (format "spatialavatar.avatar", version 1), all little-endian, no pickles:

| key | dtype | shape | meaning |
|---|---|---|---|
| format, version | str, int | () | identification |
| meta | str | () | JSON metadata |
| head_name, head_fingerprint | str | () | the head model it is bound to |
| shape | float32 | [S] | identity coefficients |
| static_offset | float32 | [V, 3] | optional template offset (metres) |
| face_idx | int64 | [N] | parent triangle |
| bary | float32 | [N, 3] | barycentric coordinates |
| texel | int64 | [N, 2] | (row, col) in the layout's UV grid |
| layout_resolution | int64 | () | R of that grid |
| offset, rotation, log_scale, opacity_logit, sh | float32 | [N, 3], [N, 4], [N, 3], [N], [N, K, 3] | local parameters |
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib import format as npy_format

from backend.atomic_write import atomic_path
from backend.gaussians.avatar import Avatar, LocalGaussians
from backend.gaussians.layout import Binding
from backend.gaussians.splats import Splats
from backend.head.model import HeadModelData
from backend.head.registry import check_fits
from backend.wire.errors import InputError

FORMAT = "spatialavatar.avatar"
VERSION = 1
_LOCAL_KEYS = ("offset", "rotation", "log_scale", "opacity_logit", "sh")


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype("<f4")


def avatar_arrays(avatar: Avatar) -> dict[str, np.ndarray]:
    """The avatar as the named little-endian arrays of the .npz layout above."""
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FORMAT),
        "version": np.array(VERSION, "<i8"),
        "meta": np.array(json.dumps(avatar.meta)),
        "head_name": np.array(avatar.head_name),
        "head_fingerprint": np.array(avatar.head_fingerprint),
        "shape": _f32(avatar.shape),
        "face_idx": avatar.binding.face_idx.cpu().numpy().astype("<i8"),
        "bary": _f32(avatar.binding.bary),
        "texel": avatar.binding.texel.cpu().numpy().astype("<i8"),
        "layout_resolution": np.array(avatar.binding.resolution, "<i8"),
        **{k: _f32(v) for k, v in avatar.local.tensors().items()},
    }
    if avatar.static_offset is not None:
        arrays["static_offset"] = _f32(avatar.static_offset)
    return arrays


@dataclass(frozen=True)
class FileLimits:
    """What an avatar file may hold. Checked from each array's header before its data is
    read, so a small compressed file cannot inflate past these.

    Attributes:
        max_gaussians: N.
        max_sh_degree: colour's SH degree (K = (degree + 1)^2 coefficients per channel).
        max_shape: identity coefficients S (FLAME's whole space).
        max_vertices: vertices V of a static offset.
        max_meta_bytes: the JSON metadata; it travels inside reply headers.
        max_resolution: R of the layout's UV grid.
        max_total_bytes: all arrays together, inflated.
    """

    max_gaussians: int = 4_000_000
    max_sh_degree: int = 3
    max_shape: int = 300
    max_vertices: int = 200_000
    max_meta_bytes: int = 32 * 2**10
    max_resolution: int = 16_384
    max_total_bytes: int = 2 * 2**30


# Every array a file may hold: allowed dtype kinds and its shape, in symbols bounded by
# FileLimits (N Gaussians, K SH coefficients, S identity, V vertices).
_LAYOUT: dict[str, tuple[str, tuple[str | int, ...]]] = {
    "format": ("U", ()),
    "version": ("iu", ()),
    "meta": ("U", ()),
    "head_name": ("U", ()),
    "head_fingerprint": ("U", ()),
    "shape": ("f", ("S",)),
    "static_offset": ("f", ("V", 3)),
    "face_idx": ("iu", ("N",)),
    "bary": ("f", ("N", 3)),
    "texel": ("iu", ("N", 2)),
    "layout_resolution": ("iu", ()),
    "offset": ("f", ("N", 3)),
    "rotation": ("f", ("N", 4)),
    "log_scale": ("f", ("N", 3)),
    "opacity_logit": ("f", ("N",)),
    "sh": ("f", ("N", "K", 3)),
}


def _check_header(key: str, dtype: np.dtype, shape: tuple[int, ...], sizes: dict[str, int], limits: FileLimits, source: str) -> None:
    """One array's header against ``_LAYOUT`` and the limits; ``sizes`` collects the symbols."""
    kinds, pattern = _LAYOUT[key]
    if dtype.kind not in kinds or dtype.hasobject:
        raise InputError(f"{source}: '{key}' has dtype {dtype.str}; expected {'text' if kinds == 'U' else 'numbers'} ({kinds})")
    if len(shape) != len(pattern):
        raise InputError(f"{source}: '{key}' has shape {list(shape)}; expected {list(pattern)}")
    bounds = {"N": limits.max_gaussians, "K": (limits.max_sh_degree + 1) ** 2, "S": limits.max_shape, "V": limits.max_vertices}
    for dim, want in zip(shape, pattern):
        if isinstance(want, int):
            if dim != want:
                raise InputError(f"{source}: '{key}' has shape {list(shape)}; expected {list(pattern)}")
            continue
        if dim > bounds[want]:
            what = f"SH degree {math.isqrt(dim) - 1}" if want == "K" else f"{dim} along {want}"
            raise InputError(f"{source}: '{key}' has shape {list(shape)}: {what} is more than allowed ({want} <= {bounds[want]})")
        if sizes.setdefault(want, dim) != dim:
            raise InputError(f"{source}: '{key}' has {dim} along {want}, other arrays have {sizes[want]}")
    if key == "meta" and dtype.itemsize > 4 * limits.max_meta_bytes:
        raise InputError(f"{source}: 'meta' is longer than {limits.max_meta_bytes} characters")


def _scalar_int(arrays: dict[str, np.ndarray], key: str, source: str) -> int:
    a = arrays[key]
    if a.shape != () or a.dtype.kind not in "iu":
        raise InputError(f"{source}: '{key}' must be one integer")
    return int(a)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _avatar_from_arrays(arrays: dict[str, np.ndarray], source: str, limits: FileLimits) -> Avatar:
    """The Avatar from arrays as ``_read_arrays`` returns them (every array's dtype and shape
    already checked against ``_LAYOUT``): the values checked; errors name ``source`` and the field."""
    fmt = arrays.get("format")
    if fmt is None or fmt.shape != () or str(fmt) != FORMAT:
        raise InputError(f"{source}: not a SpatialAvatar avatar file (format field missing or different)")
    if "version" not in arrays:
        raise InputError(f"{source}: 'version' is missing")
    version = _scalar_int(arrays, "version", source)
    if version != VERSION:
        raise InputError(f"{source}: avatar format version {version}; this build reads version {VERSION}")
    required = ("meta", "head_name", "head_fingerprint", "shape", "face_idx", "bary", "texel", "layout_resolution", *_LOCAL_KEYS)
    missing = [k for k in required if k not in arrays]
    if missing:
        raise InputError(f"{source}: missing arrays {missing}")
    try:
        meta = json.loads(str(arrays["meta"]), parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{source}: 'meta' is not valid JSON ({str(exc)[:120]})") from exc
    if not isinstance(meta, dict):
        raise InputError(f"{source}: 'meta' must be a JSON object")
    resolution = _scalar_int(arrays, "layout_resolution", source)
    if not 0 < resolution <= limits.max_resolution:
        raise InputError(f"{source}: 'layout_resolution' {resolution} outside [1, {limits.max_resolution}]")
    texel = arrays["texel"]
    if texel.size and (int(texel.min()) < 0 or int(texel.max()) >= resolution):
        raise InputError(f"{source}: 'texel' holds cells outside the {resolution} x {resolution} layout")
    if arrays["face_idx"].size and int(arrays["face_idx"].min()) < 0:
        raise InputError(f"{source}: 'face_idx' holds negative triangle indices")
    t = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in arrays if arrays[k].dtype.kind in "fiu"}
    n = arrays["face_idx"].shape[0]
    local = LocalGaussians(**{k: t[k].float() for k in _LOCAL_KEYS})
    local.validate(n)
    for key in ("bary", "shape", "static_offset"):
        if key in t and not bool(torch.isfinite(t[key]).all()):
            raise InputError(f"{source}: '{key}' contains NaN or Inf")
    return Avatar(
        head_name=str(arrays["head_name"]),
        head_fingerprint=str(arrays["head_fingerprint"]),
        shape=t["shape"].float(),
        binding=Binding(t["face_idx"].long(), t["bary"].float(), t["texel"].long(), resolution),
        local=local,
        static_offset=t["static_offset"].float() if "static_offset" in t else None,
        meta=meta,
    )


def check_fits_head(avatar: Avatar, data: HeadModelData, source: str) -> None:
    """Everything in ``avatar`` that depends on the head model: made on it (fingerprint),
    triangle indices in range, identity and static offset of its sizes.
    HeadModelError for another model, InputError naming the field otherwise."""
    check_fits(data, avatar.head_name, avatar.head_fingerprint)
    faces, vertices = len(data.faces), len(data.v_template)
    if avatar.count and int(avatar.binding.face_idx.max()) >= faces:
        raise InputError(f"{source}: 'face_idx' refers to triangle {int(avatar.binding.face_idx.max())}; the head model has {faces}")
    if avatar.shape.shape[0] != data.n_shape:
        raise InputError(f"{source}: 'shape' has {avatar.shape.shape[0]} identity coefficients; the head model uses {data.n_shape}")
    if avatar.static_offset is not None and tuple(avatar.static_offset.shape) != (vertices, 3):
        raise InputError(f"{source}: 'static_offset' has shape {list(avatar.static_offset.shape)}; the head model has {vertices} vertices")


def avatar_to_bytes(avatar: Avatar) -> bytes:
    """The bytes of the avatar's .npz file."""
    buf = io.BytesIO()
    np.savez(buf, **avatar_arrays(avatar))
    return buf.getvalue()


def save_avatar(avatar: Avatar, path: str | Path) -> Path:
    """Write ``avatar`` to ``path`` (.npz); written to a temporary file first, then renamed."""
    path = Path(path)
    with atomic_path(path) as scratch:
        scratch.write_bytes(avatar_to_bytes(avatar))
    return path


def avatar_from_bytes(data: bytes, source: str = "avatar bytes", limits: FileLimits = FileLimits()) -> Avatar:
    """An avatar from the bytes of an .npz file (e.g. received over the wire)."""
    return _load(io.BytesIO(data), source, limits)


def load_avatar(path: str | Path, limits: FileLimits = FileLimits()) -> Avatar:
    """Read and validate an avatar .npz; every problem is an InputError naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"avatar file not found: {path}")
    return _load(path, str(path), limits)


def _read_arrays(file: Path | io.BytesIO, source: str, limits: FileLimits) -> dict[str, np.ndarray]:
    """The .npz's arrays, each header checked before its data is inflated; unknown or
    repeated members refused."""
    sizes: dict[str, int] = {}
    arrays: dict[str, np.ndarray] = {}
    total = 0
    with zipfile.ZipFile(file) as zf:
        if "format.npy" not in zf.namelist():
            raise InputError(f"{source}: not a SpatialAvatar avatar file (format field missing)")
        for info in zf.infolist():
            key = info.filename.removesuffix(".npy")
            if key not in _LAYOUT or not info.filename.endswith(".npy"):
                raise InputError(f"{source}: unknown member '{info.filename[:80]}'")
            if key in arrays:
                raise InputError(f"{source}: '{key}' appears twice")
            with zf.open(info) as f:
                readers = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
                read_header = readers.get(npy_format.read_magic(f))
                if read_header is None:
                    raise InputError(f"{source}: '{key}' is in an .npy format version this build does not read")
                shape, _, dtype = read_header(f)
                _check_header(key, dtype, shape, sizes, limits, source)
            total += math.prod(shape) * dtype.itemsize
            if total > limits.max_total_bytes:
                raise InputError(f"{source}: its arrays hold more than {limits.max_total_bytes} bytes")
            with zf.open(info) as f:
                arrays[key] = npy_format.read_array(f, allow_pickle=False)
    return arrays


def _load(file: Path | io.BytesIO, source: str, limits: FileLimits) -> Avatar:
    try:
        arrays = _read_arrays(file, source, limits)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{source}: not a readable avatar .npz (truncated or corrupt: {exc})") from exc
    return _avatar_from_arrays(arrays, source, limits)


def export_ply(splats: Splats, sh: torch.Tensor, path: str | Path) -> Path:
    """Write one posed frame as a standard 3DGS .ply (binary little-endian).

    Properties, in the order 3DGS viewers expect: x y z nx ny nz f_dc_0..2 f_rest_* opacity
    scale_0..2 rot_0..3. Opacity is stored as a logit, scales as logs, rotation (w, x, y, z)
    normalized, f_rest channel-major as in 3DGS. Blender's own PLY importer reads this layout
    as a Gaussian-splat point cloud (docs/blender.md). Coordinates are the backend's world
    (+y up, the face towards +z).

    Args:
        splats: unbatched Splats of the frame (means, quats, scales, opacities used).
        sh: [N, K, 3] the avatar's SH coefficients (view-independent under posing).
    """
    from plyfile import PlyData, PlyElement

    if splats.batched:
        raise InputError("export_ply takes one frame")
    n = splats.count
    means = _f32(splats.means)
    quats = _f32(torch.nn.functional.normalize(splats.quats, dim=-1))
    log_scales = _f32(torch.log(splats.scales.clamp_min(1e-12)))
    opac = splats.opacities.clamp(1e-6, 1 - 1e-6)
    opacity_logit = _f32(torch.log(opac) - torch.log1p(-opac))
    sh_np = _f32(sh)
    f_dc = sh_np[:, 0]
    f_rest = sh_np[:, 1:].transpose(0, 2, 1).reshape(n, -1)  # channel-major, like 3DGS
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(f_rest.shape[1])]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    columns = np.concatenate([means, np.zeros((n, 3), "<f4"), f_dc, f_rest, opacity_logit[:, None], log_scales, quats], axis=1)
    record = np.empty(n, dtype=[(name, "<f4") for name in names])
    for i, name in enumerate(names):
        record[name] = columns[:, i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    PlyData([PlyElement.describe(record, "vertex")], byte_order="<").write(str(path))
    return path
