"""The background tasks the sidebar starts, as ``tasks.Task`` chains ending in a new avatar object.

- generate: portraits -> ``generate`` job (tracking, the network, then personalization when
  asked: the job's progress names each) -> the new avatar's points.
- refine: a video or photos -> ``track`` job -> ``refine`` job on that subject -> the
  refined avatar's points (a new object; the source object stays).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import bpy
import numpy as np

from . import avatars, connection
from .tasks import Request, Step, Task

ops = connection.wire_operations


def _fetch_steps(max_points: int) -> list[Step]:
    """``get`` (for the Gaussian count) then a neutral ``deform`` of ``results['avatar']``."""

    def neutral(r: dict[str, Any]) -> Request:
        return Request(ops.Deform.op, *connection.neutral_args(r["avatar"], int(r["summary"]["avatar"]["gaussians"]), max_points))

    return [Step(lambda r: Request(ops.Get.op, ops.Get.args(id=r["avatar"])), job=False, keep="summary"), Step(neutral, job=False)]


def _add_object(name: str, head: dict[str, Any] | None):
    """The finish of a task: the fetched points become a new object in the current scene."""

    def finish(results: dict[str, Any], reply: connection.Reply) -> str:
        aid = results["avatar"]
        scene = bpy.context.scene
        obj = avatars.add_object(name or aid, aid, reply.arrays, head, scene.collection)
        # Made in a timer, outside any operator: its own undo step lets the artist undo it.
        if bpy.ops.ed.undo_push.poll():
            bpy.ops.ed.undo_push(message=f"SpatialAvatar: add {obj.name}")
        return f"{obj.name}: {len(obj.data.vertices)} points of avatar {aid}"

    return finish


def generate_task(name: str, portraits: dict[str, np.ndarray], personalize: bool, max_points: int, head: dict[str, Any] | None) -> Task:
    """``portraits``: ``portrait0`` .. buffers (media_files.portrait_buffers); ``personalize``:
    the Personalize checkbox, sent as it shows."""
    args = ops.Generate.args(name=name, personalize=personalize)
    steps = [Step(lambda r: Request(ops.Generate.op, args, portraits)), *_fetch_steps(max_points)]
    return Task(f"Generate {name}", steps, _add_object(name, head))


@dataclass(frozen=True)
class RefineSettings:
    """``max_scale`` 0: the preset's anti-spike threshold; ``crop_size``: pixels of the tracked face crops."""

    iterations: int
    max_scale: float
    crop_size: int


def refine_task(
    source: str, source_name: str, capture: dict[str, np.ndarray], settings: RefineSettings, max_points: int, head: dict[str, Any] | None
) -> Task:
    """``capture``: one ``video`` or ``image0`` .. buffers (media_files.capture_buffers)."""
    name = f"{source_name} refined"
    max_scale = settings.max_scale if settings.max_scale > 0 else None
    steps = [
        Step(lambda r: Request(ops.Track.op, ops.Track.args(size=settings.crop_size), capture)),
        Step(lambda r: Request(ops.Refine.op, ops.Refine.args(avatar=source, subject=r["subject"], iterations=settings.iterations, max_scale=max_scale, name=name))),
        *_fetch_steps(max_points),
    ]
    return Task(f"Refine {source_name}", steps, _add_object(name, head))
