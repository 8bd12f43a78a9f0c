"""Avatar objects: a backend avatar's points in a new object, and which avatar an object shows."""

from __future__ import annotations

from typing import Any

import bpy
import numpy as np

from . import flame_data, pointcloud

AVATAR_ID = "spatialavatar_avatar"  # custom property on avatar objects: the backend's avatar id (the one place it is kept)
GAUSSIAN_KEYS = ("positions", "scales", "rotations", "opacities", "colors")


def avatar_id(obj: bpy.types.Object | None) -> str:
    """The backend's id of the avatar ``obj`` shows, or ''."""
    return str(obj.get(AVATAR_ID, "")) if obj is not None else ""


def add_object(
    name: str, aid: str, arrays: dict[str, np.ndarray], head: dict[str, Any] | None, collection: bpy.types.Collection
) -> bpy.types.Object:
    """A point-cloud object from a neutral ``deform`` reply (``connection.neutral_args``).

    ``head``: hello's ``head`` entry (expression count and names for the sliders), if known.
    Raises KeyError / ValueError for a reply without the expected buffers.
    """
    g = pointcloud.GaussianBuffers(**{k: arrays[k] for k in GAUSSIAN_KEYS}).checked()
    obj = pointcloud.create_avatar_object(name, g, collection)
    obj[AVATAR_ID] = aid
    if head:
        getattr(obj, flame_data.PROP_GROUP).set_head(head)
    return obj


def scene_avatars(scene: bpy.types.Scene, rendered: bool = False) -> list[bpy.types.Object]:
    """Objects of the scene that show a backend avatar as a point mesh; with ``rendered``,
    only those that take part in renders (not hidden from them)."""
    return [o for o in scene.objects if o.type == "MESH" and avatar_id(o) and not (rendered and o.hide_render)]
