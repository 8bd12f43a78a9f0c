"""The 3D View sidebar tab: connection status, avatars, FLAME animation import/export."""

from __future__ import annotations

import bpy

from . import flame_data, operators


class SPATIALAVATAR_PT_main(bpy.types.Panel):
    bl_label = "SpatialAvatar"
    bl_idname = "SPATIALAVATAR_PT_main"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Avatar"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        box = layout.box()
        box.label(text=operators.status["text"], icon="CHECKMARK" if operators.status["ok"] else "ERROR")
        box.operator("spatialavatar.test_connection", icon="LINKED")

        col = layout.column(align=True)
        col.label(text="Avatars")
        for a in operators.status["avatars"][:20]:
            row = col.row(align=True)
            row.label(text=f"{a.get('name') or a.get('id')}  ({a.get('gaussians', '?')} Gaussians)", icon="USER")
            op = row.operator("spatialavatar.load_avatar", text="", icon="IMPORT")
            op.avatar, op.object_name = a.get("id", ""), a.get("name") or ""
        col.operator("spatialavatar.list_avatars", icon="FILE_REFRESH")

        layout.separator()
        layout.label(text="FLAME animation")
        row = layout.row(align=True)
        row.operator("spatialavatar.import_flame", icon="IMPORT")
        row.operator("spatialavatar.export_flame", icon="EXPORT")
        obj = context.active_object
        if obj is not None:
            group = getattr(obj, flame_data.PROP_GROUP)
            col = layout.column()
            for name in ("jaw_pose", "neck_pose", "eyes_pose", "rotation", "translation"):
                col.prop(group, name)
            col.prop(group, "expression_count")
            for c in range(flame_data.EXPR_CHUNKS):
                col.prop(group, flame_data.expr_chunk_name(c))


classes = (SPATIALAVATAR_PT_main,)
