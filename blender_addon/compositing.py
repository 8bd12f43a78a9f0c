"""Composited final renders: the service renders every avatar object at the scene camera, and
Blender's compositor Z-combines that over its own render.

How a render goes (F12, Ctrl-F12 and ``blender -b shot.blend -a`` alike; timers never run):

* ``render_init`` opens one client, asks ``hello`` and finds every avatar on the backend
  (importing the file a .blend carries when the backend lacks it, see ``compositing_avatars``).
* ``frame_change_post`` fires once per rendered frame, after Blender evaluated the frame's
  depsgraph and before its render engine and compositor run. The handler reads the evaluated
  camera, each avatar object's ``matrix_world`` and animated FLAME properties, asks the service
  for that frame (blocking, with a timeout) and writes the merged RGBA and depth into two
  Blender images.
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

import bpy
import numpy as np
from bpy.app.handlers import persistent

from . import compositing_frames as frames
from . import avatars, compositing_avatars, connection, flame_data, pointcloud, preferences

ENDPOINT_ENV = "SPATIALAVATAR_ENDPOINT"  # overrides the preferences' address (batch renders, farms)
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


CONFIG = CompositeConfig()


@dataclass
class FrameStats:
    """Where one frame's time went (seconds): the handler's wall time, the service's own render."""

    frame: int
    handler_s: float
    request_s: float
    service_s: float


@dataclass
class _Job:
    """One render job (render_init to render_complete / render_cancel)."""

    client: connection.wire_client.Client | None
    endpoint: str
    shown: dict[str, str]  # object name -> backend avatar id
    error: str | None = None
    stats: list[FrameStats] = field(default_factory=list)


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


def frame_requests(scene: bpy.types.Scene, depsgraph: bpy.types.Depsgraph, shown: dict[str, str]) -> list[frames.RenderRequest]:
    """The service requests of this evaluated frame, one per avatar object (``shown``: object name -> id)."""
    cam = depsgraph.scene_eval.camera
    try:
        camera = frames.blender_camera(cam, scene.render)
    except ValueError as e:
        raise CompositeError(str(e)) from e
    out = []
    for name, aid in shown.items():
        obj = scene.objects[name].evaluated_get(depsgraph)
        flame = getattr(obj, flame_data.PROP_GROUP).buffers()
        try:
            out.append(frames.render_request(aid, camera, np.array(cam.matrix_world), np.array(obj.matrix_world), flame))
        except ValueError as e:
            raise CompositeError(f"object '{name}': {e}") from e
    return out


def _write_images(rgba: np.ndarray, depth: np.ndarray) -> None:
    h, w = depth.shape
    color_px, depth_px = frames.blender_pixels(rgba, depth)
    for name, px in ((IMAGE_RGBA, color_px), (IMAGE_DEPTH, depth_px)):
        img = bpy.data.images[name]
        if tuple(img.size) != (w, h):
            img.scale(w, h)
        img.pixels.foreach_set(px)
        img.update()


def _render_frame(scene: bpy.types.Scene, depsgraph: bpy.types.Depsgraph, job: _Job) -> None:
    t0 = time.perf_counter()
    requests = frame_requests(scene, depsgraph, job.shown)
    layers, request_s, service_s = [], 0.0, 0.0
    for req in requests:
        t1 = time.perf_counter()
        try:
            reply = job.client.call("render", req.args, req.arrays)
        except connection.UserError as e:
            raise CompositeError(f"the backend at {job.endpoint} did not render avatar {req.args['avatar']}: {e}") from e
        request_s += time.perf_counter() - t1
        service_s += float(reply.result.get("render_ms", 0.0)) / 1e3
        layers.append((reply.arrays["rgba"], reply.arrays["depth"] * req.depth_scale))
    _write_images(*frames.combine_layers(layers))
    job.stats.append(FrameStats(scene.frame_current, time.perf_counter() - t0, request_s, service_s))


def _start(scene: bpy.types.Scene) -> _Job:
    s = render_settings()
    if why := preferences.blocked(s):
        raise CompositeError(why)
    client = connection.open_client(s)
    try:
        client.call("hello", timeout_s=min(s.timeout_s, 10.0))
    except connection.UserError as e:
        client.close()
        raise CompositeError(f"no SpatialAvatar backend answers at {s.endpoint} ({e}); start `spatialavatar serve` first") from e
    try:
        shown = {o.name: compositing_avatars.resolve(client, o, avatars.avatar_id(o)) for o in avatars.scene_avatars(scene, rendered=True)}
    except (compositing_avatars.MissingAvatar, connection.UserError) as e:
        client.close()
        raise CompositeError(f"the backend at {s.endpoint} cannot provide every avatar: {e}") from e
    return _Job(client, s.endpoint, shown)


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
            _job.client.close()
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
