"""The 3D View sidebar tab *Avatar*: connection, avatars, Generate from portraits, background
tasks with progress, the active avatar (refine, export, live preview, overlay, FLAME) and its
expression sliders named after the backend's head model, and the final render's set-up
(compositing, embedded avatar files)."""

from __future__ import annotations

from pathlib import Path

import bpy
import bpy.utils.previews

from . import avatars, compositing_avatars, compositing_frames, compositing_nodes, flame_data, operators, runtime, scene_props, tasks


def thumbnail(path: str) -> int:
    """Icon id of an image file's preview (loaded once per path)."""
    pcoll = runtime.RUNTIME.thumbnails
    if pcoll is None:
        return 0
    full = bpy.path.abspath(path)
    if full not in pcoll:
        pcoll.load(full, full, "IMAGE")
    return pcoll[full].icon_id


class SPATIALAVATAR_UL_portraits(bpy.types.UIList):
    def draw_item(self, context, layout, data, item, icon, active_data, active_property, index=0, flt_flag=0) -> None:
        layout.label(text=Path(item.filepath).name or "(no file)", icon_value=thumbnail(item.filepath))


class _Sidebar:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Avatar"


class SPATIALAVATAR_PT_main(_Sidebar, bpy.types.Panel):
    bl_label = "SpatialAvatar"
    bl_idname = "SPATIALAVATAR_PT_main"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        box = layout.box()
        box.label(text=operators.status["text"], icon="CHECKMARK" if operators.status["ok"] else "ERROR")
        box.operator("spatialavatar.test_connection", icon="LINKED")

        col = layout.column(align=True)
        col.label(text="Avatars on the backend")
        for a in operators.status["avatars"][:20]:
            row = col.row(align=True)
            row.label(text=f"{a.get('name') or a.get('id')}  ({a.get('gaussians', '?')} Gaussians)", icon="USER")
            op = row.operator("spatialavatar.load_avatar", text="", icon="IMPORT")
            op.avatar, op.object_name = a.get("id", ""), a.get("name") or ""
        col.operator("spatialavatar.list_avatars", icon="FILE_REFRESH")
        layout.prop(scene_props.get(context.scene), "preview_points")


class SPATIALAVATAR_PT_generate(_Sidebar, bpy.types.Panel):
    bl_label = "Generate from Portraits"
    bl_parent_id = "SPATIALAVATAR_PT_main"

    def draw(self, context: bpy.types.Context) -> None:
        props = scene_props.get(context.scene)
        layout = self.layout
        row = layout.row()
        row.template_list("SPATIALAVATAR_UL_portraits", "", props, "portraits", props, "portrait_index", rows=2, maxrows=4)
        col = row.column(align=True)
        col.operator("spatialavatar.portrait_add", text="", icon="ADD")
        col.operator("spatialavatar.portrait_remove", text="", icon="REMOVE")
        if 0 <= props.portrait_index < len(props.portraits):
            layout.template_icon(icon_value=thumbnail(props.portraits[props.portrait_index].filepath), scale=6.0)
        layout.prop(props, "avatar_name")
        layout.prop(props, "personalize")
        layout.operator("spatialavatar.generate", icon="SHADERFX")


class SPATIALAVATAR_PT_tasks(_Sidebar, bpy.types.Panel):
    bl_label = "Background Tasks"
    bl_parent_id = "SPATIALAVATAR_PT_main"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return bool(runtime.RUNTIME.tasks)

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        for i, task in enumerate(runtime.RUNTIME.tasks):
            box = layout.box()
            row = box.row()
            row.label(text=task.label, icon="CHECKMARK" if task.progress.state == tasks.DONE else "TIME")
            if task.progress.state == tasks.INTERRUPTED:
                row.operator("spatialavatar.resume_job", text="", icon="PLAY").index = i
            if not task.ended:
                row.operator("spatialavatar.cancel_task", text="", icon="CANCEL").index = i
                if hasattr(box, "progress"):
                    p = task.progress
                    box.progress(factor=p.fraction, type="BAR", text=f"{p.state} {p.step}/{p.total}")
            if task.progress.message:
                troubled = task.progress.state in (tasks.FAILED, tasks.LOST, tasks.INTERRUPTED)
                box.label(text=task.progress.message, icon="ERROR" if troubled else "NONE")
        layout.operator("spatialavatar.clear_tasks", icon="TRASH")


