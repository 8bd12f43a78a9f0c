"""Operators of the sidebar's avatar workflow: portraits, Generate, Refine, Cancel, export.

Generate and Refine return at once: they start a background ``tasks.Task`` that the
runtime's timer follows, and the panel shows its progress. Export is a short blocking call.
"""

from __future__ import annotations

from pathlib import Path

import bpy
from bpy.props import CollectionProperty, EnumProperty, IntProperty, StringProperty
from bpy_extras.io_utils import ExportHelper, ImportHelper

from . import avatars, connection, flame_data, media_files, preferences, runtime, scene_props, tasks, workflows
from .operators import avatar_selected, backend_head, call_failed, connected, fail, status

ops = connection.wire_operations


def _picked(op: ImportHelper) -> list[str]:
    """The files of a multi-file browser, in the order picked (else the single ``filepath``)."""
    names = [f.name for f in getattr(op, "files", ()) if f.name]
    return [str(Path(op.directory) / n) for n in names] if names else [op.filepath]


def _unavailable(*ops: str) -> str | None:
    """Why the tested backend cannot run ``ops`` (hello's capabilities), or None."""
    capabilities = (status["info"] or {}).get("capabilities", {})
    for op in ops:
        cap = capabilities.get(op, {"available": True})
        if not cap.get("available", True):
            return f"The backend cannot {op}: {cap.get('reason', 'not available')}"
    return None


class SPATIALAVATAR_OT_portrait_add(bpy.types.Operator, ImportHelper):
    """Add portraits (photos of one person, face visible) for Generate; at most 4"""

    bl_idname = "spatialavatar.portrait_add"
    bl_label = "Add Portraits"
    bl_options = {"REGISTER", "UNDO"}

    filter_glob: StringProperty(default=media_files.IMAGE_GLOB, options={"HIDDEN"})
    files: CollectionProperty(type=bpy.types.OperatorFileListElement, options={"HIDDEN", "SKIP_SAVE"})
    directory: StringProperty(subtype="DIR_PATH", options={"HIDDEN", "SKIP_SAVE"})

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if len(scene_props.get(context.scene).portraits) >= media_files.LIMITS.max_portraits:
            cls.poll_message_set(f"At most {media_files.LIMITS.max_portraits} portraits; remove one first")
            return False
        return True

    def execute(self, context: bpy.types.Context) -> set[str]:
        props = scene_props.get(context.scene)
        paths = _picked(self)
        room = media_files.LIMITS.max_portraits - len(props.portraits)
        if len(paths) > room:
            return fail(self, f"{len(paths)} portraits picked, room for {room}: Generate takes at most {media_files.LIMITS.max_portraits}")
        try:
            for p in paths:
                media_files.read_image(p)
        except media_files.MediaError as e:
            return fail(self, f"Portrait not added: {e}")
        for p in paths:
            props.portraits.add().filepath = p
        props.portrait_index = len(props.portraits) - 1
        return {"FINISHED"}


class SPATIALAVATAR_OT_portrait_remove(bpy.types.Operator):
    """Remove the selected portrait"""

    bl_idname = "spatialavatar.portrait_remove"
    bl_label = "Remove Portrait"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if not scene_props.get(context.scene).portraits:
            cls.poll_message_set("No portraits to remove")
            return False
        return True

    def execute(self, context: bpy.types.Context) -> set[str]:
        props = scene_props.get(context.scene)
        props.portraits.remove(min(props.portrait_index, len(props.portraits) - 1))
        props.portrait_index = max(0, min(props.portrait_index, len(props.portraits) - 1))
        return {"FINISHED"}


