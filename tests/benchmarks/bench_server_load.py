"""The service under hostile load: fuzzing clients and 8 render clients at once.

    python tests/benchmarks/bench_server_load.py --json load.json
    python tests/benchmarks/bench_server_load.py --duration 60 --render-clients 8 --size 64 --gaussians 5000

Starts ``spatialavatar serve`` (CPU unless ``--device``) as a child process on a loopback port
with a fresh store, imports an avatar and makes a small subject, then runs three phases:

1. idle: ``hello`` round trips from one socket, the service's resident memory (RSS);
2. renders alone: ``--render-clients`` clients (one socket each) render one frame at a time;
3. hostile load: the same render clients, plus fuzzing clients (three DEALER sockets keeping
   8 requests in flight, two REQ sockets, one DEALER framing as REQ does) sending mutated
   requests, job submissions that must be refused and avatar files that must be refused
   (tests/hostile_messages.py; every reply is checked as tests/test_server_fuzz.py checks it),
   while ``hello`` is sampled and the service's RSS read from /proc/PID/status.

Then the RSS after the load and after a short rest, and the renders alone once more. Where the
machine's CPU went is recorded per phase (the service, the clients, others): on a shared
machine, what others take can slow the service's renders many times over.

Prints one JSON object (also written to ``--json``): messages sent and answered, replies by
error code, RSS before/during/after, hello p50/p99 idle and under load, renders per second
alone (before and after the load) and under it. Every client runs in this one process, on
the same machine as the service: on a small machine they compete with it for the CPU. Not
collected by pytest.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backend.head.flame_files import write_flame  # noqa: E402
from backend.head.model import HeadModel  # noqa: E402
from backend.head.registry import load_head_model  # noqa: E402
from backend.wire.client import Client  # noqa: E402
from backend.wire.protocol import WireError  # noqa: E402
from tests.hostile_messages import (  # noqa: E402
    Case,
    Sampler,
    Tally,
    fuzz_cases,
    hostile_avatar_files,
    hostile_jobs,
    import_case,
    job_cases,
    percentile,
    rss_mib,
    seed_requests,
    send_batches,
    send_req,
)
from tests.test_server_support import flame_buffers, front_camera, npz_buffer, service_process, small_avatar  # noqa: E402

DEALERS, REQS, REQ_FRAMED = 3, 2, 1
CYCLE = 120  # mutated messages per sender between two rounds of crafted ones


class CpuShares:
    """Where the machine's CPU went between two calls of ``phase``, in % of all cores: the
    service, this process (the clients) and everything else (/proc/stat, /proc/PID/stat).
    On a shared machine the last is what others took."""

    def __init__(self, service_pid: int) -> None:
        self._pid = service_pid
        self._last = self._read()

    def _read(self) -> tuple[list[int], int, int]:
        with open("/proc/stat") as fh:
            machine = [int(x) for x in fh.readline().split()[1:]]
        return machine, _process_ticks(self._pid), _process_ticks("self")

    def phase(self) -> dict[str, float]:
        now = self._read()
        (m0, s0, c0), (m1, s1, c1) = self._last, now
        self._last = now
        delta = [b - a for a, b in zip(m0, m1)]
        total = max(sum(delta), 1)
        busy = total - delta[3] - delta[4]  # all but idle and iowait
        share = {"service": s1 - s0, "clients": c1 - c0}
        share["others"] = max(busy - share["service"] - share["clients"], 0)
        return {k: round(100.0 * v / total, 1) for k, v in share.items()}


def _process_ticks(pid: int | str) -> int:
    """User + system CPU ticks of a process (with its finished threads)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def hello_stats(sampler: Sampler) -> dict[str, Any]:
    return {
        "samples": len(sampler.hello_ms),
        "p50_ms": round(percentile(sampler.hello_ms, 50), 2),
        "p99_ms": round(percentile(sampler.hello_ms, 99), 2),
        "max_ms": round(max(sampler.hello_ms, default=float("nan")), 2),
        "unanswered": sampler.unanswered,
        "wrong": len(sampler.wrong),
    }


