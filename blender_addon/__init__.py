"""SpatialAvatar: animatable 3D Gaussian heads from the SpatialAvatar backend, in Blender.

The add-on talks to `spatialavatar serve` over ZeroMQ; it never imports torch.
"""

from __future__ import annotations

import bpy

from . import flame_props, operators, panel, preferences

classes = (
    flame_props.SPATIALAVATAR_PG_flame,
    preferences.SPATIALAVATAR_AP_preferences,
    *operators.classes,
    *panel.classes,
)


def register() -> None:
    for cls in classes:
        bpy.utils.register_class(cls)
    flame_props.register_pointer()


def unregister() -> None:
    flame_props.unregister_pointer()
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
