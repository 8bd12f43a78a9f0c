"""SpatialAvatar: animatable 3D Gaussian heads from the SpatialAvatar backend, in Blender.

The add-on talks to `spatialavatar serve` over ZeroMQ; it never imports torch.
"""

from __future__ import annotations

import bpy

from . import compositing, flame_props, operators, operators_jobs, panel, preferences, runtime, scene_props

classes = (
    flame_props.SPATIALAVATAR_PG_flame,
    *scene_props.classes,
    preferences.SPATIALAVATAR_AP_preferences,
    *operators.classes,
    *operators_jobs.classes,
    *panel.classes,
)


def register() -> None:
    for cls in classes:
        bpy.utils.register_class(cls)
    flame_props.register_pointer()
    scene_props.register_pointer()
    panel.register()
    runtime.register()
    compositing.register()


def unregister() -> None:
    compositing.unregister()
    runtime.unregister()
    panel.unregister()
    scene_props.unregister_pointer()
    flame_props.unregister_pointer()
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
