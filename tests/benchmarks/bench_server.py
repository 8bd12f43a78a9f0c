"""Service round-trip benchmark: transport and (de)serialization cost per rendered frame.

    python -m tests.benchmarks.bench_server --device cpu --sizes 256 512
    python -m tests.benchmarks.bench_server --device cuda --sizes 512 1920x1080 --gaussians 100000
    python -m tests.benchmarks.bench_server --device cuda --sizes 512 --bind ipc:///tmp/spatialavatar.sock

Starts ``spatialavatar serve`` as a separate process on a loopback port (or the ``--bind``
endpoint: an ipc:// socket file for a Unix-domain socket), imports an avatar,
then, from this process, times (1) single-frame render requests, one at a time: the round
trip against the ``render_ms`` the service reports for the same frame (posing, rasterizing,
copying out), so overhead = round trip - render_ms is what the wire, the framing and the
checks cost; and (2) one streamed render of many frames, in frames per second. For scale,
it also times the same reply bytes through a bare ZeroMQ socket pair between two processes
(the floor no service can go under). ``--crop`` asks for the avatar's window only; the round
trip then includes putting it back into the whole frame (``windows.full_frame``).
``--shared`` also asks for the frames through shared memory, alternating request by request
with the socket, and reports both. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zmq

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backend.gaussians.files import avatar_to_bytes, load_avatar  # noqa: E402
from backend.gaussians.surface import surface_avatar  # noqa: E402
from backend.head.registry import load_head_model  # noqa: E402
from backend.render.camera import intrinsics, look_at  # noqa: E402
from backend.wire.client import Client  # noqa: E402
from backend.wire.protocol import decode_reply, encode_reply, encode_request  # noqa: E402
from backend.wire.windows import full_frame  # noqa: E402
from tests.test_server_support import LOOPBACK_ANY_PORT, service_process  # noqa: E402


def parse_size(text: str) -> tuple[int, int]:
    """"512" -> (512, 512); "1920x1080" -> (1920, 1080): width, height in pixels."""
    w, _, h = text.partition("x")
    return int(w), int(h or w)


def camera(width: int, height: int) -> dict[str, np.ndarray]:
    return {
        "intrinsics": intrinsics(width, height, focal_px=2.0 * min(width, height)).numpy().astype("<f4"),
        "world_to_cam": look_at((0.0, 0.02, 0.75), (0.0, 0.0, 0.0)).numpy().astype("<f4"),
    }


def expressions(n_expr: int, frames: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "expr": (rng.normal(size=(frames, n_expr)) * 0.5).astype("<f4"),
        "jaw_pose": np.abs(rng.normal(size=(frames, 3)) * 0.1).astype("<f4"),
    }


def _floor_server(endpoints: mp.Queue, bind: str, arrays: dict[str, np.ndarray]) -> None:
    """A bare ROUTER answering every message with one pre-encoded render reply of ``arrays``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(bind)
    endpoints.put(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    reply = encode_reply("floor", "render", {"frame": 0}, arrays)
    while True:
        msg = sock.recv_multipart()
        if msg[1] == b"stop":
            break
        sock.send_multipart([msg[0], *reply], copy=False)
    sock.close()
    ctx.term()


def transport_floor(bind: str, arrays: dict[str, np.ndarray], size: tuple[int, int], repeats: int = 30) -> float:
    """Median ms of the same reply bytes through plain ZeroMQ between two processes, over the
    service's transport (``bind``, with a fresh port or socket file): what framing and the
    transport cost with no service at all."""
    spawn = mp.get_context("spawn")
    endpoints: mp.Queue = spawn.Queue()
    proc = spawn.Process(target=_floor_server, args=(endpoints, _fresh(bind), {k: np.zeros_like(a) for k, a in arrays.items()}))
    proc.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoints.get(timeout=120))
    times = []
    _, request = encode_request("render", {"avatar": "av_0000000000000000", "width": size[0], "height": size[1]})
    for _ in range(repeats + 3):
        t0 = time.perf_counter()
        sock.send_multipart(request)
        decode_reply(sock.recv_multipart(copy=False), check_finite=False)
        times.append(1e3 * (time.perf_counter() - t0))
    sock.send_multipart([b"stop"])
    sock.close()
    proc.join(30)
    return statistics.median(times[3:])


