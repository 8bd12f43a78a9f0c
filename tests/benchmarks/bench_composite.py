"""Composited batch render: frames per second, and where each frame's time goes.

    python tests/benchmarks/bench_composite.py --device cpu --gaussians 20000 --frames 6
    python tests/benchmarks/bench_composite.py --device cuda --gaussians 100000 --frames 24

Starts ``spatialavatar serve`` as a separate process, imports a surface avatar, builds a scene
in this process (bpy as a module, the add-on registered from this checkout): the avatar with
an animated jaw, a camera, a cube, Workbench, compositing set up. It then renders an animation
(``render.render(animation=True)``, PNG frames written, as ``blender -b -a`` does) at each size
and splits the wall time using the add-on's per-frame records:

* wait: the frame handler waiting for the service's replies (with prefetch, the service
  renders the next frames while Blender renders this one, so this shrinks);
* add-on: the rest of the frame handler (reading the scene, merging, writing Blender images);
* Blender: everything else (its render engine, the compositor, writing the file);
* backend busy: the service's own ``render_ms`` summed (it overlaps the rest when prefetching).

``--prefetch 1`` turns prefetching off (each frame requested when Blender reaches it).
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bpy  # noqa: E402

import blender_addon  # noqa: E402
from backend.gaussians.files import avatar_to_bytes  # noqa: E402
from backend.gaussians.surface import surface_avatar  # noqa: E402
from backend.head.registry import load_head_model  # noqa: E402
from backend.wire.client import Client  # noqa: E402
from blender_addon import avatars, compositing, compositing_job, pointcloud, runtime  # noqa: E402
from tests.test_server_support import service_process  # noqa: E402

SIZES = {"512": (512, 512), "1080p": (1920, 1080)}


def build_scene(endpoint: str, aid: str, frames: int) -> bpy.types.Scene:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    sc = bpy.context.scene
    with Client(endpoint, timeout_s=600.0, retries=0) as c:
        arrays = c.call("deform", {"avatar": aid, "statics": True, "max_gaussians": 2000}, {"expr": np.zeros((1, 1), np.float32)}).arrays
    g = pointcloud.GaussianBuffers(**{k: arrays[k] for k in ("positions", "scales", "rotations", "opacities", "colors")})
    head = pointcloud.create_avatar_object("Head", g)
    head[avatars.AVATAR_ID] = aid
    head.rotation_euler, head.location = (math.pi / 2, 0.0, 0.0), (0.0, 0.0, 1.5)
    for frame, jaw in ((1, 0.0), (frames, 0.3)):
        head.spatialavatar_flame.jaw_pose = (jaw, 0.0, 0.0)
        head.spatialavatar_flame.keyframe_insert("jaw_pose", frame=frame)
    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    sc.collection.objects.link(cam)
    sc.camera = cam
    cam.location, cam.rotation_euler = (0.0, -0.8, 1.5), (math.pi / 2, 0.0, 0.0)
    bpy.ops.mesh.primitive_cube_add(size=0.05, location=(0.08, -0.2, 1.45))
    sc.render.engine = "BLENDER_WORKBENCH"
    sc.render.image_settings.file_format = "PNG"
    sc.frame_start, sc.frame_end = 1, frames
    compositing.setup_compositing(sc)
    return sc


def run(sc: bpy.types.Scene, size: tuple[int, int], out: Path) -> dict:
    sc.render.resolution_x, sc.render.resolution_y = size
    sc.render.filepath = f"{out}{os.sep}"
    t0 = time.perf_counter()
    bpy.ops.render.render(animation=True)
    wall = time.perf_counter() - t0
    stats = runtime.RUNTIME.render_stats
    n = len(stats)
    wait = sum(s.request_s for s in stats)
    addon = sum(s.handler_s - s.request_s for s in stats)
    shares = {"wait": wait, "addon": addon, "blender": wall - wait - addon, "backend_busy": sum(s.service_s for s in stats)}
    return {
        "size": f"{size[0]}x{size[1]}",
        "frames": n,
        "prefetched": sum(s.prefetched for s in stats),
        "fps": round(n / wall, 3),
        "s_per_frame": round(wall / n, 3),
        "share": {k: round(v / wall, 3) for k, v in shares.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--gaussians", type=int, default=100_000)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--prefetch", type=int, default=compositing_job.CONFIG.prefetch_frames, help="frames in flight (1: off)")
    args = ap.parse_args()
    compositing_job.CONFIG = dataclasses.replace(compositing_job.CONFIG, prefetch_frames=args.prefetch)
    blender_addon.register()
    head = load_head_model()
    avatar = surface_avatar(head, torch.zeros(head.n_shape), args.gaussians, lambda faces, bary: torch.full((faces.shape[0], 3), 0.6))
    with tempfile.TemporaryDirectory() as tmp, service_process(Path(tmp) / "store", device=args.device) as proc:
        os.environ[compositing_job.ENDPOINT_ENV] = proc.endpoint
        os.environ[compositing_job.ANIMATION_ENV] = "1"  # as the batch wrapper and `blender -b -a` tell the add-on
        with Client(proc.endpoint, timeout_s=600.0, retries=0) as c:
            aid = c.call("import", {"name": "bench"}, {"file": np.frombuffer(avatar_to_bytes(avatar), np.uint8)}).result["avatar"]["id"]
        sc = build_scene(proc.endpoint, aid, args.frames)
        rows = [run(sc, SIZES[s], Path(tmp) / s) for s in args.sizes]
    meta = {"device": args.device, "gaussians": args.gaussians, "prefetch": args.prefetch, "blender": bpy.app.version_string, "machine": platform.processor() or platform.machine()}
    print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    for r in rows:
        sh = r["share"]
        print(
            f"| {r['size']} | {args.prefetch} | {r['fps']} | {r['s_per_frame']} s | {sh['wait']:.0%} | {sh['addon']:.0%} | {sh['blender']:.0%} "
            f"| {sh['backend_busy']:.0%} | {r['prefetched']}/{r['frames']} |"
        )


if __name__ == "__main__":
    main()