class SPATIALAVATAR_PT_avatar(_Sidebar, bpy.types.Panel):
    bl_label = "Active Avatar"
    bl_parent_id = "SPATIALAVATAR_PT_main"

    def draw(self, context: bpy.types.Context) -> None:
        props = scene_props.get(context.scene)
        layout = self.layout
        obj = context.active_object
        aid = avatars.avatar_id(obj)
        layout.label(text=f"{obj.name}: {aid}" if aid else "Select an avatar object", icon="USER")

        col = layout.column(align=True)
        row = col.row(align=True)
        row.prop(props, "refine_iterations")
        row.prop(props, "refine_max_scale")
        col.prop(props, "track_size")
        col.operator("spatialavatar.refine", icon="MOD_SMOOTH")
        row = layout.row(align=True)
        row.operator("spatialavatar.export_avatar", text="Export .ply", icon="EXPORT").format = "ply"
        row.operator("spatialavatar.export_avatar", text="Export .npz", icon="EXPORT").format = "npz"

        box = layout.box()
        box.prop(props, "live_preview", icon="PLAY")
        if runtime.RUNTIME.preview.message:
            box.label(text=runtime.RUNTIME.preview.message, icon="ERROR")
        box.prop(props, "overlay", icon="RENDER_RESULT")
        if props.overlay:
            row = box.row(align=True)
            row.prop(props, "overlay_scale")
            row.operator("spatialavatar.refresh_overlay", text="", icon="FILE_REFRESH")
            if runtime.RUNTIME.overlay.message:
                box.label(text=runtime.RUNTIME.overlay.message, icon="ERROR")

        layout.label(text="FLAME animation")
        row = layout.row(align=True)
        row.operator("spatialavatar.import_flame", icon="IMPORT")
        row.operator("spatialavatar.export_flame", icon="EXPORT")
        layout.operator("spatialavatar.import_arkit", icon="IMPORT")
        if obj is not None:
            group = getattr(obj, flame_data.PROP_GROUP)
            col = layout.column()
            for name in ("jaw_pose", "neck_pose", "eyes_pose", "rotation", "translation"):
                col.prop(group, name)


class SPATIALAVATAR_PT_expressions(_Sidebar, bpy.types.Panel):
    bl_label = "Expressions"
    bl_parent_id = "SPATIALAVATAR_PT_avatar"
    bl_options = {"DEFAULT_CLOSED"}

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return context.active_object is not None

    def draw(self, context: bpy.types.Context) -> None:
        group = getattr(context.active_object, flame_data.PROP_GROUP)
        col = self.layout.column(align=True)
        col.prop(group, "expression_count")
        for prop, index, label in group.sliders():
            col.prop(group, prop, index=index, text=label, slider=True)


class SPATIALAVATAR_PT_final_render(_Sidebar, bpy.types.Panel):
    bl_label = "Final Render"
    bl_parent_id = "SPATIALAVATAR_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context: bpy.types.Context) -> None:
        scene = context.scene
        shown = avatars.scene_avatars(scene, rendered=True)
        col = self.layout.column()
        if not compositing_nodes.is_set_up(scene):
            col.label(text="Renders do not show the avatars yet", icon="INFO")
        elif added := compositing_nodes.points_in_render(scene):
            col.label(text=f"{len(added)} avatar object(s) added since the set-up: set up again", icon="ERROR")
        else:
            col.label(text=f"Renders composite {len(shown)} avatar object(s)", icon="CHECKMARK")
        try:
            compositing_frames.blender_camera(scene.camera, scene.render)
        except ValueError as e:
            col.label(text=f"Renders will stop: {e}", icon="ERROR")
        col.operator("spatialavatar.setup_compositing", icon="NODE_COMPOSITING")

        col = self.layout.column()
        embedded = sum(compositing_avatars.is_embedded(o) for o in shown)
        col.label(text=f"Avatar files in the .blend: {embedded} of {len(shown)}", icon="PACKAGE")
        col.operator("spatialavatar.embed_avatars", icon="PACKAGE")


classes = (
    SPATIALAVATAR_UL_portraits,
    SPATIALAVATAR_PT_main,
    SPATIALAVATAR_PT_generate,
    SPATIALAVATAR_PT_tasks,
    SPATIALAVATAR_PT_avatar,
    SPATIALAVATAR_PT_expressions,
    SPATIALAVATAR_PT_final_render,
)


def register() -> None:
    runtime.RUNTIME.thumbnails = bpy.utils.previews.new()


def unregister() -> None:
    pcoll, runtime.RUNTIME.thumbnails = runtime.RUNTIME.thumbnails, None
    if pcoll is not None:
        bpy.utils.previews.remove(pcoll)
