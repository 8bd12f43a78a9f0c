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
import zipfile
from pathlib import Path

import numpy as np
import torch

from backend.errors import InputError
from backend.gaussians.avatar import Avatar, LocalGaussians
from backend.gaussians.layout import Binding
from backend.gaussians.splats import Splats

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


def avatar_from_arrays(arrays: dict[str, np.ndarray], source: str) -> Avatar:
    """Validate arrays in the .npz layout and build the Avatar; errors name ``source`` and the field."""
    if str(arrays.get("format", "")) != FORMAT:
        raise InputError(f"{source}: not a SpatialAvatar avatar file (format field missing or different)")
    version = int(arrays.get("version", -1))
    if version != VERSION:
        raise InputError(f"{source}: avatar format version {version}; this build reads version {VERSION}")
    required = ("meta", "head_name", "head_fingerprint", "shape", "face_idx", "bary", "texel", "layout_resolution", *_LOCAL_KEYS)
    missing = [k for k in required if k not in arrays]
    if missing:
        raise InputError(f"{source}: missing arrays {missing}")
    try:
        meta = json.loads(str(arrays["meta"]))
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: 'meta' is not valid JSON ({exc})") from exc
    n = arrays["face_idx"].shape[0]
    if arrays["face_idx"].ndim != 1 or arrays["bary"].shape != (n, 3) or arrays["texel"].shape != (n, 2):
        raise InputError(f"{source}: binding arrays disagree (face_idx {arrays['face_idx'].shape}, bary {arrays['bary'].shape}, texel {arrays['texel'].shape})")
    t = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in arrays if arrays[k].dtype.kind in "fiu"}
    local = LocalGaussians(**{k: t[k].float() for k in _LOCAL_KEYS})
    local.validate(n)
    if not bool(torch.isfinite(t["bary"]).all()) or not bool(torch.isfinite(t["shape"]).all()):
        raise InputError(f"{source}: binding or shape contains NaN or Inf")
    return Avatar(
        head_name=str(arrays["head_name"]),
        head_fingerprint=str(arrays["head_fingerprint"]),
        shape=t["shape"].float(),
        binding=Binding(t["face_idx"].long(), t["bary"].float(), t["texel"].long(), int(arrays["layout_resolution"])),
        local=local,
        static_offset=t["static_offset"].float() if "static_offset" in t else None,
        meta=meta,
    )


def avatar_to_bytes(avatar: Avatar) -> bytes:
    """The bytes of the avatar's .npz file."""
    buf = io.BytesIO()
    np.savez(buf, **avatar_arrays(avatar))
    return buf.getvalue()


def save_avatar(avatar: Avatar, path: str | Path) -> Path:
    """Write ``avatar`` to ``path`` (.npz); written to a temporary file first, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(avatar_to_bytes(avatar))
    tmp.replace(path)
    return path


def avatar_from_bytes(data: bytes, source: str = "avatar bytes") -> Avatar:
    """An avatar from the bytes of an .npz file (e.g. received over the wire)."""
    return _load(io.BytesIO(data), source)


def load_avatar(path: str | Path) -> Avatar:
    """Read and validate an avatar .npz; every problem is an InputError naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"avatar file not found: {path}")
    return _load(path, str(path))


def _load(file: Path | io.BytesIO, source: str) -> Avatar:
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise InputError(f"{source}: not a readable avatar .npz (truncated or corrupt: {exc})") from exc
    return avatar_from_arrays(arrays, source)


def export_ply(splats: Splats, sh: torch.Tensor, path: str | Path) -> Path:
    """Write one posed frame as a standard 3DGS .ply (binary little-endian).

    Properties, in the order 3DGS viewers expect: x y z nx ny nz f_dc_0..2 f_rest_* opacity
    scale_0..2 rot_0..3. Opacity is stored as a logit, scales as logs, rotation (w, x, y, z)
    normalized, f_rest channel-major as in 3DGS.

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
