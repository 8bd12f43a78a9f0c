"""Composited final renders: the service renders every avatar object at the scene camera, and
Blender's compositor Z-combines that over its own render.

How a render goes (F12, Ctrl-F12 and ``blender -b shot.blend -a`` alike; timers never run):

* ``render_init`` opens one client, asks ``hello`` and finds every avatar on the backend
  (importing the file a .blend carries when the backend lacks it, see ``compositing_avatars``).
* ``frame_change_post`` fires once per rendered frame, after Blender evaluated the frame's
  depsgraph and before its render engine and compositor run. The handler reads the evaluated
  camera, each avatar object's ``matrix_world`` and animated FLAME properties, takes the reply
  already requested for exactly that request or asks the service now, waits for it (with a
  timeout) and writes the merged RGBA and depth into two Blender images.
* Prefetch: in an animation render the handler also keeps ``CompositeConfig.prefetch_frames``
  frames in flight, requesting the next ones from their F-curves, so the service renders them
  while Blender renders this one. It starts at the first frame when the render is known to be
  an animation (``blender -b ... -a`` or the batch wrapper, see ``animation_render``), and at
  the second otherwise (F12 and Ctrl-F12 look alike at their first frame). Requests are
  keyed by frame and a fingerprint of the request; a reply whose request no longer matches
  what the frame evaluates to is forgotten, never used. Where F-curves cannot predict a frame
  (drivers, constraints, parents, NLA, camera markers: ``unpredictable``), each frame is
  requested when it is reached.
* The compositor graph made by ``setup_compositing``: the head's image over the render and the
  render over the head (two Alpha Overs, premultiplied) meet in a Z Combine that keeps, per
  pixel, the one whose depth is nearer. So meshes in front of a head hide it, the head hides
  what is behind it, and its soft edges blend with whichever is behind.

A failure (no backend, an avatar the backend lacks, a non-perspective camera) never passes
as a frame without the head: in background mode the handler ends Blender with status 1
before the frame is written; in the UI it raises (the message lands in the console and the
Info log) and the frame shows the error colour.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import bpy
import numpy as np
from bpy.app.handlers import persistent
from mathutils import Euler, Matrix, Quaternion, Vector

from . import compositing_frames as frames
from . import animation_io, avatars, compositing_avatars, connection, flame_data, pointcloud, preferences

ENDPOINT_ENV = "SPATIALAVATAR_ENDPOINT"  # overrides the preferences' address (batch renders, farms)
ANIMATION_ENV = "SPATIALAVATAR_ANIMATION"  # "1": this process renders an animation (set by the batch wrapper)
IMAGE_RGBA = "SpatialAvatar RGBA"
IMAGE_DEPTH = "SpatialAvatar Depth"
NODE_ZCOMBINE = "SpatialAvatar Z Combine"
NODE_RGBA = "SpatialAvatar RGBA"
NODE_DEPTH = "SpatialAvatar Depth"
NODE_OVER = "SpatialAvatar Head Over Render"
NODE_UNDER = "SpatialAvatar Render Over Head"
TREE_NAME = "SpatialAvatar Compositing"


@dataclass(frozen=True)
class CompositeConfig:
    """How long a frame may take and what a failed frame looks like."""

    frame_timeout_s: float = 300.0  # a CPU backend may need minutes for a 4K frame
    retries: int = 0  # a resent render would only start the same work again
    error_rgba: tuple[float, float, float, float] = (1.0, 0.0, 1.0, 1.0)
    # Frames of an animation render requested at once, the one being composited included
    # (1 or less: each frame when it is reached). Each holds one reply per avatar until it is
    # used: about 40 MB at 1920x1080 (float32 RGBA and depth).
    prefetch_frames: int = 4
    wait_poll_ms: int = 50  # a frame waiting for its replies wakes at least this often to check its deadline


CONFIG = CompositeConfig()


@dataclass
class FrameStats:
    """Where one frame's time went (seconds): the handler's wall time, its wait for the
    replies, the service's own render; and whether every reply was requested ahead."""

    frame: int
    handler_s: float
    request_s: float
    service_s: float
    prefetched: bool = False


