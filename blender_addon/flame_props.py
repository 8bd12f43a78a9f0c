"""The avatar object's FLAME parameters as animatable properties (``Object.spatialavatar_flame``)."""

from __future__ import annotations

import bpy
from bpy.props import FloatVectorProperty, IntProperty, PointerProperty, StringProperty

from . import flame_data

_OPTS = {"ANIMATABLE"}
_OVERRIDE = {"LIBRARY_OVERRIDABLE"}


def _vector(name: str, size: int, description: str, subtype: str = "NONE", soft: float | None = None) -> FloatVectorProperty:
    """``soft``: the sliders' range (+-); values beyond it can still be typed or keyed."""
    limits = {} if soft is None else {"soft_min": -soft, "soft_max": soft}
    return FloatVectorProperty(
        name=name, size=size, default=(0.0,) * size, subtype=subtype, description=description, options=_OPTS, override=_OVERRIDE, **limits
    )


def _group_annotations() -> dict:
    ann: dict = {}
    for c in range(flame_data.EXPR_CHUNKS):
        lo = c * flame_data.EXPR_CHUNK
        ann[flame_data.expr_chunk_name(c)] = _vector(
            f"Expression {lo}-{lo + flame_data.EXPR_CHUNK - 1}",
            flame_data.EXPR_CHUNK,
            "FLAME expression coefficients (about N(0, 1))",
            soft=3.0,
        )
    ann["rotation"] = _vector("Rotation", 3, "Global head rotation, axis-angle (radians)")
    ann["neck_pose"] = _vector("Neck", 3, "Neck joint, axis-angle (radians)")
    ann["jaw_pose"] = _vector("Jaw", 3, "Jaw joint, axis-angle (radians)")
    ann["eyes_pose"] = _vector("Eyes", 6, "Left then right eye, axis-angle (radians)")
    ann["translation"] = _vector("Translation", 3, "Head translation after posing (metres)", "TRANSLATION")
    ann["expression_count"] = IntProperty(
        name="Expressions", default=flame_data.MAX_EXPR, min=0, max=flame_data.MAX_EXPR, description="Expression components the head model uses"
    )
    ann["expression_names"] = StringProperty(name="Expression names", default="", description="Comma-separated names from the backend, if any")
    return ann


class SPATIALAVATAR_PG_flame(bpy.types.PropertyGroup):
    """Per-object FLAME parameters; every vector is animatable (Blender allows at most 32 values per vector)."""

    __annotations__ = _group_annotations()

    def names(self) -> tuple[str, ...]:
        """The head model's expression names, as the backend gave them (empty when not known)."""
        return tuple(self.expression_names.split(",")) if self.expression_names else ()

    def labels(self) -> list[str]:
        return flame_data.expression_labels(list(self.names()), self.expression_count)

    def sliders(self) -> list[tuple[str, int, str]]:
        """(vector property, element, label) of every expression coefficient the head uses, in order."""
        return [(*flame_data.expr_location(i), label) for i, label in enumerate(self.labels())]

    def buffers(self) -> dict:
        """The current values as one frame of FLAME buffers for ``deform`` and ``render``."""
        names = [flame_data.expr_chunk_name(c) for c in range(flame_data.EXPR_CHUNKS)] + list(flame_data.POSE_FIELDS)
        return flame_data.frame_buffers({n: getattr(self, n) for n in names}, self.expression_count)

    def set_head(self, head: dict) -> None:
        """Take the expression count and names from the backend's ``hello`` ``head`` entry."""
        self.expression_count = min(int(head.get("expression_components", flame_data.MAX_EXPR)), flame_data.MAX_EXPR)
        # Commas separate the stored names, so a name may not hold one.
        self.expression_names = ",".join(str(n).replace(",", " ") for n in head.get("expression_names", []))


def register_pointer() -> None:
    setattr(bpy.types.Object, flame_data.PROP_GROUP, PointerProperty(type=SPATIALAVATAR_PG_flame, override=_OVERRIDE))


def unregister_pointer() -> None:
    if hasattr(bpy.types.Object, flame_data.PROP_GROUP):
        delattr(bpy.types.Object, flame_data.PROP_GROUP)
