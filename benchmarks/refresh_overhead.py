"""Mousse's refresh cost, side by side: the authors' schedule (all matrices refresh together) and
the staggered one, on 2 GPT-2-124M layers at full width (per layer four 768x768 matrices, 3072x768
and 768x3072), fp32, the same parameters and gradients for both.

    .venv/bin/python benchmarks/refresh_overhead.py [--steps 31]    # writes results/refresh_overhead-cpu.json
    .venv/bin/python benchmarks/refresh_overhead.py --render benchmarks/results/refresh_overhead-cpu.json

For "together" it prints each refresh step's extra cost over the median plain step against the time
spent inside torch.linalg.eigh during that step (1.0: the refresh costs exactly its eigendecompositions).
For both it prints median and max step time over steps 2.. (step 1 refreshes every matrix under either
schedule) and their ratio. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from environment import device_name, git_commit, loadavg  # noqa: E402

from hf_mousse import Mousse  # noqa: E402

SHAPES = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]


def run(schedule: str, steps: int) -> list[tuple[float, float]]:
    """(step seconds, seconds inside eigh) per step."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in SHAPES * 2]
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    eigh_seconds = [0.0]
    real = torch.linalg.eigh

    def timed_eigh(*args, **kwargs):
        t0 = time.perf_counter()
        out = real(*args, **kwargs)
        eigh_seconds[0] += time.perf_counter() - t0
        return out

    opt = Mousse(params, lr=0.01, refresh_schedule=schedule)
    out = []
    torch.linalg.eigh = timed_eigh
    try:
        for _ in range(steps):
            for p, g in zip(params, grads):
                p.grad = g
            eigh_seconds[0] = 0.0
            t0 = time.perf_counter()
            opt.step()
            out.append((time.perf_counter() - t0, eigh_seconds[0]))
    finally:
        torch.linalg.eigh = real
    return out


def measure(schedule: str, steps: int) -> dict:
    times = run(schedule, steps)
    rest = [d for d, _ in times[1:]]  # step 1 refreshes every matrix under either schedule
    out = dict(median_ms=statistics.median(rest) * 1e3, max_ms=max(rest) * 1e3,
               mean_ms=statistics.mean(rest) * 1e3)
    out["max_over_median"] = out["max_ms"] / out["median_ms"]
    if schedule == "together":
        plain = statistics.median(d for t, (d, _) in enumerate(times, 1) if t % 10 != 1)
        out["refresh_steps"] = [
            dict(t=t, step_ms=d * 1e3, extra_ms=(d - plain) * 1e3, eigh_ms=e * 1e3,
                 extra_over_eigh=(d - plain) / e)
            for t, (d, e) in enumerate(times, 1) if t % 10 == 1
        ]
    return out


def render_markdown(data: dict) -> str:
    m = data["meta"]
    lines = [f"{m['device']}, torch {m['torch']}, commit {m['commit']}, load average {m['load_average']:.2f} "
             f"at the start, {m['steps']} steps per schedule, both in one run.", "",
             "| schedule | median step | max step (steps 2-) | max / median | mean step |",
             "|---|---|---|---|---|"]
    for name, r in data["schedules"].items():
        lines.append(f"| {name} | {r['median_ms']:.0f} ms | {r['max_ms']:.0f} ms | "
                     f"{r['max_over_median']:.2f} | {r['mean_ms']:.0f} ms |")
    refresh = data["schedules"]["together"]["refresh_steps"]
    lines += ["", "Refresh steps (together): extra time over the median plain step / time inside "
              "`torch.linalg.eigh`: " + ", ".join(f"t={r['t']}: {r['extra_over_eigh']:.3f}" for r in refresh)
              + " (t=1 also allocates the state)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=31)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "refresh_overhead-cpu.json"))
    parser.add_argument("--render", metavar="JSON", default=None, help="print the markdown table of a result")
    args = parser.parse_args()
    if args.render:
        print(render_markdown(json.loads(Path(args.render).read_text())), end="")
        return
    meta = dict(device=device_name(torch.device("cpu")), torch=torch.__version__, commit=git_commit(),
                load_average=loadavg(), steps=args.steps, shapes=SHAPES * 2)
    data = dict(meta=meta, schedules={s: measure(s, args.steps) for s in ("together", "staggered")})
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(render_markdown(data), end="")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