class SPATIALAVATAR_OT_generate(bpy.types.Operator):
    """Make an avatar from the portraits on the backend, personalized when checked; runs in the background, the object appears when done"""

    bl_idname = "spatialavatar.generate"
    bl_label = "Generate"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if not connected(cls):
            return False
        if not scene_props.get(context.scene).portraits:
            cls.poll_message_set("Add 1 to 4 portraits first")
            return False
        return True

    def execute(self, context: bpy.types.Context) -> set[str]:
        s = preferences.settings(context)
        if why := preferences.blocked(s):
            return fail(self, why)
        props = scene_props.get(context.scene)
        try:
            buffers = media_files.portrait_buffers([bpy.path.abspath(p.filepath) for p in props.portraits])
        except media_files.MediaError as e:
            return fail(self, f"Cannot generate: {e}")
        if why := _unavailable(ops.Generate.op, ops.Track.op):
            return fail(self, why)
        name = props.avatar_name.strip() or "Avatar"
        runtime.RUNTIME.start(workflows.generate_task(name, buffers, props.personalize, props.preview_points, backend_head()), s)
        self.report({"INFO"}, f"Generating {name} in the background")
        return {"FINISHED"}


class SPATIALAVATAR_OT_refine(bpy.types.Operator, ImportHelper):
    """Refine the active avatar on a video or photos of the person; runs in the background into a new object"""

    bl_idname = "spatialavatar.refine"
    bl_label = "Refine on Video/Photos"

    filter_glob: StringProperty(default=f"{media_files.VIDEO_GLOB};{media_files.IMAGE_GLOB}", options={"HIDDEN"})
    files: CollectionProperty(type=bpy.types.OperatorFileListElement, options={"HIDDEN", "SKIP_SAVE"})
    directory: StringProperty(subtype="DIR_PATH", options={"HIDDEN", "SKIP_SAVE"})

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return connected(cls) and avatar_selected(cls, context, "refine")

    def execute(self, context: bpy.types.Context) -> set[str]:
        s = preferences.settings(context)
        if why := preferences.blocked(s):
            return fail(self, why)
        obj = context.active_object
        props = scene_props.get(context.scene)
        try:
            capture = media_files.capture_buffers(_picked(self))
        except media_files.MediaError as e:
            return fail(self, f"Cannot refine: {e}")
        if why := _unavailable(ops.Track.op, ops.Refine.op):
            return fail(self, why)
        settings = workflows.RefineSettings(props.refine_iterations, props.refine_max_scale, props.track_size)
        task = workflows.refine_task(avatars.avatar_id(obj), obj.name, capture, settings, props.preview_points, backend_head())
        runtime.RUNTIME.start(task, s)
        self.report({"INFO"}, f"Refining {obj.name} in the background")
        return {"FINISHED"}


class SPATIALAVATAR_OT_cancel_task(bpy.types.Operator):
    """Cancel a running background task (the service stops its job at the next step)"""

    bl_idname = "spatialavatar.cancel_task"
    bl_label = "Cancel"

    index: IntProperty(name="Task", default=0, min=0)

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if not any(not t.ended for t in runtime.RUNTIME.tasks):
            cls.poll_message_set("No background task is running")
            return False
        return True

    def execute(self, context: bpy.types.Context) -> set[str]:
        tasks = runtime.RUNTIME.tasks
        if self.index >= len(tasks) or tasks[self.index].ended:
            return fail(self, "That task has already ended")
        tasks[self.index].cancel()
        runtime.ensure_timer()
        return {"FINISHED"}


class SPATIALAVATAR_OT_resume_job(bpy.types.Operator):
    """Run an interrupted job again from its last checkpoint, and follow it as before"""

    bl_idname = "spatialavatar.resume_job"
    bl_label = "Resume"

    index: IntProperty(name="Task", default=0, min=0)

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if not any(t.progress.state == tasks.INTERRUPTED for t in runtime.RUNTIME.tasks):
            cls.poll_message_set("No interrupted job to resume")
            return False
        return connected(cls)

    def execute(self, context: bpy.types.Context) -> set[str]:
        s = preferences.settings(context)
        if why := preferences.blocked(s):
            return fail(self, why)
        listed = runtime.RUNTIME.tasks
        if self.index >= len(listed) or listed[self.index].progress.state != tasks.INTERRUPTED:
            return fail(self, "That task has no interrupted job")
        task = listed[self.index]
        task.resume(runtime.RUNTIME.session_for(s))
        runtime.ensure_timer()
        self.report({"INFO"}, f"{task.label}: resuming job {task.job_id}")
        return {"FINISHED"}


