"""Mousse's refresh cost, side by side: the authors' schedule (all matrices refresh together) and
the staggered one, on 2 GPT-2-124M layers at full width (per layer four 768x768 matrices, 3072x768
and 768x3072), fp32, the same parameters and gradients for both.

    .venv/bin/python benchmarks/refresh_overhead.py [--steps 31]

For "together" it prints each refresh step's extra cost over the median plain step against the time
spent inside torch.linalg.eigh during that step (1.0: the refresh costs exactly its eigendecompositions).
For both it prints median and max step time over steps 2.. (step 1 refreshes every matrix under either
schedule) and their ratio. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from hf_mousse import Mousse

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=31)
    args = parser.parse_args()
    print(f"device: CPU {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    for schedule in ("together", "staggered"):
        times = run(schedule, args.steps)
        if schedule == "together":
            plain = statistics.median(d for t, (d, _) in enumerate(times, 1) if t % 10 != 1)
            for t, (d, e) in enumerate(times, 1):
                if t % 10 == 1:
                    print(f"together, refresh step t={t}: {d * 1000:.0f} ms, extra over plain "
                          f"{(d - plain) * 1000:.0f} ms, eigh {e * 1000:.0f} ms, "
                          f"extra/eigh {(d - plain) / e:.3f}")
        rest = [d for d, _ in times[1:]]
        median, worst = statistics.median(rest), max(rest)
        print(f"{schedule:9s}: steps 2-{args.steps}: median {median * 1000:.0f} ms, "
              f"max {worst * 1000:.0f} ms, max/median {worst / median:.2f}, "
              f"mean {statistics.mean(rest) * 1000:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
