"""The demo's .blend, built by Blender (the bpy module) in its own process: ``python -m backend.demo.scene SPEC.json``.

It takes the avatar from a running backend the way the add-on's Load Avatar does
(``connection.neutral_gaussians`` -> ``avatars.add_object``: the point-cloud object with every
Gaussian attribute on its mesh and the FLAME properties of ``flame_props``), keeps the
avatar's file inside the .blend (``compositing_avatars.embed``, so any backend can render it),
builds a small set around it (floor, backdrop, a plinth, two cubes, an area light, a camera),
keys a performance on the FLAME properties and sets up the add-on's compositing.

No torch here: only bpy, numpy and the add-on from this checkout. Blender's world is +z up;
the avatar object faces -y (see ``pointcloud.create_avatar_object``). Lengths are metres.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import bpy

AVATAR_OBJECT = "Avatar"
BACKEND_TIMEOUT_S = 120.0  # a neutral deform with statics of a large avatar on a busy CPU backend
Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class SceneSpec:
    """What the scene needs; written as JSON by the pipeline.

    Attributes:
        endpoint: the running backend that holds ``avatar``.
        avatar: the backend's avatar id.
        blend: the .blend to write.
        frames: animation length; the scene runs from frame 1 to ``frames``.
        size: render width and height, pixels.
        samples: Cycles samples per pixel (denoised).
        fps: frames per second.
        blink_closed: the blink units' coefficient that closes the lids.
        rest_expression: the portrait's own tracked coefficients of the head's named units:
            the performance starts and ends there and keys its smile and brows on top, so the
            first frame looks like the photo and a smile in the photo is not smiled twice.
    """

    endpoint: str
    avatar: str
    blend: str
    frames: int
    size: int
    samples: int
    fps: int
    blink_closed: float
    rest_expression: dict[str, float] = field(default_factory=dict)

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=1))
        return path


# The performance, keyed on the FLAME properties. Times are fractions of the animation; blinks
# are in frames around a time, because a blink lasts a fixed few frames whatever the length.
# (channel, [(time, value)]): a channel is a named expression unit of the head model, or
# (pose property, element). Values: radians for poses; for expressions, coefficients added to
# the portrait's own (``SceneSpec.rest_expression``). One photo shows no mouth interior, so the
# jaw opens only as far as speech does: wider, the lips' teeth part from the closed ones behind.
POSE_KEYS: tuple[tuple[tuple[str, int], tuple[tuple[float, float], ...]], ...] = (
    (("neck_pose", 1), ((0.0, 0.0), (0.25, 0.3), (0.65, -0.3), (1.0, 0.0))),  # head turn (yaw)
    (("neck_pose", 0), ((0.0, 0.0), (0.45, 0.12), (0.8, -0.06), (1.0, 0.0))),  # nod (pitch)
    (("jaw_pose", 0), ((0.0, 0.0), (0.5, 0.0), (0.6, 0.1), (0.72, 0.0), (1.0, 0.0))),  # jaw opens
)
EXPRESSION_KEYS: tuple[tuple[str, tuple[tuple[float, float], ...]], ...] = tuple(
    (f"{unit}_{side}", keys)
    for unit, keys in (
        ("smile", ((0.0, 0.0), (0.08, 0.0), (0.25, 1.0), (0.45, 1.0), (0.58, 0.0), (1.0, 0.0))),
        ("brow_raise", ((0.0, 0.0), (0.75, 0.0), (0.88, 2.2), (1.0, 0.0))),
    )
    for side in ("L", "R")
)
BLINK_UNITS = ("blink_L", "blink_R")
BLINK_TIMES = (0.15, 0.8)
BLINK_HALF_FRAMES = 2  # open -> closed -> open over 2 * this many frames


def key_frame(time: float, frames: int) -> int:
    """Animation time in [0, 1] -> scene frame in 1..frames."""
    return 1 + round(time * (frames - 1))


def _key(obj: bpy.types.Object, prop: str, index: int, keys: list[tuple[int, float]]) -> None:
    group = obj.spatialavatar_flame
    for frame, value in keys:
        getattr(group, prop)[index] = value
        group.keyframe_insert(prop, index=index, frame=frame)


def animate(obj: bpy.types.Object, frames: int, blink_closed: float, rest: dict[str, float]) -> list[str]:
    """Key the performance on ``obj``'s FLAME properties, expressions on top of ``rest`` (named
    units; the others stay at their value); returns the channels keyed (labels)."""
    from blender_addon import flame_data

    labels = obj.spatialavatar_flame.labels()
    for name, value in rest.items():
        if name in labels:
            prop, index = flame_data.expr_location(labels.index(name))
            getattr(obj.spatialavatar_flame, prop)[index] = value
    keyed = []
    for (prop, index), keys in POSE_KEYS:
        _key(obj, prop, index, [(key_frame(t, frames), v) for t, v in keys])
        keyed.append(f"{prop}[{index}]")
    def blinks(unit: str) -> list[tuple[int, float]]:  # from the lid's rest to closed and back
        open_ = rest.get(unit, 0.0)
        keys = []
        for t in BLINK_TIMES:
            mid = key_frame(t, frames)
            keys += [(max(1, mid - BLINK_HALF_FRAMES), open_), (mid, blink_closed), (min(frames, mid + BLINK_HALF_FRAMES), open_)]
        return keys

    expression_keys = [(name, [(key_frame(t, frames), rest.get(name, 0.0) + v) for t, v in keys]) for name, keys in EXPRESSION_KEYS]
    for name, keys in expression_keys + [(unit, blinks(unit)) for unit in BLINK_UNITS]:
        if name not in labels:  # a head without named units (real FLAME) keeps its poses only
            continue
        prop, index = flame_data.expr_location(labels.index(name))
        _key(obj, prop, index, keys)
        keyed.append(name)
    return keyed


def _node_tree(block: bpy.types.Material | bpy.types.World) -> bpy.types.NodeTree:
    """A material's or world's shader nodes: before Blender 5.0 a new one starts without them."""
    import bpy

    if bpy.app.version < (5, 0, 0):
        block.use_nodes = True
    return block.node_tree


def _material(name: str, rgb: Vec3, roughness: float = 0.6) -> bpy.types.Material:
    import bpy

    mat = bpy.data.materials.new(name)
    bsdf = _node_tree(mat).nodes["Principled BSDF"]
    bsdf.inputs["Base Color"].default_value = (*rgb, 1.0)
    bsdf.inputs["Roughness"].default_value = roughness
    return mat


def _box(name: str, centre: Vec3, size: Vec3, mat: bpy.types.Material, yaw: float = 0.0) -> bpy.types.Object:
    """An axis-aligned box of ``size`` (full extents) at ``centre``, turned ``yaw`` radians about z."""
    import bpy

    mesh = bpy.data.meshes.new(name)
    corners = [(x, y, z) for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)]
    mesh.from_pydata(corners, [], [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)])
    mesh.materials.append(mat)
    obj = bpy.data.objects.new(name, mesh)
    obj.location, obj.scale, obj.rotation_euler = centre, size, (0.0, 0.0, yaw)
    bpy.context.scene.collection.objects.link(obj)
    return obj


def _aim(obj: bpy.types.Object, target: Vec3) -> None:
    """Turn a camera or light (which look down their local -z) toward ``target``."""
    from mathutils import Vector

    obj.rotation_euler = (Vector(target) - obj.location).to_track_quat("-Z", "Y").to_euler()


def build_set(scene: bpy.types.Scene, head_min: np.ndarray, head_max: np.ndarray) -> None:
    """Floor, backdrop, a plinth under the neck, two cubes, an area light, a world fill and the
    camera, placed from the head's bounding box (Blender coordinates, metres)."""
    import bpy

    cx, cy = (head_min[:2] + head_max[:2]) / 2
    top, bottom = float(head_max[2]), float(head_min[2])
    centre_z = (top + bottom) / 2 + 0.05 * (top - bottom)  # the face sits above the box's middle (the neck is long)
    plinth_top = bottom + 0.06  # hides the cut end of the neck
    floor_z = plinth_top - 0.22
    grey = _material("Set Grey", (0.55, 0.56, 0.58), 0.8)
    clay, slate = _material("Clay", (0.62, 0.25, 0.14)), _material("Slate", (0.16, 0.25, 0.38))
    _box("Floor", (cx, cy + 1.0, floor_z - 0.01), (6.0, 6.0, 0.02), grey)
    _box("Backdrop", (cx, cy + 1.3, floor_z + 1.5), (6.0, 0.02, 3.0), grey)
    _box("Plinth", (cx, cy, (plinth_top + floor_z) / 2), (0.2, 0.2, plinth_top - floor_z), _material("Plinth", (0.8, 0.79, 0.76), 0.5))
    _box("Cube", (cx + 0.25, cy + 0.1, floor_z + 0.07), (0.14, 0.14, 0.14), clay, yaw=0.45)
    _box("Small Cube", (cx - 0.26, cy + 0.15, floor_z + 0.045), (0.09, 0.09, 0.09), slate, yaw=-0.3)

    light = bpy.data.objects.new("Key Light", bpy.data.lights.new("Key Light", "AREA"))
    light.data.energy, light.data.size = 35.0, 0.8
    light.location = (cx - 0.9, cy - 1.0, centre_z + 0.9)
    _aim(light, (cx, cy, centre_z))
    scene.collection.objects.link(light)
    world = scene.world or bpy.data.worlds.new("World")
    scene.world = world
    _node_tree(world).nodes["Background"].inputs["Color"].default_value = (0.12, 0.13, 0.15, 1.0)  # soft fill from everywhere

    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    cam.data.lens = 75.0
    cam.location = (cx + 0.35, cy - 1.25, centre_z + 0.1)
    _aim(cam, (cx, cy, (top + floor_z) / 2 + 0.03))  # the head in the upper half, the floor and cubes below
    scene.collection.objects.link(cam)
    scene.camera = cam