@dataclass
class _Job:
    """One render job (render_init to render_complete / render_cancel)."""

    client: connection.wire_client.Client | None
    endpoint: str
    shown: dict[str, str]  # object name -> backend avatar id
    error: str | None = None
    stats: list[FrameStats] = field(default_factory=list)
    # (frame, fingerprint of the request) -> request id: a reply is used only for the frame
    # and the exact request it was made from.
    in_flight: dict[tuple[int, str], str] = field(default_factory=dict)
    replies: dict[str, connection.Reply] = field(default_factory=dict)  # final replies not yet used, by request id
    unpredictable: str | None = None  # why later frames cannot be requested ahead ("": they can; None: not asked yet)
    animation: bool = False  # known at render_init to be an animation render: prefetch from its first frame
    shared: bool = False  # the service is on this machine: frames come through shared memory


_job: _Job | None = None
last_stats: list[FrameStats] = []  # the last finished job's per-frame times (benchmarks read it)


class CompositeError(RuntimeError):
    """A composited frame cannot be made; the message says why and what to do."""


def render_settings() -> connection.Settings:
    """The preferences' connection settings (defaults when the add-on is registered without
    preferences, as in a development checkout), with ``$SPATIALAVATAR_ENDPOINT`` on top."""
    addon = bpy.context.preferences.addons.get(__package__)
    s = preferences.settings() if addon is not None and addon.preferences is not None else connection.Settings()
    endpoint = os.environ.get(ENDPOINT_ENV, "").strip()
    return connection.Settings(endpoint or s.endpoint, CONFIG.frame_timeout_s, CONFIG.retries, s.key_dir)


# -- the compositor graph: the only code that knows Blender 4.2-4.5 from 5.x ----------------
# The tree and its output are told apart by version; node options that moved from properties
# to input sockets during 4.x/5.x are found by the socket's name.


def _compositor_tree(scene: bpy.types.Scene, create: bool) -> bpy.types.NodeTree | None:
    if bpy.app.version >= (5, 0, 0):
        tree = scene.compositing_node_group
        if tree is None and create:
            tree = bpy.data.node_groups.new(TREE_NAME, "CompositorNodeTree")
            scene.compositing_node_group = tree
        return tree
    if create:
        scene.use_nodes = True
    return scene.node_tree


def _output_socket(tree: bpy.types.NodeTree) -> bpy.types.NodeSocket:
    """The socket whose image becomes the render result."""
    if bpy.app.version >= (5, 0, 0):
        if not any(i.in_out == "OUTPUT" for i in tree.interface.items_tree if i.item_type == "SOCKET"):
            tree.interface.new_socket("Image", in_out="OUTPUT", socket_type="NodeSocketColor")
        out = next((n for n in tree.nodes if n.bl_idname == "NodeGroupOutput"), None) or tree.nodes.new("NodeGroupOutput")
        return out.inputs[0]
    out = next((n for n in tree.nodes if n.bl_idname == "CompositorNodeComposite"), None) or tree.nodes.new("CompositorNodeComposite")
    return out.inputs["Image"]


def _alpha_over_inputs(node: bpy.types.Node) -> tuple[bpy.types.NodeSocket, bpy.types.NodeSocket]:
    """(background, foreground) of an Alpha Over node, whose default is premultiplied colour.
    By name where the sockets have names (5.x), else by position (Fac, Image, Image)."""
    if "Background" in node.inputs:
        return node.inputs["Background"], node.inputs["Foreground"]
    return node.inputs[1], node.inputs[2]