def sample(endpoint: str, pid: int, seconds: float) -> Sampler:
    """hello and RSS for ``seconds`` with nothing else going on."""
    sampler = Sampler(endpoint, lambda: rss_mib(pid))
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    time.sleep(seconds)
    sampler.stop.set()
    thread.join(130)
    return sampler


class Renders:
    """``clients`` render clients, one frame per request, until ``stop`` is set."""

    def __init__(self, endpoint: str, clients: int, args: dict, arrays: dict) -> None:
        self.stop = threading.Event()
        self.ok = 0
        self.render_ms: list[float] = []
        self.errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(endpoint, args, arrays), daemon=True) for _ in range(clients)]

    def _run(self, endpoint: str, args: dict, arrays: dict) -> None:
        with Client(endpoint, timeout_s=120, retries=0) as client:
            while not self.stop.is_set():
                try:
                    reply = client.call("render", args, arrays)
                    with self._lock:
                        self.ok += 1
                        self.render_ms.append(float(reply.result["render_ms"]))
                except WireError as exc:
                    with self._lock:
                        self.errors[str(exc.code)] += 1

    def start(self) -> float:
        for t in self._threads:
            t.start()
        return time.perf_counter()

    def finish(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(130)


def render_stats(renders: Renders, seconds: float) -> dict[str, Any]:
    """Renders per second, and the service's own time per frame (``render_ms``)."""
    return {
        "per_s": round(renders.ok / seconds, 2),
        "render_ms_p50": round(percentile(renders.render_ms, 50), 1),
        "render_ms_p90": round(percentile(renders.render_ms, 90), 1),
        "errors": dict(renders.errors),
    }


def renders_alone(endpoint: str, opts: argparse.Namespace, args: dict, arrays: dict) -> dict[str, Any]:
    """The render clients with nothing else going on."""
    renders = Renders(endpoint, opts.render_clients, args, arrays)
    t0 = renders.start()
    time.sleep(opts.alone)
    seconds = time.perf_counter() - t0
    renders.finish()
    return render_stats(renders, seconds)


def fuzzers(
    endpoint: str, head: HeadModel, ids: dict[str, str], tally: Tally, deadline: float, gaussian_limit: int
) -> list[threading.Thread]:
    """Fuzzing clients that send rounds of mutated and crafted messages until ``deadline``."""
    seeds, streams = seed_requests(head, ids["avatar"], ids["subject"], ids["job"], 32)
    jobs = hostile_jobs(ids["avatar"], ids["subject"], ids["job"])
    files = hostile_avatar_files(head, gaussian_limit)
    counter = itertools.count()
    lock = threading.Lock()

    def rid() -> str:
        with lock:
            return f"load-{next(counter)}"

    kinds = ["dealer"] * DEALERS + ["req"] * REQS + ["req-framed"] * REQ_FRAMED
    share = len(kinds)

    def rounds(kind: str, index: int) -> None:
        rng = random.Random(2000 + index)
        while time.perf_counter() < deadline:
            # Fresh ids every round: a repeated import id would be answered from the replay memory.
            cases: list[Case] = fuzz_cases(rng, seeds, streams if kind == "dealer" else [], CYCLE, rid)
            cases += job_cases(jobs[index::share], rid)
            cases += [
                import_case(label, data, allowed, rid(), f"hostile-{i}")
                for i, (label, data, allowed) in enumerate(files)
                if i % share == index
            ]
            rng.shuffle(cases)
            if kind == "dealer":
                send_batches(endpoint, cases, tally, batch=8, delimiter=False)
            elif kind == "req-framed":
                send_batches(endpoint, cases, tally, batch=4, delimiter=True)
            else:
                send_req(endpoint, cases, tally)

    return [tally.run(f"{kind}{i}", lambda k=kind, i=i: rounds(k, i)) for i, kind in enumerate(kinds)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of hostile load")
    ap.add_argument("--alone", type=float, default=10.0, help="seconds of renders without the hostile load")
    ap.add_argument("--idle", type=float, default=3.0, help="seconds of hello sampling before and after")
    ap.add_argument("--render-clients", type=int, default=8)
    ap.add_argument("--size", type=int, default=64, help="rendered frame side, pixels")
    ap.add_argument("--gaussians", type=int, default=5000)
    ap.add_argument("--json", type=Path, help="also write the result here")
    opts = ap.parse_args()

    torch.set_num_threads(1)  # this process only builds inputs; leave the cores to the service
    head = load_head_model("builtin")
    with tempfile.TemporaryDirectory(prefix="sa_load_") as tmp:
        flame = write_flame(head.data, Path(tmp) / "flame")  # the service reads it instead of building it
        store = Path(tmp) / "store"
        with service_process(store, device=opts.device, flame=flame) as service:
            pid = service.proc.pid
            with Client(service.endpoint, timeout_s=120) as client:
                hello = client.call("hello").result
                aid = client.call("import", {"name": "load"}, {"file": npz_buffer(small_avatar(head, opts.gaussians))}).result["avatar"][
                    "id"
                ]
                job = client.call("synthesize", {"frames": 2, "size": 32, "reference_gaussians": 1000}).result["job"]
                done = client.call("watch", {"job": job["id"]}).result["job"]
            ids = {"avatar": aid, "subject": done["result"]["subject"], "job": job["id"]}
            K, w2c = front_camera(opts.size)
            render_args = {"avatar": aid, "width": opts.size, "height": opts.size}
            render_arrays = flame_buffers(head, 1) | {"intrinsics": K, "world_to_cam": w2c}

            rss_before = rss_mib(pid)
            cpu = CpuShares(pid)
            idle = sample(service.endpoint, pid, opts.idle)
            busy = {"idle": cpu.phase()}

            alone = renders_alone(service.endpoint, opts, render_args, render_arrays)
            busy["renders_alone"] = cpu.phase()

            tally = Tally(store)
            loaded = Sampler(service.endpoint, lambda: rss_mib(pid))
            sampling = threading.Thread(target=loaded.run, daemon=True)
            renders = Renders(service.endpoint, opts.render_clients, render_args, render_arrays)
            deadline = time.perf_counter() + opts.duration
            threads = fuzzers(service.endpoint, head, ids, tally, deadline, 1_000_000)
            sampling.start()
            t0 = renders.start()
            for t in threads:
                t.join(max(0.0, deadline - time.perf_counter()) + 300)
            load_s = time.perf_counter() - t0
            renders.finish()
            busy["hostile_load"] = cpu.phase()
            loaded.stop.set()
            sampling.join(130)
            rss_right_after = rss_mib(pid)
            rest = sample(service.endpoint, pid, opts.idle)
            busy["idle_after"] = cpu.phase()
            alone_after = renders_alone(service.endpoint, opts, render_args, render_arrays)
            busy["renders_alone_after"] = cpu.phase()
            with Client(service.endpoint, timeout_s=120) as client:
                still = client.call("hello").ok and bool(client.call("render", render_args, render_arrays).arrays["rgba"].size)
                jobs = client.call("list", {"kind": "jobs"}).result["jobs"]

    result = {
        "command": "python tests/benchmarks/bench_server_load.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, {platform.python_version()}, torch {torch.__version__}",
        "device": hello["device"],
        "cpu_pct_of_machine": busy,
        "config": {"render_clients": opts.render_clients, "size": opts.size, "gaussians": opts.gaussians, "duration_s": opts.duration},
        "hostile": {
            "senders": DEALERS + REQS + REQ_FRAMED,
            "messages_sent": tally.sent,
            "messages_answered": tally.finals,
            "replies_by_code": dict(sorted(tally.outcomes.items())),
            "check_failures": len(tally.failures),
            "first_failures": tally.failures[:5],
            "jobs_in_store": len(jobs),  # 1: the synthesis made before the load; no refused submission queued one
        },
        "renders": {"alone": alone, "under_hostile_load": render_stats(renders, load_s), "alone_after": alone_after},
        "hello": {"idle": hello_stats(idle), "under_load": hello_stats(loaded), "after": hello_stats(rest)},
        "service_rss_mib": {
            "before": round(rss_before, 1),
            "during_mean": round(statistics.fmean(loaded.rss_mib), 1) if loaded.rss_mib else None,
            "during_max": round(max(loaded.rss_mib, default=float("nan")), 1),
            "right_after": round(rss_right_after, 1),
            "after_rest": round(max(rest.rss_mib, default=float("nan")), 1),
        },
        "still_answers_hello_and_render": still,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if opts.json:
        opts.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