def configure_render(scene: bpy.types.Scene, spec: SceneSpec) -> None:
    """Cycles on the CPU (the set is small), PNG frames in ``//frames/``, a plain view transform
    so the avatar's colours come out as the service renders them."""
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = spec.samples
    scene.cycles.use_denoising = True
    scene.render.use_persistent_data = True  # the set's BVH is built once for the whole animation
    scene.render.resolution_x = scene.render.resolution_y = spec.size
    scene.render.resolution_percentage = 100
    scene.render.fps = spec.fps
    scene.frame_start, scene.frame_end = 1, spec.frames
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGB"
    scene.render.filepath = "//frames/"
    scene.view_settings.view_transform = "Standard"


def build(spec: SceneSpec) -> dict:
    """Write ``spec.blend``; returns what was made (object, point count, keyed channels)."""
    import bpy

    import blender_addon
    from blender_addon import avatars, compositing, compositing_avatars, connection

    bpy.ops.wm.read_factory_settings(use_empty=True)
    blender_addon.register()
    scene = bpy.context.scene
    settings = connection.Settings(spec.endpoint, timeout_s=BACKEND_TIMEOUT_S, retries=0)
    head = connection.hello(settings)["head"]
    arrays = connection.neutral_gaussians(settings, spec.avatar)
    obj = avatars.add_object(AVATAR_OBJECT, spec.avatar, arrays, head, scene.collection)
    with connection.open_client(settings) as client:
        compositing_avatars.embed(obj, spec.avatar, client)
    bpy.context.view_layer.update()
    world = np.asarray(obj.matrix_world)
    points = arrays["positions"] @ world[:3, :3].T + world[:3, 3]
    build_set(scene, points.min(0), points.max(0))
    keyed = animate(obj, spec.frames, spec.blink_closed, spec.rest_expression)
    configure_render(scene, spec)
    compositing.setup_compositing(scene)
    bpy.ops.wm.save_as_mainfile(filepath=spec.blend)
    return {"object": obj.name, "points": len(obj.data.vertices), "keyed": keyed}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m backend.demo.scene SPEC.json", file=sys.stderr)
        return 2
    spec = SceneSpec(**json.loads(Path(argv[0]).read_text()))
    print("demo scene: " + json.dumps(build(spec)), flush=True)
    return 0


if __name__ == "__main__":
    from backend.batch import bpy_process

    bpy_process.end_without_teardown()
    bpy_process.exit(main(sys.argv[1:]))