def _fresh(bind: str) -> str:
    """The same transport as ``bind`` on an unused address: any port for tcp, a sibling file for ipc."""
    scheme, _, rest = bind.partition("://")
    return f"ipc://{rest}.floor" if scheme == "ipc" else f"{scheme}://{rest.rsplit(':', 1)[0]}:*"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bind", default=LOOPBACK_ANY_PORT, help="the service's endpoint: loopback TCP (default) or ipc://PATH")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(256, 256), (512, 512)], help="WIDTH or WIDTHxHEIGHT, pixels")
    parser.add_argument("--gaussians", type=int, default=20_000)
    parser.add_argument("--rgba", default="<f4", choices=["<f4", "<f2", "<u1"], help="dtype of the returned RGBA")
    parser.add_argument("--crop", action="store_true", help="ask for the avatar's window only (and restore the whole frame)")
    parser.add_argument("--shared", action="store_true", help="also time frames through shared memory, alternating with the socket (client and service on one machine)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="single-frame round trips per size")
    parser.add_argument("--frames", type=int, default=24, help="frames of the streamed render per size")
    parser.add_argument("--avatar", type=Path, help="an avatar .npz to import instead of a surface avatar of --gaussians")
    parser.add_argument("--json", action="store_true", help="print one JSON line per size instead of a table")
    args = parser.parse_args()

    head = load_head_model()
    if args.avatar:
        avatar = load_avatar(args.avatar)
    else:
        gen = torch.Generator().manual_seed(0)
        avatar = surface_avatar(head, torch.zeros(head.n_shape), args.gaussians, lambda f, b: torch.rand(f.shape[0], 3, generator=gen))
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        service_process(Path(tmp) / "store", bind=args.bind, device=args.device) as service,
        Client(service.endpoint, timeout_s=600) as client,
    ):
        hello = client.call("hello").result
        hellos = []
        for _ in range(50):  # the floor: a round trip that never reaches the device worker
            t0 = time.perf_counter()
            client.call("hello")
            hellos.append(1e3 * (time.perf_counter() - t0))
        aid = client.call("import", {}, {"file": np.frombuffer(avatar_to_bytes(avatar), np.uint8)}).result["avatar"]["id"]
        # With --shared, requests through the socket and through shared memory alternate in
        # one run, so both see the same machine at the same moment.
        modes = (False, True) if args.shared else (False,)
        for size in args.sizes:
            reqs = {
                mode: {"avatar": aid, "width": size[0], "height": size[1], "rgba": args.rgba, "crop": args.crop, "shared_memory": mode}
                for mode in modes
            }
            trips: dict[bool, list[float]] = {mode: [] for mode in modes}
            renders: dict[bool, list[float]] = {mode: [] for mode in modes}
            # Inputs are made before the clock starts: making them is not transport.
            inputs = [expressions(head.n_expr, 1, i) | camera(*size) for i in range(args.warmup + args.repeats)]
            for i in range(args.warmup + args.repeats):
                for mode in modes:
                    t0 = time.perf_counter()
                    reply = client.call("render", reqs[mode], inputs[i])
                    full_frame(reply.arrays, reply.result, *size)
                    trip = 1e3 * (time.perf_counter() - t0)
                    if i >= args.warmup:
                        trips[mode].append(trip)
                        renders[mode].append(reply.result["render_ms"])
            payload = sum(a.nbytes for a in reply.arrays.values())
            floor = round(transport_floor(args.bind, dict(reply.arrays), size), 2)
            del reply  # its shared-memory slot is free again
            for mode in modes:
                overhead = [t - r for t, r in zip(trips[mode], renders[mode])]
                stream = expressions(head.n_expr, args.frames, 99) | camera(*size)
                t0 = time.perf_counter()
                # Each frame is let go of once it is used, as the add-on's compositor does: a
                # held reply would keep its shared-memory slot taken.
                streamed_render_ms = []
                for r in client.stream("render", reqs[mode], stream):
                    full_frame(r.arrays, r.result, *size)
                    streamed_render_ms.append(r.result["render_ms"])
                wall = time.perf_counter() - t0
                rows.append(
                    {
                        "size": f"{size[0]}x{size[1]}",
                        "frames_via": "shared memory" if mode else "socket",
                        "round_trip_ms": round(statistics.median(trips[mode]), 2),
                        "render_ms": round(statistics.median(renders[mode]), 2),
                        "overhead_ms_median": round(statistics.median(overhead), 2),
                        "overhead_ms_p90": round(percentile(overhead, 90), 2),
                        "floor_ms": floor,
                        "stream_fps": round(len(streamed_render_ms) / wall, 2),
                        "stream_render_fps": round(1e3 * len(streamed_render_ms) / sum(streamed_render_ms), 2),
                        "reply_mib": round(payload / 2**20, 2),
                    }
                )
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    print(f"# hello round trip (no device work): median {statistics.median(hellos):.2f} ms")
    print(
        f"# service {hello['device']} ({hello['device_name']}, {hello['rasterizer']}); {avatar.count} Gaussians; rgba {args.rgba}"
        f"{'; cropped to the avatar' if args.crop else ''}{'; socket and shared-memory requests alternating' if args.shared else ''}; over {args.bind}; client and service on {machine}"
    )
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(
        "| size | frames via | round trip ms | render ms | overhead ms (median / p90) | plain ZeroMQ floor ms | streamed fps | render-only fps | reply MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['frames_via']} | {r['round_trip_ms']} | {r['render_ms']} | {r['overhead_ms_median']} / {r['overhead_ms_p90']} "
            f"| {r['floor_ms']} | {r['stream_fps']} | {r['stream_render_fps']} | {r['reply_mib']} |"
        )


if __name__ == "__main__":
    main()
