"""Gaussian buffers -> a vertices-only mesh with point attributes, drawn as points by Geometry Nodes.

Works the same in 4.2-5.x and in background mode (no operators): ``vertices.add`` +
``foreach_set`` with contiguous float32 arrays, then a Geometry Nodes modifier
(Mesh to Points with the radius from the ``scale`` attribute, Set Material) whose material
reads the ``color`` attribute. Attributes: ``opacity`` (float), ``scale`` (vector, standard
deviations in metres), ``rotation`` (quaternion w, x, y, z), ``color`` (linear RGBA, alpha =
opacity).
"""

from __future__ import annotations

from dataclasses import dataclass

import bpy
import numpy as np

NODE_GROUP = "SpatialAvatar Points"
MATERIAL = "SpatialAvatar Gaussians"
MODIFIER = "SpatialAvatar Points"
RADIUS_SIGMAS = 2.0  # point radius = this many times the mean standard deviation


@dataclass
class GaussianBuffers:
    """World-space Gaussians as the backend's ``deform`` returns them (statics included)."""

    positions: np.ndarray  # [N, 3]
    scales: np.ndarray  # [N, 3]
    rotations: np.ndarray  # [N, 4] w, x, y, z
    opacities: np.ndarray  # [N]
    colors: np.ndarray  # [N, 3] linear RGB

    def checked(self) -> GaussianBuffers:
        n = len(self.positions)
        want = {"positions": (n, 3), "scales": (n, 3), "rotations": (n, 4), "opacities": (n,), "colors": (n, 3)}
        for name, shape in want.items():
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(f"Gaussian buffer '{name}' must have shape {list(shape)}, got {list(np.shape(getattr(self, name)))}")
        return self


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).ravel()


def _set_attribute(mesh: bpy.types.Mesh, name: str, kind: str, key: str, values: np.ndarray) -> None:
    attr = mesh.attributes.get(name)
    if attr is None or attr.data_type != kind or attr.domain != "POINT":
        if attr is not None:
            mesh.attributes.remove(attr)
        attr = mesh.attributes.new(name, kind, "POINT")
    attr.data.foreach_set(key, _f32(values))


def fill_mesh(mesh: bpy.types.Mesh, g: GaussianBuffers) -> None:
    """Write the buffers into ``mesh`` (vertices only), resizing it when the count changed."""
    g.checked()
    n = len(g.positions)
    if len(mesh.vertices) != n:
        mesh.clear_geometry()
        mesh.vertices.add(n)
    rgba = np.empty((n, 4), np.float32)
    rgba[:, :3] = g.colors
    rgba[:, 3] = g.opacities
    _set_attribute(mesh, "opacity", "FLOAT", "value", g.opacities)
    _set_attribute(mesh, "color", "FLOAT_COLOR", "color", rgba)
    set_pose(mesh, g.positions, g.scales, g.rotations)


def set_pose(mesh: bpy.types.Mesh, positions: np.ndarray, scales: np.ndarray, rotations: np.ndarray) -> None:
    """A new pose of the same points: positions [N, 3], scales [N, 3], rotations [N, 4] (w, x, y, z).

    The per-frame path of the live preview: three ``foreach_set`` calls, colours untouched.
    """
    n = len(mesh.vertices)
    if not positions.shape == scales.shape == (n, 3) or rotations.shape != (n, 4):
        raise ValueError(f"a pose for {len(positions)} points does not fit a mesh of {n}")
    mesh.vertices.foreach_set("co", _f32(positions))
    _set_attribute(mesh, "scale", "FLOAT_VECTOR", "vector", scales)
    _set_attribute(mesh, "rotation", "QUATERNION", "value", rotations)
    mesh.update()


def read_attribute(mesh: bpy.types.Mesh, name: str) -> np.ndarray:
    """An attribute's values as a float32 array of shape [N] or [N, k] (for tests and export)."""
    attr = mesh.attributes[name]
    key, width = {"FLOAT": ("value", 1), "FLOAT_VECTOR": ("vector", 3), "QUATERNION": ("value", 4), "FLOAT_COLOR": ("color", 4)}[attr.data_type]
    out = np.empty(len(attr.data) * width, np.float32)
    attr.data.foreach_get(key, out)
    return out if width == 1 else out.reshape(-1, width)