def _z_combine_hard(node: bpy.types.Node) -> None:
    """Pick the nearer input per pixel, nothing else: the Alpha Overs feeding it already blend
    the soft edges (Z Combine's own alpha option takes straight colour, which the service's is not).
    The options are input sockets where the node has them (5.x), else node properties."""
    if "Use Alpha" in node.inputs:
        node.inputs["Use Alpha"].default_value = False
        node.inputs["Anti-Alias"].default_value = False
    else:
        node.use_alpha = False
        node.use_antialias_z = False


# ---------------------------------------------------------------------------------------------


def _render_size(scene: bpy.types.Scene) -> tuple[int, int]:
    return frames.bcm.blender_resolution(scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage)


def _image(name: str, width: int, height: int, data: bool) -> bpy.types.Image:
    img = bpy.data.images.get(name)
    if img is None:
        img = bpy.data.images.new(name, width, height, alpha=True, float_buffer=True)
    elif tuple(img.size) != (width, height):
        img.scale(width, height)
    if data:
        img.colorspace_settings.is_data = True  # depth values, no colour transform
    else:
        img.alpha_mode = "PREMUL"  # the service's colour is premultiplied, as the compositor's
    return img


def setup_compositing(scene: bpy.types.Scene) -> None:
    """Build (once) the compositor nodes that lay the avatars over the render.

    The Z Combine goes right before the output, so whatever already feeds the output (the
    Render Layers, or a grading chain) is kept as the background. The depth pass is switched
    on, and avatar objects' point previews are left out of Blender's own render.
    """
    width, height = _render_size(scene)
    rgba, depth = _image(IMAGE_RGBA, width, height, False), _image(IMAGE_DEPTH, width, height, True)
    scene.render.use_compositing = True
    scene.render.use_lock_interface = True  # the handler writes images while the render runs
    for obj in points_in_render(scene):
        obj.modifiers[pointcloud.MODIFIER].show_render = False  # the service draws the head; the bare vertices render nothing
    tree = _compositor_tree(scene, create=True)
    if NODE_ZCOMBINE in tree.nodes:
        return
    nodes, links = tree.nodes, tree.links
    layers = next((n for n in nodes if n.bl_idname == "CompositorNodeRLayers"), None) or nodes.new("CompositorNodeRLayers")
    scene.view_layers[layers.layer or 0].use_pass_z = True
    output = _output_socket(tree)
    background = output.links[0].from_socket if output.is_linked else layers.outputs["Image"]
    image_node = nodes.new("CompositorNodeImage")
    image_node.name, image_node.image = NODE_RGBA, rgba
    depth_node = nodes.new("CompositorNodeImage")
    depth_node.name, depth_node.image = NODE_DEPTH, depth
    # Per pixel: the head over the render where the head is nearer, the render over the head elsewhere.
    over, under = nodes.new("CompositorNodeAlphaOver"), nodes.new("CompositorNodeAlphaOver")
    over.name, under.name = NODE_OVER, NODE_UNDER
    for node, (back, front) in ((over, (background, image_node.outputs[0])), (under, (image_node.outputs[0], background))):
        back_in, front_in = _alpha_over_inputs(node)
        links.new(back, back_in)
        links.new(front, front_in)
    z = nodes.new("CompositorNodeZcombine")
    z.name = NODE_ZCOMBINE
    _z_combine_hard(z)
    # Inputs by position: (image, depth) of one candidate, then of the other, in every version.
    links.new(over.outputs[0], z.inputs[0])
    links.new(depth_node.outputs[0], z.inputs[1])
    links.new(under.outputs[0], z.inputs[2])
    links.new(layers.outputs["Depth"], z.inputs[3])
    links.new(z.outputs[0], output)


def is_set_up(scene: bpy.types.Scene) -> bool:
    """Whether ``setup_compositing`` built this scene's compositor nodes."""
    tree = _compositor_tree(scene, create=False)
    return tree is not None and NODE_ZCOMBINE in tree.nodes


