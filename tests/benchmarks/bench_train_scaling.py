"""Stage 1 training on several GPUs (torchrun, DDP): throughput against GPU count, loss curves
at equal global batch, checkpoints across world sizes, GPU utilization.

    python tests/benchmarks/bench_train_scaling.py --data CORPUS/train/mono --out DIR
        [--gpus 1 2] [--batch 8 16] [--steps 200] [--curve-batch 16] [--curve-steps 600]
        [--parts throughput curves resume] [--device cuda|cpu] [--preset default]

Parts:
  throughput  for every per-GPU batch and GPU count, one phase-1 run of --steps steps;
              samples/s is the median of the log windows after the first (warm-up), the
              scaling efficiency is samples/s(n) / (n * samples/s(1)) at the same per-GPU
              batch, and nvidia-smi samples each GPU's utilization every 200 ms while the
              run trains (from its first log line to its end).
  curves      at global batch --curve-batch: one GPU with seed 0 and seed 1 (run-to-run
              noise; side by side on GPUs 0 and 1 when there are two), and the largest GPU
              count with --curve-batch / n per GPU and seed 0. Writes curves.png.
  resume      the multi-GPU curve run continues on one GPU, and the one-GPU run on the
              largest count, for --resume-steps more steps each.

Every run is `torchrun --standalone --nproc_per_node N -m backend train --phase 1 ...` with
CUDA_VISIBLE_DEVICES set to its GPUs and NCCL_NVLS_ENABLE=0 kept. `--device cpu` runs the same
plan with gloo processes (no utilization), to check the plan before spending GPU time.
Writes DIR/scaling.json and DIR/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[2]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _log(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


class _Utilization:
    """nvidia-smi sampling each GPU's utilization (percent of time a kernel ran) every 200 ms."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=timestamp,index,utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
            stdout=open(out, "w"),
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> list[tuple[float, int, float]]:
        """(unix time, GPU index, percent) of every sample."""
        self.proc.terminate()
        self.proc.wait()
        rows = [[x.strip() for x in line.split(",")] for line in self.out.read_text().splitlines() if line.count(",") == 2]
        return [(datetime.strptime(t, "%Y/%m/%d %H:%M:%S.%f").timestamp(), int(g), float(u)) for t, g, u in rows if u.replace(".", "").isdigit()]


