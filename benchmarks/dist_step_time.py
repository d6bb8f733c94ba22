"""Optimizer-step time per rank with 1 and with 2 processes (torchrun, gloo on CPU; NCCL on GPUs):
does splitting the matrix work over ranks pay?

Every rank holds the same GPT-2-shaped matrices and the same gradients (what DDP leaves after its
all-reduce) and times ``optimizer.step()``; a step takes as long as its slowest rank. Each process
uses one thread (one GPU each, on a GPU machine), so two processes have twice the compute of one.

    python benchmarks/dist_step_time.py                    # CPU: 1 and 2 processes, side by side
    python benchmarks/dist_step_time.py --nprocs 1,2,4 --device cuda --scale 1 --layers 12
    python benchmarks/dist_step_time.py --render benchmarks/results/dist_step_time-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import device_name, git_commit, loadavg, sync  # noqa: E402
from step_time import build_shapes, make_data  # noqa: E402

import hf_mousse  # noqa: E402
from hf_mousse.version import library_versions  # noqa: E402

OPTIMIZERS = {"mousse": (hf_mousse.Mousse, {"refresh_every": 10}), "muon": (hf_mousse.Muon, {})}


def worker(args) -> None:
    """One rank: time every optimizer's steps; rank 0 writes the per-step maxima over ranks."""
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    shapes = build_shapes("gpt2-split", args.layers, args.scale)
    master, grads = make_data(shapes, device, seed=0)
    out = {}
    for name in args.optimizers.split(","):
        cls, kwargs = OPTIMIZERS[name]
        params = [torch.nn.Parameter(p.clone()) for p in master]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = cls(params, lr=0.02, distributed=world > 1 or None, **kwargs)
        times = []
        for _ in range(args.warmup + args.steps):
            dist.barrier()
            sync(device)
            start = time.perf_counter()
            opt.step()
            sync(device)
            times.append(time.perf_counter() - start)
        measured = torch.tensor(times[args.warmup:], dtype=torch.float64)
        gathered = [torch.zeros_like(measured) for _ in range(world)]
        dist.all_gather(gathered, measured)
        slowest = torch.stack(gathered).amax(0).tolist()  # a step ends when its slowest rank is done
        stats = [None] * world
        dist.all_gather_object(stats, opt.stats())
        out[name] = {"step_s": slowest, "matrix_updates": [s["matrix_updates"] for s in stats]}
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def summary(steps: list[float], period: int | None) -> dict:
    """Median of the steps without a refresh and the mean over whole refresh periods (amortised)."""
    plain = [t for i, t in enumerate(steps) if not period or i % period]
    return {"median_s": statistics.median(plain), "amortised_s": statistics.fmean(steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nprocs", default="1,2")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--optimizers", default="mousse,muon")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--scale", type=float, default=0.5, help="width multiplier of GPT-2-124M's matrices")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (a multiple of refresh_every)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--render", default=None, help="print a JSON result as a markdown table")
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_out:
        return worker(args)
    if args.render:
        return print(render_markdown(json.loads(Path(args.render).read_text())))
    torch.set_num_threads(1)  # as each worker: the device line records one thread per process
    # The warm-up step is step 1 (a refresh); timed steps 2, 3, ...: refreshes at timed index 9, 19, ...
    periods = {"mousse": OPTIMIZERS["mousse"][1]["refresh_every"], "muon": None}
    runs = {}
    load_before = loadavg()
    for n in map(int, args.nprocs.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), __file__,
                   "--worker-out", str(result), *sys.argv[1:]]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{n} processes failed:\n{proc.stderr[-3000:]}")
            raw = json.loads(result.read_text())
        runs[n] = {}
        for name, r in raw.items():
            period = periods[name]
            steps = r["step_s"]
            shifted = steps[period - 1:] + steps[: period - 1] if period else steps  # refresh first
            runs[n][name] = {**summary(shifted, period), "matrix_updates": r["matrix_updates"],
                             "step_s": steps}
    shapes = build_shapes("gpt2-split", args.layers, args.scale)
    base = min(runs)
    data = {
        "benchmark": "dist_step_time",
        "device": device_name(torch.device(args.device)),
        "commit": git_commit(), "load_average": load_before, "versions": library_versions(),
        "shapes": f"gpt2-split x{args.scale}, {args.layers} layers: {sorted({s for _, s in shapes})}",
        "runs": {str(n): r for n, r in runs.items()},
        "speedup": {str(n): {name: runs[base][name]["amortised_s"] / r[name]["amortised_s"] for name in r}
                    for n, r in runs.items()},
    }
    print(render_markdown(data))
    out = Path(args.out or Path(__file__).parent / "results" / f"dist_step_time-{args.device}.json")
    out.write_text(json.dumps(data, indent=1))
    print(f"wrote {out}")


def render_markdown(data: dict) -> str:
    lines = [f"Optimizer step per rank, {data['shapes']}; {data['device']}, load {data['load_average']:.2f}",
             "", "| optimizer | processes | step without refresh | amortised step | speed-up (amortised) | "
             "matrix updates per rank |", "|---|---|---|---|---|---|"]
    for n, r in data["runs"].items():
        for name, row in r.items():
            lines.append(f"| {name} | {n} | {row['median_s'] * 1e3:.0f} ms | "
                         f"{row['amortised_s'] * 1e3:.0f} ms | {data['speedup'][n][name]:.2f}x | "
                         f"{row['matrix_updates']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
