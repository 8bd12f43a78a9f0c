"""Per-scene settings of the sidebar (``Scene.spatialavatar``): portraits, Generate's and
Refine's settings, preview and overlay switches.

They are saved with the .blend; what is running (tasks, the session) lives in ``runtime``.
"""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, CollectionProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from .connection import wire_operations as ops

PROP = "spatialavatar"


def _live_preview_changed(self, context: bpy.types.Context) -> None:
    from . import runtime

    runtime.preview_switched(context.scene, self.live_preview)


def _overlay_changed(self, context: bpy.types.Context) -> None:
    from . import runtime

    runtime.overlay_switched(context.scene, self.overlay)


def _personalize_get(self) -> bool:
    """The artist's choice once made; until then what the connected backend does by default
    (hello: on for a CUDA backend), so the checkbox shows what Generate will do."""
    if self.personalize_choice != "BACKEND":
        return self.personalize_choice == "ON"
    from . import runtime

    generate = ((runtime.RUNTIME.status["info"] or {}).get("capabilities") or {}).get(ops.Generate.op) or {}
    return bool(generate.get("personalize", False))


def _personalize_set(self, value: bool) -> None:
    self.personalize_choice = "ON" if value else "OFF"


class SPATIALAVATAR_PG_portrait(bpy.types.PropertyGroup):
    filepath: StringProperty(name="Portrait", subtype="FILE_PATH", description="A photo of the person, face visible")


class SPATIALAVATAR_PG_scene(bpy.types.PropertyGroup):
    portraits: CollectionProperty(type=SPATIALAVATAR_PG_portrait)
    portrait_index: IntProperty(name="Portrait", default=0, min=0)
    avatar_name: StringProperty(name="Name", default="Avatar", description="Name of the avatar Generate makes")
    personalize_choice: EnumProperty(
        items=(("BACKEND", "Backend's default", ""), ("ON", "On", ""), ("OFF", "Off", "")),
        default="BACKEND",
        options={"HIDDEN"},
        description="What the Personalize checkbox holds: the artist's choice, or the backend's default until one is made",
    )
    personalize: BoolProperty(
        name="Personalize",
        get=_personalize_get,
        set=_personalize_set,
        description="After generating, refine the head briefly on its own portraits so it takes in the person's hair, skin "
        "and lighting (the Gaussian layout stays). Seconds on a CUDA backend, minutes on a CPU one; "
        "follows the backend's default (on with CUDA) until you set it",
    )
    preview_points: IntProperty(
        name="Points",
        default=20_000,
        min=0,
        soft_max=200_000,
        description="Points of new avatar objects: an evenly spread subset (0: all Gaussians)",
    )
    live_preview: BoolProperty(
        name="Live Preview",
        default=False,
        update=_live_preview_changed,
        description="Pose avatar objects through the backend when the frame changes",
    )
    overlay: BoolProperty(
        name="Backend Render in Camera View",
        default=False,
        update=_overlay_changed,
        description="Draw the backend's splat rendering of the active avatar over the camera view",
    )
    overlay_scale: FloatProperty(
        name="Overlay Resolution",
        default=0.5,
        min=0.05,
        max=1.0,
        subtype="FACTOR",
        description="Fraction of the render resolution the overlay is rendered at",
    )
    refine_iterations: IntProperty(
        name="Iterations", default=2000, min=ops.Refine.iterations.lo, max=ops.Refine.iterations.hi, description="Refinement steps"
    )
    refine_max_scale: FloatProperty(
        name="Max Scale",
        default=0.0,
        min=0.0,  # 0: leave it to the preset
        max=ops.Refine.max_scale.hi,
        description="Anti-spike scale threshold in triangle sizes (0: the preset's); raise it for coarse avatars",
    )
    track_size: IntProperty(
        name="Crop Size",
        default=512,
        min=ops.Track.size.lo,
        max=ops.Track.size.hi,
        description="Face crop size in pixels for tracking the video or photos",
    )


classes = (SPATIALAVATAR_PG_portrait, SPATIALAVATAR_PG_scene)


def register_pointer() -> None:
    bpy.types.Scene.spatialavatar = PointerProperty(type=SPATIALAVATAR_PG_scene)


def unregister_pointer() -> None:
    del bpy.types.Scene.spatialavatar


def get(scene: bpy.types.Scene) -> SPATIALAVATAR_PG_scene:
    return getattr(scene, PROP)
