"""The compositor graph that lays the avatars over Blender's render, and the two images it reads.

The graph made by ``setup_compositing``: the head's image over the render and the render over
the head (two Alpha Overs, premultiplied) meet in a Z Combine that keeps, per pixel, the one
whose depth is nearer. So meshes in front of a head hide it, the head hides what is behind
it, and its soft edges blend with whichever is behind.

This is the only code that knows Blender 4.2-4.5 from 5.x: the tree and its output are told
apart by version; node options that moved from properties to input sockets are found by the
socket's name.
"""

from __future__ import annotations

import bpy
import numpy as np

from . import avatars, pointcloud
from . import compositing_frames as frames

IMAGE_RGBA = "SpatialAvatar RGBA"
IMAGE_DEPTH = "SpatialAvatar Depth"
NODE_ZCOMBINE = "SpatialAvatar Z Combine"
NODE_RGBA = "SpatialAvatar RGBA"
NODE_DEPTH = "SpatialAvatar Depth"
NODE_OVER = "SpatialAvatar Head Over Render"
NODE_UNDER = "SpatialAvatar Render Over Head"
TREE_NAME = "SpatialAvatar Compositing"


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


def render_size(scene: bpy.types.Scene) -> tuple[int, int]:
    """(width, height) of the scene's render in pixels, its percentage applied."""
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


def write_images(rgba: np.ndarray, depth: np.ndarray) -> None:
    """Write a frame into the two images the graph reads: ``rgba`` [H, W, 4] premultiplied and
    ``depth`` [H, W] in Blender units, both with row 0 at the top."""
    h, w = depth.shape
    color_px, depth_px = frames.blender_pixels(rgba, depth)
    for name, px in ((IMAGE_RGBA, color_px), (IMAGE_DEPTH, depth_px)):
        img = bpy.data.images[name]
        if tuple(img.size) != (w, h):
            img.scale(w, h)
        img.pixels.foreach_set(px)
        img.update()


def setup_compositing(scene: bpy.types.Scene) -> None:
    """Build (once) the compositor nodes that lay the avatars over the render.

    The Z Combine goes right before the output, so whatever already feeds the output (the
    Render Layers, or a grading chain) is kept as the background. The depth pass is switched
    on, and avatar objects' point previews are left out of Blender's own render.
    """
    width, height = render_size(scene)
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