def points_in_render(scene: bpy.types.Scene) -> list[bpy.types.Object]:
    """Avatar objects whose point preview Blender would still render (added after ``setup_compositing``)."""
    found = []
    for obj in avatars.scene_avatars(scene, rendered=True):
        mod = obj.modifiers.get(pointcloud.MODIFIER)
        if mod is not None and mod.show_render:
            found.append(obj)
    return found


class _Evaluated:
    """An object's inputs at the frame Blender's depsgraph evaluated (drivers, constraints, NLA included)."""

    def __init__(self, depsgraph: bpy.types.Depsgraph) -> None:
        self.depsgraph = depsgraph

    def camera(self, scene: bpy.types.Scene) -> tuple[Any, np.ndarray | None]:
        cam = self.depsgraph.scene_eval.camera
        return cam, None if cam is None else np.array(cam.matrix_world)

    def avatar(self, obj: bpy.types.Object) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        ev = obj.evaluated_get(self.depsgraph)
        return np.array(ev.matrix_world), getattr(ev, flame_data.PROP_GROUP).buffers()


# What ``frames.blender_camera`` reads of the camera's data.
_CAMERA_FIELDS = ("type", "lens", "sensor_width", "sensor_height", "sensor_fit", "shift_x", "shift_y")
_FLAME_VECTORS = (*(flame_data.expr_chunk_name(c) for c in range(flame_data.EXPR_CHUNKS)), *flame_data.POSE_FIELDS)


class _AtFrame:
    """An object's inputs at another frame, from its F-curves, without changing the current
    frame. Exact only where ``unpredictable`` finds nothing else moving them; a wrong guess
    costs a request, never a frame (requests are matched by fingerprint)."""

    def __init__(self, frame: int) -> None:
        self.frame = frame
        self._curves: dict[int, dict[tuple[str, int], bpy.types.FCurve]] = {}

    def value(self, id_data: bpy.types.ID, path: str, index: int | None = None) -> Any:
        """The property at ``path`` (element ``index``) at this frame: its F-curve, else its value now."""
        key = id_data.as_pointer()
        if key not in self._curves:
            fcurves = animation_io.fcurve_collection(id_data, create=False) or ()
            self._curves[key] = {(fc.data_path, fc.array_index): fc for fc in fcurves if not fc.mute}
        fc = self._curves[key].get((path, index or 0))
        if fc is not None:
            return fc.evaluate(self.frame)
        v = id_data.path_resolve(path)
        return v if index is None else v[index]

    def vector(self, id_data: bpy.types.ID, path: str) -> list[float]:
        return [self.value(id_data, path, i) for i in range(len(id_data.path_resolve(path)))]

    def matrix(self, obj: bpy.types.Object) -> np.ndarray:
        """``matrix_world`` of an object without parent or constraints, composed as Blender does."""
        mode = obj.rotation_mode
        if mode == "QUATERNION":
            rot = Quaternion(self.vector(obj, "rotation_quaternion")).normalized().to_matrix()
            delta = Quaternion(self.vector(obj, "delta_rotation_quaternion")).normalized().to_matrix()
        elif mode == "AXIS_ANGLE":
            angle, *axis = self.vector(obj, "rotation_axis_angle")
            rot, delta = Matrix.Rotation(angle, 3, Vector(axis)), Matrix.Identity(3)
        else:
            rot = Euler(self.vector(obj, "rotation_euler"), mode).to_matrix()
            delta = Euler(self.vector(obj, "delta_rotation_euler"), mode).to_matrix()
        loc = Vector(self.vector(obj, "location")) + Vector(self.vector(obj, "delta_location"))
        scale = Vector(self.vector(obj, "scale")) * Vector(self.vector(obj, "delta_scale"))
        return np.array(Matrix.LocRotScale(loc, delta @ rot, scale))

    def camera(self, scene: bpy.types.Scene) -> tuple[Any, np.ndarray | None]:
        cam = scene.camera
        if cam is None or cam.type != "CAMERA":
            return cam, None
        data = SimpleNamespace(**{f: self.value(cam.data, f) for f in _CAMERA_FIELDS})
        return SimpleNamespace(name=cam.name, type=cam.type, data=data), self.matrix(cam)

    def avatar(self, obj: bpy.types.Object) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        values = {n: self.vector(obj, f"{flame_data.PROP_GROUP}.{n}") for n in _FLAME_VECTORS}
        count = int(self.value(obj, f"{flame_data.PROP_GROUP}.expression_count"))
        return self.matrix(obj), flame_data.frame_buffers(values, count)


