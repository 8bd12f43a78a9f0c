"""Live preview: the avatar object's FLAME values at the current frame -> ``deform`` -> new point positions.

The object holds an evenly spread subset of the avatar's Gaussians (``Load Avatar``'s
*Points*, 20,000 by default); ``deform`` with ``max_gaussians`` = the object's point count
returns the same subset for every frame, so a reply is written straight into the mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import bpy
import numpy as np

from . import avatars, connection, flame_data, pointcloud

ops = connection.wire_operations


def deform_request(obj: bpy.types.Object) -> tuple[dict, dict[str, np.ndarray]]:
    """``deform`` arguments and buffers for ``obj`` at the current frame."""
    args = ops.Deform.args(avatar=avatars.avatar_id(obj), max_gaussians=len(obj.data.vertices))
    return args, getattr(obj, flame_data.PROP_GROUP).buffers()


def apply_reply(obj: bpy.types.Object, arrays: dict[str, np.ndarray]) -> None:
    """Write a ``deform`` reply's pose into the object's mesh (ValueError when it does not fit)."""
    pointcloud.set_pose(obj.data, arrays["positions"], arrays["scales"], arrays["rotations"])
    obj.update_tag()


@dataclass
class Preview:
    """Which avatar objects wait for a new pose, and which have a request out.

    At most one request per object is in flight; a frame change meanwhile marks it dirty
    again, so the newest frame is sent once the reply is in (the newest frame wins).
    """

    dirty: set[str] = field(default_factory=set)
    in_flight: set[str] = field(default_factory=set)
    generation: int = 0  # bumped when a file is loaded: replies for the old file are dropped
    message: str = ""
    last_deform_ms: float = 0.0

    def mark(self, scene: bpy.types.Scene) -> None:
        self.dirty.update(o.name for o in avatars.scene_avatars(scene))

    def reset(self) -> None:
        self.dirty.clear()
        self.in_flight.clear()
        self.generation += 1

    @property
    def waiting(self) -> bool:
        return bool(self.dirty or self.in_flight)

    def send(self, submit: Callable[..., str]) -> None:
        """Send one request per dirty object that has none out; ``submit`` is ``Session.submit``."""
        for name in sorted(self.dirty - self.in_flight):
            self.dirty.discard(name)
            obj = bpy.data.objects.get(name)
            if obj is None or not avatars.avatar_id(obj):
                continue
            args, arrays = deform_request(obj)
            self.in_flight.add(name)
            try:
                submit(ops.Deform.op, args, arrays, on_reply=lambda r, n=name, g=self.generation: self._on_reply(n, g, r))
            except connection.UserError as e:
                self.in_flight.discard(name)
                self.message = f"Preview of {name}: {e}"

    def _on_reply(self, name: str, generation: int, reply: connection.Reply) -> None:
        if generation != self.generation:
            return
        if reply.final:
            self.in_flight.discard(name)
        obj = bpy.data.objects.get(name)
        if reply.error is not None:
            self.message = f"Preview of {name}: {reply.error.message}"
            return
        if obj is None:
            return
        try:
            apply_reply(obj, reply.arrays)
        except (KeyError, ValueError) as e:
            self.message = f"Preview of {name}: {e}"
            return
        self.message = ""
        self.last_deform_ms = float(reply.result.get("deform_ms", 0.0))