class SPATIALAVATAR_OT_clear_tasks(bpy.types.Operator):
    """Remove ended tasks from the list"""

    bl_idname = "spatialavatar.clear_tasks"
    bl_label = "Clear Finished"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if not any(t.ended for t in runtime.RUNTIME.tasks):
            cls.poll_message_set("No finished tasks")
            return False
        return True

    def execute(self, context: bpy.types.Context) -> set[str]:
        runtime.RUNTIME.tasks[:] = [t for t in runtime.RUNTIME.tasks if not t.ended]
        return {"FINISHED"}


class SPATIALAVATAR_OT_export_avatar(bpy.types.Operator, ExportHelper):
    """Write the active avatar as the backend's .npz, or as a standard 3DGS .ply posed at the current frame"""

    bl_idname = "spatialavatar.export_avatar"
    bl_label = "Export Avatar"

    filename_ext = ".ply"
    filter_glob: StringProperty(default="*.ply;*.npz", options={"HIDDEN"})
    format: EnumProperty(
        name="Format",
        items=(
            ("ply", "3DGS .ply", "Gaussians posed at the current frame"),
            ("npz", "Avatar .npz", "The animatable avatar (the backend's format)"),
        ),
        default="ply",
    )

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return connected(cls) and avatar_selected(cls, context, "export")

    def check(self, context: bpy.types.Context) -> bool:
        self.filename_ext = f".{self.format}"
        return super().check(context)

    def execute(self, context: bpy.types.Context) -> set[str]:
        s = preferences.settings(context)
        if why := preferences.blocked(s):
            return fail(self, why)
        obj = context.active_object
        aid = avatars.avatar_id(obj)
        path = Path(bpy.path.ensure_ext(self.filepath, f".{self.format}"))
        arrays = getattr(obj, flame_data.PROP_GROUP).buffers() if self.format == "ply" else None
        try:
            with connection.open_client(s) as c:
                reply = c.call(ops.Export.op, ops.Export.args(avatar=aid, format=self.format), arrays)
            path.write_bytes(reply.arrays["file"].tobytes())
        except connection.UserError as e:
            return call_failed(self, f"Could not export {aid}: {e}", e)
        except OSError as e:
            return fail(self, f"Could not write {path}: {e}")
        self.report({"INFO"}, f"Wrote {path.name} ({reply.result.get('gaussians', '?')} Gaussians)")
        return {"FINISHED"}


class SPATIALAVATAR_OT_refresh_overlay(bpy.types.Operator):
    """Render the backend's view at the scene camera again (e.g. after moving the camera)"""

    bl_idname = "spatialavatar.refresh_overlay"
    bl_label = "Refresh Overlay"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if not scene_props.get(context.scene).overlay:
            cls.poll_message_set("Turn on the backend render overlay first")
            return False
        return connected(cls)

    def execute(self, context: bpy.types.Context) -> set[str]:
        runtime.RUNTIME.overlay.wanted = True
        runtime.ensure_timer()
        return {"FINISHED"}


classes = (
    SPATIALAVATAR_OT_portrait_add,
    SPATIALAVATAR_OT_portrait_remove,
    SPATIALAVATAR_OT_generate,
    SPATIALAVATAR_OT_refine,
    SPATIALAVATAR_OT_cancel_task,
    SPATIALAVATAR_OT_resume_job,
    SPATIALAVATAR_OT_clear_tasks,
    SPATIALAVATAR_OT_export_avatar,
    SPATIALAVATAR_OT_refresh_overlay,
)
