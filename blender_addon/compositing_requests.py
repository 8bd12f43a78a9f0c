"""A frame's service requests, one per avatar object: from the depsgraph Blender evaluated for
the frame being rendered (``frame_requests``), or predicted from F-curves for a later frame
while Blender is still at another (``predicted_requests``), and why a scene's later frames
cannot be predicted (``unpredictable``: drivers, constraints, parents, NLA, camera markers).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import bpy
import numpy as np
from mathutils import Euler, Matrix, Quaternion, Vector

from . import animation_io, flame_data
from . import compositing_frames as frames


class CompositeError(RuntimeError):
    """A composited frame cannot be made; the message says why and what to do."""


class _Evaluated:
    """An object's inputs at the frame Blender's depsgraph evaluated (drivers, constraints, NLA included)."""

    def __init__(self, depsgraph: bpy.types.Depsgraph) -> None:
        self.depsgraph = depsgraph

    def camera(self, scene: bpy.types.Scene) -> tuple[Any, np.ndarray | None]:
        cam = self.depsgraph.scene_eval.camera
        return cam, None if cam is None else np.array(cam.matrix_world)

    def avatar(self, obj: bpy.types.Object) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        ev = obj.evaluated_get(self.depsgraph)
        return np.array(ev.matrix_world), getattr(ev, flame_data.PROP_GROUP).buffers()


# What ``frames.blender_camera`` reads of the camera's data.
_CAMERA_FIELDS = ("type", "lens", "sensor_width", "sensor_height", "sensor_fit", "shift_x", "shift_y")
_FLAME_VECTORS = (*(flame_data.expr_chunk_name(c) for c in range(flame_data.EXPR_CHUNKS)), *flame_data.POSE_FIELDS)


class _AtFrame:
    """An object's inputs at another frame, from its F-curves, without changing the current
    frame. Exact only where ``unpredictable`` finds nothing else moving them; a wrong guess
    costs a request, never a frame (requests are matched by fingerprint)."""

    def __init__(self, frame: int) -> None:
        self.frame = frame
        self._curves: dict[int, dict[tuple[str, int], bpy.types.FCurve]] = {}

    def value(self, id_data: bpy.types.ID, path: str, index: int | None = None) -> Any:
        """The property at ``path`` (element ``index``) at this frame: its F-curve, else its value now."""
        key = id_data.as_pointer()
        if key not in self._curves:
            fcurves = animation_io.fcurve_collection(id_data, create=False) or ()
            self._curves[key] = {(fc.data_path, fc.array_index): fc for fc in fcurves if not fc.mute}
        fc = self._curves[key].get((path, index or 0))
        if fc is not None:
            return fc.evaluate(self.frame)
        v = id_data.path_resolve(path)
        return v if index is None else v[index]

    def vector(self, id_data: bpy.types.ID, path: str) -> list[float]:
        return [self.value(id_data, path, i) for i in range(len(id_data.path_resolve(path)))]

    def matrix(self, obj: bpy.types.Object) -> np.ndarray:
        """``matrix_world`` of an object without parent or constraints, composed as Blender does."""
        mode = obj.rotation_mode
        if mode == "QUATERNION":
            rot = Quaternion(self.vector(obj, "rotation_quaternion")).normalized().to_matrix()
            delta = Quaternion(self.vector(obj, "delta_rotation_quaternion")).normalized().to_matrix()
        elif mode == "AXIS_ANGLE":
            angle, *axis = self.vector(obj, "rotation_axis_angle")
            rot, delta = Matrix.Rotation(angle, 3, Vector(axis)), Matrix.Identity(3)
        else:
            rot = Euler(self.vector(obj, "rotation_euler"), mode).to_matrix()
            delta = Euler(self.vector(obj, "delta_rotation_euler"), mode).to_matrix()
        loc = Vector(self.vector(obj, "location")) + Vector(self.vector(obj, "delta_location"))
        scale = Vector(self.vector(obj, "scale")) * Vector(self.vector(obj, "delta_scale"))
        return np.array(Matrix.LocRotScale(loc, delta @ rot, scale))

    def camera(self, scene: bpy.types.Scene) -> tuple[Any, np.ndarray | None]:
        cam = scene.camera
        if cam is None or cam.type != "CAMERA":
            return cam, None
        data = SimpleNamespace(**{f: self.value(cam.data, f) for f in _CAMERA_FIELDS})
        return SimpleNamespace(name=cam.name, type=cam.type, data=data), self.matrix(cam)

    def avatar(self, obj: bpy.types.Object) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        values = {n: self.vector(obj, f"{flame_data.PROP_GROUP}.{n}") for n in _FLAME_VECTORS}
        count = int(self.value(obj, f"{flame_data.PROP_GROUP}.expression_count"))
        return self.matrix(obj), flame_data.frame_buffers(values, count)


def _requests(scene: bpy.types.Scene, shown: dict[str, str], inputs: _Evaluated | _AtFrame) -> list[frames.RenderRequest]:
    """The service requests of one frame, one per avatar object (``shown``: object name -> id)."""
    cam, cam_matrix = inputs.camera(scene)
    try:
        camera = frames.blender_camera(cam, scene.render)
    except ValueError as e:
        raise CompositeError(str(e)) from e
    out = []
    for name, aid in shown.items():
        matrix, flame = inputs.avatar(scene.objects[name])
        try:
            out.append(frames.render_request(aid, camera, cam_matrix, matrix, flame, crop=True))
        except ValueError as e:
            raise CompositeError(f"object '{name}': {e}") from e
    return out


def frame_requests(scene: bpy.types.Scene, depsgraph: bpy.types.Depsgraph, shown: dict[str, str]) -> list[frames.RenderRequest]:
    """The service requests of this evaluated frame, one per avatar object (``shown``: object name -> id)."""
    return _requests(scene, shown, _Evaluated(depsgraph))


def predicted_requests(scene: bpy.types.Scene, shown: dict[str, str], frame: int) -> list[frames.RenderRequest]:
    """The requests ``frame_requests`` will make at ``frame``, from F-curves, while Blender is
    at another frame; valid where ``unpredictable`` finds nothing."""
    return _requests(scene, shown, _AtFrame(frame))


def _animation_blocker(id_data: bpy.types.ID) -> str | None:
    adt = id_data.animation_data
    if adt is None:
        return None
    if len(adt.drivers):
        return "drivers"
    if any(not t.mute for t in adt.nla_tracks):
        return "NLA strips"
    if adt.action is not None and (adt.action_influence != 1.0 or adt.action_blend_type != "REPLACE"):
        return "a blended action"
    return None


def unpredictable(scene: bpy.types.Scene, shown: dict[str, str]) -> str | None:
    """Why F-curves alone do not give later frames' camera, transforms and FLAME values
    (drivers, constraints, parents, NLA, camera markers, animated render settings), or None."""
    if any(m.camera is not None for m in scene.timeline_markers):
        return "timeline markers switch cameras"
    if why := _animation_blocker(scene):
        return f"the scene has {why}"
    if any(fc.data_path.startswith("render.") for fc in animation_io.fcurve_collection(scene, create=False) or ()):
        return "the render settings are animated"
    objects = [scene.objects[name] for name in shown]
    if scene.camera is not None:
        objects.append(scene.camera)
    for obj in objects:
        if obj.parent is not None:
            return f"object '{obj.name}' has a parent"
        if len(obj.constraints):
            return f"object '{obj.name}' has constraints"
        for id_data in (obj, obj.data):
            if id_data is not None and (why := _animation_blocker(id_data)):
                return f"'{id_data.name}' has {why}"
    return None