def ensure_material() -> bpy.types.Material:
    mat = bpy.data.materials.get(MATERIAL)
    if mat is not None:
        return mat
    mat = bpy.data.materials.new(MATERIAL)
    if bpy.app.version < (5, 0, 0):
        mat.use_nodes = True  # always on (and deprecated) from 5.0
    if hasattr(mat, "surface_render_method"):
        mat.surface_render_method = "BLENDED"
    nt = mat.node_tree
    nt.nodes.clear()
    attr = nt.nodes.new("ShaderNodeAttribute")
    attr.attribute_type = "GEOMETRY"
    attr.attribute_name = "color"
    emit = nt.nodes.new("ShaderNodeEmission")
    clear = nt.nodes.new("ShaderNodeBsdfTransparent")
    mix = nt.nodes.new("ShaderNodeMixShader")
    out = nt.nodes.new("ShaderNodeOutputMaterial")
    nt.links.new(attr.outputs["Color"], emit.inputs["Color"])
    nt.links.new(attr.outputs["Alpha"], mix.inputs["Fac"])
    nt.links.new(clear.outputs[0], mix.inputs[1])
    nt.links.new(emit.outputs[0], mix.inputs[2])
    nt.links.new(mix.outputs[0], out.inputs["Surface"])
    return mat


def ensure_node_group() -> bpy.types.NodeTree:
    """Mesh to Points (radius from ``scale``) -> Set Material; built once per file."""
    ng = bpy.data.node_groups.get(NODE_GROUP)
    if ng is not None:
        return ng
    ng = bpy.data.node_groups.new(NODE_GROUP, "GeometryNodeTree")
    ng.interface.new_socket(name="Geometry", in_out="INPUT", socket_type="NodeSocketGeometry")
    ng.interface.new_socket(name="Geometry", in_out="OUTPUT", socket_type="NodeSocketGeometry")
    n = ng.nodes
    gin, gout = n.new("NodeGroupInput"), n.new("NodeGroupOutput")
    scale = n.new("GeometryNodeInputNamedAttribute")
    scale.data_type = "FLOAT_VECTOR"
    scale.inputs["Name"].default_value = "scale"
    mean = n.new("ShaderNodeVectorMath")
    mean.operation = "DOT_PRODUCT"
    mean.inputs[1].default_value = (RADIUS_SIGMAS / 3.0,) * 3
    to_points = n.new("GeometryNodeMeshToPoints")
    set_mat = n.new("GeometryNodeSetMaterial")
    set_mat.inputs["Material"].default_value = ensure_material()
    ng.links.new(scale.outputs["Attribute"], mean.inputs[0])
    ng.links.new(gin.outputs[0], to_points.inputs["Mesh"])
    ng.links.new(mean.outputs["Value"], to_points.inputs["Radius"])
    ng.links.new(to_points.outputs["Points"], set_mat.inputs["Geometry"])
    ng.links.new(set_mat.outputs["Geometry"], gout.inputs[0])
    return ng


def create_avatar_object(name: str, g: GaussianBuffers, collection: bpy.types.Collection | None = None) -> bpy.types.Object:
    """A new object holding the Gaussians as points, linked to ``collection`` (default the scene's).

    The points keep the backend's world coordinates (+y up); the object turns them +90 degrees
    about X, so the head stands upright in Blender (+z up) and faces -Y, the Front view.
    Its ``matrix_world`` is therefore the map from the backend's world into Blender's.
    """
    mesh = bpy.data.meshes.new(name)
    fill_mesh(mesh, g)
    obj = bpy.data.objects.new(name, mesh)
    obj.rotation_euler = (np.pi / 2, 0.0, 0.0)
    (collection or bpy.context.scene.collection).objects.link(obj)
    mod = obj.modifiers.new(MODIFIER, "NODES")
    mod.node_group = ensure_node_group()
    obj.data.materials.append(ensure_material())
    return obj

