"""A client that stops reading: a raw DEALER with default socket options asks for a long
render stream and reads nothing. Prints the service's RSS before, every 2 s during and after,
hello's round trip meanwhile, and how many replies the stuck socket was sent.

    python tests/benchmarks/bench_stuck_stream.py [--size 128] [--frames 300] [--samples 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backend.head.registry import load_head_model  # noqa: E402
from backend.wire.client import Client  # noqa: E402
from backend.wire.protocol import encode_request  # noqa: E402
from tests.hostile_messages import connect, rss_mib  # noqa: E402
from tests.test_server_support import ServiceProcess, flame_buffers, front_camera, npz_buffer, small_avatar  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--samples", type=int, default=4, help="RSS and hello samples, 2 s apart")
    args = ap.parse_args()
    head = load_head_model()
    service = ServiceProcess(Path(tempfile.mkdtemp()))
    try:
        with Client(service.endpoint, timeout_s=60) as client:
            aid = client.call("import", {}, {"file": npz_buffer(small_avatar(head, 2000))}).result["avatar"]["id"]
            print(f"service RSS before: {rss_mib(service.proc.pid):.0f} MiB", flush=True)
            sock = connect(service.endpoint)
            K, w2c = front_camera(args.size)
            render = {"avatar": aid, "width": args.size, "height": args.size}
            sock.send_multipart(encode_request("render", render, flame_buffers(head, args.frames) | {"intrinsics": K, "world_to_cam": w2c})[1])
            for i in range(args.samples):
                time.sleep(2)
                t0 = time.perf_counter()
                client.call("hello")
                print(f"t = {2 * (i + 1)} s: service RSS {rss_mib(service.proc.pid):.0f} MiB, hello {1000 * (time.perf_counter() - t0):.1f} ms", flush=True)
            held = 0
            while sock.poll(100):
                sock.recv_multipart()
                held += 1
            sock.close(linger=0)
            time.sleep(3)
            print(f"replies the stuck socket was sent: {held} of {args.frames}", flush=True)
            print(f"service RSS 3 s after it left: {rss_mib(service.proc.pid):.0f} MiB", flush=True)
    finally:
        service.stop()


if __name__ == "__main__":
    main()
