"""The 3DGS .ply export as Blender reads it: the file goes through Blender's own PLY reader
(the bpy module's ``wm.ply_import``, which keeps every extra vertex property as an attribute),
and the attributes are then decoded as Blender's Gaussian-splat importer decodes them
(``convert_gsplat_ply_to_point_cloud`` in source/blender/io/ply/importer/ply_import_gsplat.cc):
f_dc_0..2 as the DC term, sigmoid(opacity), exp(scale_*), rot_0..3 as a (w, x, y, z)
quaternion it normalizes, and f_rest_* channel-major (coefficient d of channel c at
d + c * n, n = the file's f_rest count / 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.gaussians.avatar import deform
from backend.gaussians.files import export_ply
from backend.gaussians.frames import quat_to_matrix
from backend.gaussians.surface import surface_avatar
from backend.head.model import HeadModel

pytestmark = pytest.mark.blender

# The properties whose absence makes Blender import a plain mesh instead of a splat cloud
# (``is_data_gaussian_splat`` in source/blender/io/ply/importer/ply_import.cc).
REQUIRED = ("f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
SH_DIMENSIONS = {0: 0, 1: 3, 2: 8, 3: 15, 4: 24}  # SH coefficients per channel past the DC term, by degree


def _sh_degree(coefficients: int) -> int:
    """Blender's ``degree_for_dimension``: the highest degree whose coefficients the file holds."""
    return max(d for d, n in SH_DIMENSIONS.items() if n <= coefficients)


def _decode_as_blender(attrs: dict[str, np.ndarray]) -> dict[str, np.ndarray | int]:
    """The splat attributes Blender's importer makes of a PLY's vertex properties."""
    missing = [name for name in REQUIRED if name not in attrs]
    assert not missing, f"Blender would import a mesh, not splats: {missing} missing"
    rest = []
    while f"f_rest_{len(rest)}" in attrs:
        rest.append(attrs[f"f_rest_{len(rest)}"])
    assert len(rest) % 3 == 0, "Blender drops the SH of a file whose f_rest count is not a multiple of 3"
    n = len(rest) // 3
    degree = _sh_degree(n)
    assert SH_DIMENSIONS[degree] == n, "Blender imports only the complete SH bands"
    quat = np.stack([attrs[f"rot_{i}"] for i in range(4)], axis=1)
    sh = np.zeros((len(quat), n, 3), np.float32)
    for d in range(n):  # Blender's loop over the coefficients it imports
        sh[:, d] = np.stack([rest[d], rest[d + n], rest[d + 2 * n]], axis=1)
    return {
        "radiance_base": np.stack([attrs["f_dc_0"], attrs["f_dc_1"], attrs["f_dc_2"]], axis=1),
        "alpha": 1.0 / (1.0 + np.exp(-attrs["opacity"])),
        "scale": np.exp(np.stack([attrs[f"scale_{i}"] for i in range(3)], axis=1)),
        "rotation": quat / np.linalg.norm(quat, axis=1, keepdims=True),  # (w, x, y, z)
        "sh": sh,
        "sh_degree": degree,
    }


def _read_with_blender(path, **axes: str):  # type: ignore[no-untyped-def]
    """Blender's PLY reader on ``path``: the new object and its per-point attributes by name."""
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    assert bpy.ops.wm.ply_import(filepath=str(path), **axes) == {"FINISHED"}
    (obj,) = bpy.data.objects
    mesh = obj.data
    assert len(mesh.edges) == 0 and len(mesh.polygons) == 0  # vertices only, as the splat importer requires
    attrs = {}
    for a in mesh.attributes:
        if a.domain == "POINT" and a.data_type == "FLOAT":
            values = np.empty(len(mesh.vertices), np.float32)
            a.data.foreach_get("value", values)
            attrs[a.name] = values
    positions = np.empty(3 * len(mesh.vertices), np.float32)
    mesh.vertices.foreach_get("co", positions)
    return obj, positions.reshape(-1, 3), attrs


@pytest.mark.parametrize("degree", [0, 1, 3])
def test_blender_reads_the_exported_splats(head: HeadModel, tmp_path, degree: int) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(degree)
    avatar = surface_avatar(head, torch.zeros(head.n_shape), 1500, lambda f, b: torch.full((f.shape[0], 3), 0.5))
    avatar.local.rotation = torch.randn(avatar.count, 4, generator=gen)  # turned Gaussians: the quaternion order shows
    avatar.local.log_scale = avatar.local.log_scale + torch.randn(avatar.count, 3, generator=gen) * 0.3
    sh = torch.randn(avatar.count, (degree + 1) ** 2, 3, generator=gen)
    splats = deform(avatar, head, head.neutral_params(1)).frame(0)
    path = export_ply(splats, sh, tmp_path / "head.ply")

    obj, positions, attrs = _read_with_blender(path, forward_axis="NEGATIVE_Z", up_axis="Y")
    got = _decode_as_blender(attrs)
    np.testing.assert_allclose(positions, splats.means.numpy(), atol=1e-6)
    np.testing.assert_allclose(got["scale"], splats.scales.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got["alpha"], splats.opacities.numpy(), atol=1e-5)
    rotation = quat_to_matrix(torch.from_numpy(got["rotation"]).float())
    np.testing.assert_allclose(rotation.numpy(), quat_to_matrix(splats.quats).numpy(), atol=1e-5)
    np.testing.assert_allclose(got["radiance_base"], sh[:, 0].numpy(), atol=1e-6)
    assert got["sh_degree"] == degree
    np.testing.assert_allclose(got["sh"], sh[:, 1:].numpy(), atol=1e-6)
    # With Forward -Z and Up Y, the imported object stands the head up as the add-on's avatar
    # objects do (+90 degrees about X: the backend's +y up becomes Blender's +z).
    np.testing.assert_allclose(np.array(obj.matrix_world), [[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], atol=1e-6)
    assert math.isclose(obj.rotation_euler.x, math.pi / 2, abs_tol=1e-6)