def run_train(args: argparse.Namespace, out: Path, gpus: list[int], batch: int, steps: int, seed: int, log_every: int) -> subprocess.Popen:
    """Start one training run (torchrun, one process per GPU); returns the process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(len(gpus))]
    cmd += ["-m", "backend", "train", "--phase", "1", "--data", *map(str, args.data), "--out", str(out), "--preset", args.preset]
    cmd += ["--steps", str(steps), "--batch", str(batch), "--seed", str(seed), "--log-every", str(log_every), "--checkpoint-every", str(10**9), "--device", args.device, "--json"]
    cmd += ["--flame", args.flame] if args.flame else []
    env = os.environ | NO_MULTICAST | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    if args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(out / "stdout.txt", "w"), stderr=open(out / "stderr.txt", "w"))


def wait(proc: subprocess.Popen, run: Path) -> None:
    if proc.wait() != 0:
        tail = (run / "stderr.txt").read_text()[-3000:]
        raise SystemExit(f"training run {run} failed with status {proc.returncode}:\n{tail}")


def throughput(args: argparse.Namespace) -> list[dict]:
    rows = []
    one: dict[int, float] = {}
    for batch in args.batch:
        for n in args.gpus:
            run = args.out / f"throughput_n{n}_b{batch}"
            shutil.rmtree(run, ignore_errors=True)
            util = _Utilization(args.out / f"util_n{n}_b{batch}.csv") if args.device == "cuda" else None
            proc = run_train(args, run, list(range(n)), batch, args.steps, 0, args.log_every)
            first_log = None  # unix time of the first log line: start-up and warm-up end there
            while proc.poll() is None:
                if first_log is None and _log(run):
                    first_log = time.time()
                time.sleep(0.2)
            wait(proc, run)
            windows = _log(run)[1:]
            sps = statistics.median(w["samples_per_s"] for w in windows)
            if n == 1:
                one[batch] = sps
            row = {
                "gpus": n,
                "batch_per_gpu": batch,
                "global_batch": n * batch,
                "samples_per_s": round(sps, 1),
                "steps_per_s": round(statistics.median(w["steps_per_s"] for w in windows), 2),
                "data_ms": round(statistics.median(w["data_ms"] for w in windows), 2),
                "efficiency": round(sps / (n * one[batch]), 3) if batch in one else None,
            }
            if util is not None:
                samples = util.stop()
                busy = [(g, p) for t, g, p in samples if g < n and first_log is not None and t >= first_log]
                row["utilization"] = {g: round(statistics.mean(p for gg, p in busy if gg == g), 1) for g in sorted({g for g, _ in busy})}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _windows(run: Path) -> list[tuple[int, float]]:
    return [(w["step"], w["loss"]) for w in _log(run)]


def curves(args: argparse.Namespace) -> dict:
    n = max(args.gpus)
    runs = {"1 GPU, seed 0": args.out / "curve_n1_s0", "1 GPU, seed 1": args.out / "curve_n1_s1", f"{n} GPUs, seed 0": args.out / f"curve_n{n}_s0"}
    for run in runs.values():
        shutil.rmtree(run, ignore_errors=True)
    side_by_side = args.device == "cuda" and n >= 2
    started = []
    for seed, run in enumerate(list(runs.values())[:2]):
        proc = run_train(args, run, [seed if side_by_side else 0], args.curve_batch, args.curve_steps, seed, args.curve_log_every)
        started.append((proc, run))
        if not side_by_side:
            wait(proc, run)
    for proc, run in started:
        wait(proc, run)
    multi = list(runs.values())[2]
    wait(run_train(args, multi, list(range(n)), args.curve_batch // n, args.curve_steps, 0, args.curve_log_every), multi)
    series = {name: _windows(run) for name, run in runs.items()}
    ref, noise, other = (dict(series[k]) for k in runs)
    steps = sorted(set(ref) & set(noise) & set(other))
    late = steps[len(steps) // 2 :]

    def gap(a: dict, b: dict, at: list[int]) -> float:
        return round(statistics.mean(abs(a[s] - b[s]) for s in at), 5)

    result = {
        "global_batch": args.curve_batch,
        "steps": args.curve_steps,
        "log_every": args.curve_log_every,
        "series": series,
        "mean_abs_gap": {"multi_vs_seed0": gap(other, ref, steps), "seed1_vs_seed0": gap(noise, ref, steps)},
        "mean_abs_gap_second_half": {"multi_vs_seed0": gap(other, ref, late), "seed1_vs_seed0": gap(noise, ref, late)},
        "final_loss": {name: s[-1][1] for name, s in series.items()},
    }
    plot(series, args.out / "curves.png", f"phase-1 loss, global batch {args.curve_batch}")
    return result


def resume(args: argparse.Namespace) -> list[dict]:
    n = max(args.gpus)
    rows = []
    for source, gpus in ((args.out / f"curve_n{n}_s0", [0]), (args.out / "curve_n1_s0", list(range(n)))):
        run = args.out / f"resume_{source.name}_on{len(gpus)}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(source, run)
        before = _log(run)[-1]
        total = before["step"] + args.resume_steps
        wait(run_train(args, run, gpus, args.curve_batch // len(gpus), total, 0, args.curve_log_every), run)
        after = _log(run)
        summary = json.loads((run / "summary.json").read_text())
        first = next(w for w in after if w["step"] > before["step"])
        rows.append({
            "written_by_gpus": json.loads((source / "summary.json").read_text())["world_size"],
            "resumed_on_gpus": summary["world_size"],
            "from_step": before["step"],
            "steps_done": summary["steps_done"],
            "loss_before": before["loss"],
            "loss_first_window_after": first["loss"],
            "loss_first_window_of_run": after[0]["loss"],
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(series: dict[str, list[tuple[int, float]]], path: Path, title: str, size: tuple[int, int] = (900, 520)) -> None:
    """Loss against step, one coloured line per run (PIL: no plotting dependency)."""
    w, h = size
    left, right, top, bottom = 70, 20, 40, 50
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    points = [p for s in series.values() for p in s]
    x0, x1 = 0, max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)

    def xy(step: float, loss: float) -> tuple[float, float]:
        return left + (w - left - right) * (step - x0) / max(x1 - x0, 1), top + (h - top - bottom) * (1 - (loss - y0) / max(y1 - y0, 1e-9))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):
        loss = y0 + (y1 - y0) * i / 4
        d.text((5, xy(0, loss)[1] - 6), f"{loss:.4f}", fill="black")
        step = x0 + (x1 - x0) * i / 4
        d.text((xy(step, y0)[0] - 10, h - bottom + 8), f"{step:.0f}", fill="black")
    d.text((left, 12), title + "  (x: step, y: loss)", fill="black")
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    for i, (name, s) in enumerate(series.items()):
        d.line([xy(*p) for p in s], fill=colours[i % len(colours)], width=2)
        d.text((w - right - 220, top + 10 + 16 * i), name, fill=colours[i % len(colours)])
    im.save(path)


def report(result: dict) -> str:
    lines = [f"{result['machine']}, {result['date']}, preset {result['preset']}, {result['subjects']} subjects"]
    if "throughput" in result:
        lines += ["", "| GPUs | batch per GPU | global batch | samples/s | steps/s | scaling efficiency | host data ms/step | GPU utilization % |", "|---|---|---|---|---|---|---|---|"]
        for r in result["throughput"]:
            util = ", ".join(f"{v}" for v in r.get("utilization", {}).values()) or "-"
            eff = "-" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
            lines.append(f"| {r['gpus']} | {r['batch_per_gpu']} | {r['global_batch']} | {r['samples_per_s']} | {r['steps_per_s']} | {eff} | {r['data_ms']} | {util} |")
    if "curves" in result:
        c = result["curves"]
        lines += ["", f"Loss curves at global batch {c['global_batch']}, {c['steps']} steps, windows of {c['log_every']} steps:", ""]
        lines += ["| comparison | mean abs gap, all windows | second half |", "|---|---|---|"]
        for key, label in (("multi_vs_seed0", "multi-GPU vs 1 GPU (same seed)"), ("seed1_vs_seed0", "1 GPU seed 1 vs seed 0 (noise)")):
            lines.append(f"| {label} | {c['mean_abs_gap'][key]} | {c['mean_abs_gap_second_half'][key]} |")
        lines += ["", "Final window loss: " + ", ".join(f"{k} {v:.4f}" for k, v in c["final_loss"].items())]
    if "resume" in result:
        lines += ["", "| written on | resumed on | from step | to step | loss before | first window after | run's first window |", "|---|---|---|---|---|---|---|"]
        for r in result["resume"]:
            lines.append(f"| {r['written_by_gpus']} | {r['resumed_on_gpus']} | {r['from_step']} | {r['steps_done']} | {r['loss_before']:.4f} | {r['loss_first_window_after']:.4f} | {r['loss_first_window_of_run']:.4f} |")
    return "\n".join(lines) + "\n"


def check(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Refuse a plan that cannot run (``ap.error``: usage, one line, status 2) before any run
    starts; returns the number of subjects."""
    sizes = {"--gpus": min(args.gpus), "--batch": min(args.batch), "--steps": args.steps, "--log-every": args.log_every}
    sizes |= {"--curve-batch": args.curve_batch, "--curve-steps": args.curve_steps, "--curve-log-every": args.curve_log_every, "--resume-steps": args.resume_steps}
    for flag, value in sizes.items():
        if value < 1:
            ap.error(f"{flag} must be at least 1, got {value}")
    if args.steps < 2 * args.log_every:
        ap.error(f"--steps {args.steps} leaves no log window after the warm-up one; use at least twice --log-every ({args.log_every})")
    if {"curves", "resume"} & set(args.parts) and args.curve_batch % max(args.gpus):
        ap.error(f"--curve-batch {args.curve_batch} does not split over {max(args.gpus)} GPUs")
    if "resume" in args.parts and "curves" not in args.parts and not (args.out / "curve_n1_s0").is_dir():
        ap.error("--parts resume continues the curve runs: run the curves part first")
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < max(args.gpus):
            ap.error(f"--gpus {max(args.gpus)} asked for, but this machine has {torch.cuda.device_count()} CUDA GPUs (--device cpu runs gloo processes)")
    from backend.generate.data import find_subjects
    from backend.wire.errors import InputError

    try:
        subjects = len(find_subjects(args.data))
    except InputError as e:
        ap.error(str(e))
    if subjects < max(args.gpus):
        ap.error(f"{subjects} subjects under {' '.join(map(str, args.data))}: each of {max(args.gpus)} ranks needs its own shard")
    return subjects


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", type=Path, required=True, help="phase-1 (monocular) subjects, or folders holding them")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gpus", nargs="+", type=int, default=[1, 2], help="GPU counts (processes, on the CPU)")
    ap.add_argument("--batch", nargs="+", type=int, default=[8, 16], help="per-GPU batches for the throughput part")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--curve-batch", type=int, default=16, help="global batch of the loss-curve runs")
    ap.add_argument("--curve-steps", type=int, default=600)
    ap.add_argument("--curve-log-every", type=int, default=20)
    ap.add_argument("--resume-steps", type=int, default=40)
    ap.add_argument("--parts", nargs="+", choices=("throughput", "curves", "resume"), default=["throughput", "curves", "resume"])
    ap.add_argument("--preset", default="default", choices=("default", "small", "tiny"))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--threads", type=int, default=4, help="OMP threads per process")
    ap.add_argument("--flame", help="FLAME model (default: the built-in head)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    subjects = check(ap, args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        import torch

        machine = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        machine = f"cpu, {os.cpu_count()} cores"
    result: dict = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "subjects": subjects, "args": {k: str(v) for k, v in vars(args).items()}}
    t0 = time.time()
    if "throughput" in args.parts:
        result["throughput"] = throughput(args)
    if "curves" in args.parts:
        result["curves"] = curves(args)
    if "resume" in args.parts:
        result["resume"] = resume(args)
    result["seconds"] = round(time.time() - t0, 1)
    (args.out / "scaling.json").write_text(json.dumps(result, indent=1))
    (args.out / "scaling.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