def _requests(scene: bpy.types.Scene, shown: dict[str, str], inputs: _Evaluated | _AtFrame) -> list[frames.RenderRequest]:
    """The service requests of one frame, one per avatar object (``shown``: object name -> id)."""
    cam, cam_matrix = inputs.camera(scene)
    try:
        camera = frames.blender_camera(cam, scene.render)
    except ValueError as e:
        raise CompositeError(str(e)) from e
    out = []
    for name, aid in shown.items():
        matrix, flame = inputs.avatar(scene.objects[name])
        try:
            out.append(frames.render_request(aid, camera, cam_matrix, matrix, flame, crop=True))
        except ValueError as e:
            raise CompositeError(f"object '{name}': {e}") from e
    return out


def frame_requests(scene: bpy.types.Scene, depsgraph: bpy.types.Depsgraph, shown: dict[str, str]) -> list[frames.RenderRequest]:
    """The service requests of this evaluated frame, one per avatar object (``shown``: object name -> id)."""
    return _requests(scene, shown, _Evaluated(depsgraph))


def predicted_requests(scene: bpy.types.Scene, shown: dict[str, str], frame: int) -> list[frames.RenderRequest]:
    """The requests ``frame_requests`` will make at ``frame``, from F-curves, while Blender is
    at another frame; valid where ``unpredictable`` finds nothing."""
    return _requests(scene, shown, _AtFrame(frame))


def _animation_blocker(id_data: bpy.types.ID) -> str | None:
    adt = id_data.animation_data
    if adt is None:
        return None
    if len(adt.drivers):
        return "drivers"
    if any(not t.mute for t in adt.nla_tracks):
        return "NLA strips"
    if adt.action is not None and (adt.action_influence != 1.0 or adt.action_blend_type != "REPLACE"):
        return "a blended action"
    return None


def unpredictable(scene: bpy.types.Scene, shown: dict[str, str]) -> str | None:
    """Why F-curves alone do not give later frames' camera, transforms and FLAME values
    (drivers, constraints, parents, NLA, camera markers, animated render settings), or None."""
    if any(m.camera is not None for m in scene.timeline_markers):
        return "timeline markers switch cameras"
    if why := _animation_blocker(scene):
        return f"the scene has {why}"
    if any(fc.data_path.startswith("render.") for fc in animation_io.fcurve_collection(scene, create=False) or ()):
        return "the render settings are animated"
    objects = [scene.objects[name] for name in shown]
    if scene.camera is not None:
        objects.append(scene.camera)
    for obj in objects:
        if obj.parent is not None:
            return f"object '{obj.name}' has a parent"
        if len(obj.constraints):
            return f"object '{obj.name}' has constraints"
        for id_data in (obj, obj.data):
            if id_data is not None and (why := _animation_blocker(id_data)):
                return f"'{id_data.name}' has {why}"
    return None


def _write_images(rgba: np.ndarray, depth: np.ndarray) -> None:
    h, w = depth.shape
    color_px, depth_px = frames.blender_pixels(rgba, depth)
    for name, px in ((IMAGE_RGBA, color_px), (IMAGE_DEPTH, depth_px)):
        img = bpy.data.images[name]
        if tuple(img.size) != (w, h):
            img.scale(w, h)
        img.pixels.foreach_set(px)
        img.update()


