"""Thin operators: read settings, call the plain modules, report errors.

Here: the connection, Load Avatar, FLAME animation import/export, ARKit curves import and the
final-render set-up (compositing, embedded avatars). The background workflow (portraits,
Generate, Refine, tasks, export, overlay) is in ``operators_jobs``.
"""

from __future__ import annotations

from pathlib import Path

import bpy
from bpy.props import FloatProperty, IntProperty, StringProperty
from bpy_extras.io_utils import ExportHelper, ImportHelper

from . import animation_io, avatars, compositing, compositing_avatars, connection, flame_data, preferences, runtime, scene_props
from .runtime import status

ops = connection.wire_operations


def backend_head() -> dict | None:
    """The tested backend's head model (hello's ``head``: expression count and names), if known."""
    return (status["info"] or {}).get("head")


def fail(op: bpy.types.Operator, message: str) -> set[str]:
    op.report({"ERROR"}, message)
    return {"CANCELLED"}


def call_failed(op: bpy.types.Operator, message: str, error: connection.UserError) -> set[str]:
    """``fail`` for a blocking call to the preferences' backend; one that never answered is
    lost, and the heartbeat looks for it."""
    if isinstance(error, connection.ServiceUnavailable):
        runtime.lost(str(error))
    return fail(op, message)


def connected(cls: type[bpy.types.Operator]) -> bool:
    """Poll part shared by operators that talk to the backend."""
    if not status["ok"]:
        cls.poll_message_set("Test the connection to the backend first (sidebar > Avatar)")
        return False
    return True


def avatar_selected(cls: type[bpy.types.Operator], context: bpy.types.Context, action: str) -> bool:
    """Poll part of operators on the active avatar (``action``: what the message asks it for)."""
    if not avatars.avatar_id(context.active_object):
        cls.poll_message_set(f"Select an avatar object to {action}")
        return False
    return True


class SPATIALAVATAR_OT_test_connection(bpy.types.Operator):
    """Ask the backend for its version and device"""

    bl_idname = "spatialavatar.test_connection"
    bl_label = "Test Connection"

    def execute(self, context: bpy.types.Context) -> set[str]:
        s = preferences.settings(context)
        if why := preferences.blocked(s):
            return fail(self, why)
        try:
            info = connection.hello(s)
        except connection.UserError as e:
            status.update(text=f"No backend: {e}", ok=False, info=None)
            return call_failed(self, f"Backend at {s.endpoint} did not answer: {e}", e)
        runtime.found(info)
        self.report({"INFO"}, status["text"])
        return {"FINISHED"}


class SPATIALAVATAR_OT_list_avatars(bpy.types.Operator):
    """Fetch the list of avatars the backend stores"""

    bl_idname = "spatialavatar.list_avatars"
    bl_label = "Refresh Avatars"

    def execute(self, context: bpy.types.Context) -> set[str]:
        s = preferences.settings(context)
        if why := preferences.blocked(s):
            return fail(self, why)
        try:
            with connection.open_client(s) as c:
                found = c.call(ops.List.op, ops.List.args(kind="avatars")).result.get("avatars", [])
        except connection.UserError as e:
            return call_failed(self, f"Could not list avatars: {e}", e)
        status["avatars"] = found
        self.report({"INFO"}, f"{len(found)} avatar(s)")
        return {"FINISHED"}


class SPATIALAVATAR_OT_load_avatar(bpy.types.Operator):
    """Create a point-cloud object from a backend avatar in its neutral pose"""

    bl_idname = "spatialavatar.load_avatar"
    bl_label = "Load Avatar"
    bl_options = {"REGISTER", "UNDO"}

    avatar: StringProperty(name="Avatar", description="The backend's avatar id")
    object_name: StringProperty(name="Object name", description="Default: the avatar id")
    max_points: IntProperty(
        name="Points", default=-1, min=-1, description="Evenly spread subset to show (0: all; -1: the scene's Points setting)"
    )

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return connected(cls)

    def execute(self, context: bpy.types.Context) -> set[str]:
        s = preferences.settings(context)
        if why := preferences.blocked(s):
            return fail(self, why)
        if not self.avatar:
            return fail(self, "No avatar id given")
        points = self.max_points if self.max_points >= 0 else scene_props.get(context.scene).preview_points
        try:
            arrays = connection.neutral_gaussians(s, self.avatar, points)
            obj = avatars.add_object(self.object_name or self.avatar, self.avatar, arrays, backend_head(), context.collection)
        except connection.UserError as e:
            return call_failed(self, f"Could not load avatar {self.avatar}: {e}", e)
        except (KeyError, ValueError) as e:
            return fail(self, f"Avatar {self.avatar}: unexpected reply from the backend: {e}")
        context.view_layer.objects.active = obj
        self.report({"INFO"}, f"Loaded {self.avatar} ({len(obj.data.vertices)} points)")
        return {"FINISHED"}


def scene_fps(scene: bpy.types.Scene) -> float:
    """The scene's frame rate, frames per second (Blender stores it as fps / fps_base)."""
    return scene.render.fps / scene.render.fps_base


class _NeedsObject:
    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if context.active_object is None:
            cls.poll_message_set("Select the avatar object first")
            return False
        return True


