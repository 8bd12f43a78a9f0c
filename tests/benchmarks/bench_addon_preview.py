"""Live preview: time from a frame change to new point positions in the mesh (bpy as a module).

    python tests/benchmarks/bench_addon_preview.py [--gaussians 100000] [--points 20000] [--frames 40]

A real ``python -m backend serve --device cpu`` subprocess holds an avatar of ``--gaussians``
Gaussians; the built extension loads it with ``--points`` preview points, keys random
expressions and jaw poses on every frame and turns the live preview on. Each measured frame
is ``scene.frame_set`` (the add-on's frame_change_post handler) followed by the add-on's timer
function called on the timer's own schedule (``runtime.TIMER``: the debounce, then the
polling interval) until the reply is written into the mesh with ``foreach_set``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backend.head.registry import load_head_model  # noqa: E402
from backend.wire.client import Client  # noqa: E402
from tests.addon_support import build_zip, install_addon, set_prefs, start_backend  # noqa: E402
from tests.test_server_support import npz_buffer, small_avatar  # noqa: E402


def update_frame(bpy, addon, frame: int) -> tuple[float, float]:
    """Seconds from ``frame_set`` until the preview has written the frame's positions, and the
    seconds of that spent in the add-on's timer calls (sending, receiving, ``foreach_set``)."""
    runtime = addon.runtime
    t0 = time.perf_counter()
    bpy.context.scene.frame_set(frame)
    time.sleep(runtime.TIMER.debounce_s)
    in_timer = 0.0
    while True:
        t1 = time.perf_counter()
        runtime.RUNTIME.tick()
        in_timer += time.perf_counter() - t1
        if not runtime.RUNTIME.preview.waiting:
            return time.perf_counter() - t0, in_timer
        time.sleep(runtime.TIMER.interval_s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gaussians", type=int, default=100_000)
    ap.add_argument("--points", type=int, default=20_000)
    ap.add_argument("--frames", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-preview-") as tmp:
        tmp_path = Path(tmp)
        backend = start_backend(tmp_path / "store")
        try:
            with Client(backend.endpoint, timeout_s=120.0) as c:
                avatar = small_avatar(load_head_model(), args.gaussians)
                aid = c.call("import", {"name": "bench"}, {"file": npz_buffer(avatar)}).result["avatar"]["id"]
            addon = install_addon(build_zip(tmp_path / "dist"), tmp_path / "user", tmp_path / "repo")
            import bpy

            bpy.ops.wm.read_homefile(use_empty=True)
            set_prefs(bpy, backend.endpoint)
            assert bpy.ops.spatialavatar.test_connection() == {"FINISHED"}
            assert bpy.ops.spatialavatar.load_avatar(avatar=aid, object_name="Bench", max_points=args.points) == {"FINISHED"}
            obj = bpy.data.objects["Bench"]
            fd = addon.flame_data
            r = np.random.default_rng(0)
            t = args.frames + 4
            poses = {k: np.zeros((t, w), np.float32) for k, w in fd.POSE_FIELDS.items()}
            poses["jaw_pose"][:, 0] = r.uniform(0.0, 0.3, t)
            addon.animation_io.import_animation(obj, fd.FlameAnimation(r.normal(size=(t, 50)).astype(np.float32), poses), 1, 1.0)
            bpy.context.scene.spatialavatar.live_preview = True
            for f in range(1, 5):  # warm-up
                update_frame(bpy, addon, f)
            times, timer_ms, deform_ms = [], [], []
            for f in range(5, 5 + args.frames):
                total, in_timer = update_frame(bpy, addon, f)
                times.append(total)
                timer_ms.append(1000 * in_timer)
                deform_ms.append(addon.runtime.RUNTIME.preview.last_deform_ms)
            assert addon.runtime.RUNTIME.preview.message == "", addon.runtime.RUNTIME.preview.message
            ms = sorted(1000 * x for x in times)
            print(
                f"{args.gaussians} Gaussians, {len(obj.data.vertices)} preview points, {args.frames} frames: "
                f"frame update median {statistics.median(ms):.1f} ms, p90 {ms[int(0.9 * (len(ms) - 1))]:.1f} ms, max {ms[-1]:.1f} ms; "
                f"in the add-on's timer median {statistics.median(timer_ms):.1f} ms; "
                f"service deform median {statistics.median(deform_ms):.1f} ms"
            )
        finally:
            backend.stop()


if __name__ == "__main__":
    main()