def _submit(job: _Job, req: frames.RenderRequest) -> str:
    # A request queued behind the window's others stays silent longer than one frame's timeout;
    # each frame's own wait is timed in ``_reply``.
    try:
        args = req.args | ({"shared_memory": True} if job.shared else {})
        return job.client.submit("render", args, req.arrays, timeout_s=CONFIG.frame_timeout_s * max(1, CONFIG.prefetch_frames))
    except connection.UserError as e:
        raise CompositeError(f"the backend at {job.endpoint} did not render avatar {req.args['avatar']}: {e}") from e


def _forget(job: _Job, keys: list[tuple[int, str]]) -> None:
    for key in keys:
        rid = job.in_flight.pop(key)
        job.client.forget(rid)
        job.replies.pop(rid, None)


def _prefetch(scene: bpy.types.Scene, job: _Job, frame: int) -> None:
    """Request the window's frames after ``frame`` that are not in flight yet."""
    if job.unpredictable is None:
        job.unpredictable = unpredictable(scene, job.shown) or ""
        if job.unpredictable:
            print(f"SpatialAvatar: frames are requested as they are reached: {job.unpredictable}", file=sys.stderr, flush=True)
    if job.unpredictable:
        return
    ahead = {f for f, _ in job.in_flight}
    for f in frames.window(frame, scene.frame_end, scene.frame_step, CONFIG.prefetch_frames):
        if f in ahead:
            continue
        try:
            for req in predicted_requests(scene, job.shown, f):
                key = (f, frames.fingerprint(req))
                if key not in job.in_flight:
                    job.in_flight[key] = _submit(job, req)
        except CompositeError:
            continue  # that frame fails with its message when it is reached


def _reply(job: _Job, rid: str, req: frames.RenderRequest, deadline: float) -> tuple[tuple[np.ndarray, np.ndarray], float]:
    """The layer (``frames.layer``) of request ``rid`` and the service's milliseconds for it,
    waiting for its final reply until ``deadline`` (``time.monotonic`` seconds)."""
    aid = req.args["avatar"]
    while rid not in job.replies:
        for r in job.client.poll(wait_ms=CONFIG.wait_poll_ms):
            if r.final:
                job.replies[r.id] = r
        if rid in job.replies:
            break
        if time.monotonic() > deadline:
            job.client.forget(rid)
            raise CompositeError(f"the backend at {job.endpoint} did not render avatar {aid} within {CONFIG.frame_timeout_s:g} s")
    try:
        reply = job.replies.pop(rid).raise_for_error()
        return frames.layer(req, reply.arrays, reply.result), float(reply.result.get("render_ms", 0.0))
    except connection.UserError as e:
        raise CompositeError(f"the backend at {job.endpoint} did not render avatar {aid}: {e}") from e


def _render_frame(scene: bpy.types.Scene, depsgraph: bpy.types.Depsgraph, job: _Job) -> None:
    t0 = time.perf_counter()
    frame = scene.frame_current
    requests = frame_requests(scene, depsgraph, job.shown)
    claimed = [job.in_flight.pop((frame, frames.fingerprint(req)), None) for req in requests]
    ids = [rid if rid is not None else _submit(job, req) for rid, req in zip(claimed, requests)]
    # What is left for this frame (or one passed) was made from parameters that changed since.
    _forget(job, [key for key in job.in_flight if key[0] <= frame])
    if job.stats or job.animation:  # an animation: keep its next frames in flight
        _prefetch(scene, job, frame)
    deadline = time.monotonic() + CONFIG.frame_timeout_s
    layers, request_s, service_s = [], 0.0, 0.0
    for req, rid in zip(requests, ids):
        t1 = time.perf_counter()
        layer, render_ms = _reply(job, rid, req, deadline)
        request_s += time.perf_counter() - t1
        service_s += render_ms / 1e3
        layers.append(layer)
    _write_images(*frames.combine_layers(layers))
    job.stats.append(FrameStats(frame, time.perf_counter() - t0, request_s, service_s, all(r is not None for r in claimed)))


