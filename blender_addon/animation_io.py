"""flame_param.npz <-> keyframes on the object's FLAME properties, in bulk; ARKit face curves
(a Live Link Face CSV) -> keyframes.

Keys are written with ``keyframe_points.add`` + ``foreach_set`` (no per-frame operator). The
F-curves live in the action's channel bag for the object's slot on Blender 4.4+ (layered
actions; 5.0 removed ``Action.fcurves``) and in ``action.fcurves`` before that; the choice is
feature-detected.
"""

from __future__ import annotations

from pathlib import Path

import bpy
import numpy as np

from . import flame_data
from .flame_data import Channel, FlameAnimation

_LINEAR = "LINEAR"


def _channelbag(action: bpy.types.Action, slot: bpy.types.ActionSlot, create: bool):
    """The slot's channel bag in the action's first keyframe strip (layered actions, 4.4+);
    None when there is none and ``create`` is off."""
    if not action.layers:
        if not create:
            return None
        action.layers.new("Layer")
    layer = action.layers[0]
    if not layer.strips:
        if not create:
            return None
        layer.strips.new(type="KEYFRAME")
    return layer.strips[0].channelbag(slot, ensure=create)


def fcurve_collection(obj: bpy.types.Object, create: bool):
    """The F-curve collection animating ``obj`` (None when there is none and ``create`` is off)."""
    adt = obj.animation_data
    if adt is None:
        if not create:
            return None
        adt = obj.animation_data_create()
    if adt.action is None:
        if not create:
            return None
        adt.action = bpy.data.actions.new(f"{obj.name} FLAME")
    action = adt.action
    if not hasattr(action, "slots"):
        return action.fcurves  # Blender 4.2 / 4.3
    if adt.action_slot is None:
        if not create:
            return None
        adt.action_slot = action.slots.new(id_type="OBJECT", name=obj.name)
    bag = _channelbag(action, adt.action_slot, create)
    return None if bag is None else bag.fcurves


def import_animation(obj: bpy.types.Object, anim: FlameAnimation, frame_start: float, frame_step: float) -> int:
    """Replace the object's FLAME keyframes by ``anim``; returns the number of F-curves written."""
    fcurves = fcurve_collection(obj, create=True)
    group = getattr(obj, flame_data.PROP_GROUP)
    group.expression_count = min(anim.expr.shape[1], flame_data.MAX_EXPR)
    written = 0
    for ch, values in anim.channels():
        old = fcurves.find(ch.data_path, index=ch.index)
        if old is not None:
            fcurves.remove(old)
        fc = fcurves.new(ch.data_path, index=ch.index)
        fc.keyframe_points.add(len(values))
        fc.keyframe_points.foreach_set("co", flame_data.keyframe_coords(values, frame_start, frame_step))
        for kp in fc.keyframe_points:  # an enum: foreach_set does not take it in every version
            kp.interpolation = _LINEAR
        fc.update()
        written += 1
    if anim.shape is not None:
        obj["spatialavatar_shape"] = np.asarray(anim.shape, np.float64).tolist()
    return written


def export_animation(obj: bpy.types.Object, frame_start: float, frames: int, frame_step: float = 1.0) -> FlameAnimation:
    """Sample the FLAME F-curves at ``frame_start + k * frame_step``; un-animated channels hold the property's value.

    ``FCurve.evaluate`` applies modifiers but not drivers, NLA or constraints.
    """
    group = getattr(obj, flame_data.PROP_GROUP)
    n_expr = group.expression_count
    fcurves = fcurve_collection(obj, create=False)
    at = frame_start + frame_step * np.arange(frames, dtype=np.float64)
    template = FlameAnimation(np.zeros((1, n_expr), np.float32), {k: np.zeros((1, w), np.float32) for k, w in flame_data.POSE_FIELDS.items()})
    values: dict[Channel, np.ndarray] = {}
    for ch, _ in template.channels():
        fc = None if fcurves is None else fcurves.find(ch.data_path, index=ch.index)
        if fc is None:
            values[ch] = np.full(frames, getattr(group, ch.prop)[ch.index], np.float32)
        else:
            values[ch] = np.fromiter((fc.evaluate(float(f)) for f in at), np.float32, frames)
    shape = obj.get("spatialavatar_shape")
    return FlameAnimation.from_channels(n_expr, values, frames, None if shape is None else np.asarray(shape, np.float32), group.names())


def keyed_range(obj: bpy.types.Object) -> tuple[float, float] | None:
    """(first, last) keyed frame over the FLAME F-curves, or None."""
    fcurves = fcurve_collection(obj, create=False)
    if fcurves is None:
        return None
    lo, hi = np.inf, -np.inf
    for fc in fcurves:
        if fc.data_path.startswith(flame_data.PROP_GROUP + ".") and len(fc.keyframe_points):
            a, b = fc.range()
            lo, hi = min(lo, a), max(hi, b)
    return None if lo > hi else (float(lo), float(hi))


def _head(obj: bpy.types.Object) -> str:
    """How error messages call the object's head model."""
    return f"avatar object '{obj.name}'"


def import_file(obj: bpy.types.Object, path: str | Path, frame_start: float, file_fps: float, scene_fps: float) -> FlameAnimation:
    """Key a flame_param.npz; a file made for a head with other expression names is refused
    before anything is keyed."""
    anim = flame_data.read_flame_npz(path, getattr(obj, flame_data.PROP_GROUP).names(), _head(obj))
    import_animation(obj, anim, frame_start, flame_data.frame_step_for(file_fps, scene_fps))
    return anim


def import_arkit_file(
    obj: bpy.types.Object, path: str | Path, frame_start: float, scene_fps: float, source_fps: float
) -> tuple[FlameAnimation, tuple[str, ...]]:
    """Key a Live Link Face CSV at the scene's rate, one key per scene frame from ``frame_start``:
    the expressions by their ARKit names, the neck from the head's angles. The whole file is
    read and matched before anything is keyed. Returns the animation and the file's weights the
    head has no expression for."""
    group = getattr(obj, flame_data.PROP_GROUP)
    anim, missing = flame_data.read_arkit_csv(path, group.names(), group.expression_count, scene_fps, source_fps, _head(obj))
    import_animation(obj, anim, frame_start, 1.0)
    return anim, missing


def export_file(obj: bpy.types.Object, path: str | Path, frame_start: float, frame_end: float, frame_step: float = 1.0) -> FlameAnimation:
    frames = int(np.floor((frame_end - frame_start) / frame_step + 1e-6)) + 1
    if frames < 1:
        raise ValueError("the frame range is empty")
    anim = export_animation(obj, frame_start, frames, frame_step)
    flame_data.write_flame_npz(path, anim)
    return anim