class SPATIALAVATAR_OT_import_flame(_NeedsObject, bpy.types.Operator, ImportHelper):
    """Key the active object's FLAME parameters from a flame_param.npz"""

    bl_idname = "spatialavatar.import_flame"
    bl_label = "Import FLAME Animation"
    bl_options = {"REGISTER", "UNDO"}

    filename_ext = ".npz"
    filter_glob: StringProperty(default="*.npz", options={"HIDDEN"})
    frame_start: IntProperty(name="Start frame", default=1, description="Scene frame of the file's first frame")
    file_fps: FloatProperty(name="File frame rate", default=25.0, min=0.001, description="Frames per second of the file; keys are spread to the scene's rate")

    def execute(self, context: bpy.types.Context) -> set[str]:
        try:
            anim = animation_io.import_file(context.active_object, self.filepath, self.frame_start, self.file_fps, scene_fps(context.scene))
        except (flame_data.FlameFileError, ValueError) as e:
            return fail(self, str(e))
        self.report({"INFO"}, f"Imported {anim.frames} frames from {Path(self.filepath).name}")
        return {"FINISHED"}


class SPATIALAVATAR_OT_import_arkit(_NeedsObject, bpy.types.Operator, ImportHelper):
    """Key the active avatar's expressions by their ARKit names and its neck from a Live Link Face CSV (iPhone face capture)"""

    bl_idname = "spatialavatar.import_arkit"
    bl_label = "Import ARKit Curves"
    bl_options = {"REGISTER", "UNDO"}

    filename_ext = ".csv"
    filter_glob: StringProperty(default="*.csv", options={"HIDDEN"})
    frame_start: IntProperty(name="Start frame", default=1, description="Scene frame of the recording's first row")
    source_fps: FloatProperty(
        name="Recording frame rate",
        default=flame_data.arkit_csv.SOURCE_FPS,
        min=0.001,
        description="Frames per second the recording's timecodes count; keys go on every scene frame",
    )

    def execute(self, context: bpy.types.Context) -> set[str]:
        fps = scene_fps(context.scene)
        try:
            anim, missing = animation_io.import_arkit_file(context.active_object, self.filepath, self.frame_start, fps, self.source_fps)
        except ValueError as e:  # the file or the head, in one sentence; nothing was keyed
            return fail(self, str(e))
        unused = f"; the head has no expression for {', '.join(missing)}" if missing else ""
        self.report({"INFO"}, f"Keyed {anim.frames} frames at {fps:g} fps from {Path(self.filepath).name}{unused}")
        return {"FINISHED"}


class SPATIALAVATAR_OT_export_flame(_NeedsObject, bpy.types.Operator, ExportHelper):
    """Write the active object's FLAME animation to a flame_param.npz (one frame per scene frame)"""

    bl_idname = "spatialavatar.export_flame"
    bl_label = "Export FLAME Animation"

    filename_ext = ".npz"
    filter_glob: StringProperty(default="*.npz", options={"HIDDEN"})
    use_keyed_range: bpy.props.BoolProperty(name="Keyed range", default=True, description="Export the keyed frames (else the scene's frame range)")

    def execute(self, context: bpy.types.Context) -> set[str]:
        obj = context.active_object
        rng = animation_io.keyed_range(obj) if self.use_keyed_range else None
        start, end = rng or (context.scene.frame_start, context.scene.frame_end)
        try:
            anim = animation_io.export_file(obj, self.filepath, start, end)
        except (OSError, ValueError) as e:
            return fail(self, f"Could not write {self.filepath}: {e}")
        self.report({"INFO"}, f"Wrote {anim.frames} frames to {Path(self.filepath).name}")
        return {"FINISHED"}


def _rendered_avatars(cls: type[bpy.types.Operator], context: bpy.types.Context) -> bool:
    """Poll part of the final-render operators: the scene has avatar objects that render."""
    if not avatars.scene_avatars(context.scene, rendered=True):
        cls.poll_message_set("No avatar object in the scene renders: load or generate an avatar first")
        return False
    return True


class SPATIALAVATAR_OT_setup_compositing(bpy.types.Operator):
    """Composite the scene's avatars over its renders (adds compositor nodes, turns on the depth pass, hides the point previews from renders)"""

    bl_idname = "spatialavatar.setup_compositing"
    bl_label = "Set Up Compositing"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return _rendered_avatars(cls, context)

    def execute(self, context: bpy.types.Context) -> set[str]:
        compositing.setup_compositing(context.scene)
        n = len(avatars.scene_avatars(context.scene, rendered=True))
        self.report({"INFO"}, f"Compositing {n} avatar object(s) over the render")
        return {"FINISHED"}


class SPATIALAVATAR_OT_embed_avatars(bpy.types.Operator):
    """Keep the scene's avatar files inside the .blend, so any backend (a render farm worker's) can render them"""

    bl_idname = "spatialavatar.embed_avatars"
    bl_label = "Embed Avatars"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return _rendered_avatars(cls, context)

    def execute(self, context: bpy.types.Context) -> set[str]:
        s = compositing.render_settings()  # where renders go: $SPATIALAVATAR_ENDPOINT, else the preferences
        if why := preferences.blocked(s):
            return fail(self, why)
        total = 0
        try:
            with connection.open_client(s) as client:
                for obj in avatars.scene_avatars(context.scene, rendered=True):
                    total += compositing_avatars.embed(obj, avatars.avatar_id(obj), client)
        except connection.UserError as e:
            return fail(self, f"Could not embed the avatars: {e}")
        self.report({"INFO"}, f"Embedded {total / 1e6:.1f} MB of avatar files")
        return {"FINISHED"}


classes = (
    SPATIALAVATAR_OT_test_connection,
    SPATIALAVATAR_OT_list_avatars,
    SPATIALAVATAR_OT_load_avatar,
    SPATIALAVATAR_OT_import_flame,
    SPATIALAVATAR_OT_import_arkit,
    SPATIALAVATAR_OT_export_flame,
    SPATIALAVATAR_OT_setup_compositing,
    SPATIALAVATAR_OT_embed_avatars,
)