def _start(scene: bpy.types.Scene) -> _Job:
    s = render_settings()
    if why := preferences.blocked(s):
        raise CompositeError(why)
    client = connection.open_client(s)
    try:
        hello = client.call("hello", timeout_s=min(s.timeout_s, 10.0)).result
    except connection.UserError as e:
        client.close()
        raise CompositeError(f"no SpatialAvatar backend answers at {s.endpoint} ({e}); start `spatialavatar serve` first") from e
    try:
        shown = {o.name: compositing_avatars.resolve(client, o, avatars.avatar_id(o)) for o in avatars.scene_avatars(scene, rendered=True)}
    except (compositing_avatars.MissingAvatar, connection.UserError) as e:
        client.close()
        raise CompositeError(f"the backend at {s.endpoint} cannot provide every avatar: {e}") from e
    return _Job(client, s.endpoint, shown, animation=animation_render(), shared=connection.wire_client.can_share(hello))


def animation_render() -> bool:
    """Whether this process is known to render an animation: Blender started in background mode
    with ``-a`` / ``--render-anim``, or ``ANIMATION_ENV`` set to "1". Blender tells a
    ``render_init`` handler nothing more, so an animation started from the UI is recognised at
    its second frame."""
    if os.environ.get(ANIMATION_ENV) == "1":
        return True
    return bpy.app.background and any(arg in ("-a", "--render-anim") for arg in sys.argv)


def _fail(job: _Job, message: str) -> None:
    """Stop a frame that would lack its avatars: exit in background mode, raise in the UI."""
    job.error = message
    print(f"SpatialAvatar: {message}", file=sys.stderr, flush=True)
    if bpy.app.background:
        # Blender turns SystemExit from a handler into its own exit (status 1) before the frame is written.
        raise SystemExit(f"SpatialAvatar: render stopped: {message}")
    raise CompositeError(message)


def _finish() -> None:
    global _job, last_stats
    if _job is not None:
        if _job.client is not None:
            _forget(_job, list(_job.in_flight))
            _job.client.close()
        _job.replies.clear()
        last_stats = _job.stats
    _job = None


@persistent
def _on_render_init(scene: bpy.types.Scene, _depsgraph: object = None) -> None:
    global _job
    _finish()
    if not is_set_up(scene):
        return
    w, h = _render_size(scene)
    _write_images(np.zeros((h, w, 4), np.float32), np.full((h, w), frames.FAR_DEPTH, np.float32))  # no stale head
    if not avatars.scene_avatars(scene, rendered=True):
        return
    try:
        _job = _start(scene)
    except CompositeError as e:
        _job = _Job(None, "", {})
        _fail(_job, str(e))


@persistent
def _on_frame_change_post(scene: bpy.types.Scene, depsgraph: bpy.types.Depsgraph | None = None) -> None:
    job = _job
    if job is None or depsgraph is None:
        return
    if job.error is None:
        try:
            _render_frame(scene, depsgraph, job)
            return
        except CompositeError as e:
            job.error = str(e)
    w, h = _render_size(scene)
    _write_images(np.broadcast_to(np.float32(CONFIG.error_rgba), (h, w, 4)), np.zeros((h, w), np.float32))
    _fail(job, job.error)


@persistent
def _on_render_end(_scene: bpy.types.Scene, _depsgraph: object = None) -> None:
    _finish()


_HANDLERS = (
    ("render_init", _on_render_init),
    ("frame_change_post", _on_frame_change_post),
    ("render_complete", _on_render_end),
    ("render_cancel", _on_render_end),
)


def register() -> None:
    for name, fn in _HANDLERS:
        getattr(bpy.app.handlers, name).append(fn)


def unregister() -> None:
    _finish()
    for name, fn in _HANDLERS:
        handlers = getattr(bpy.app.handlers, name)
        if fn in handlers:
            handlers.remove(fn)
