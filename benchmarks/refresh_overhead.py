"""Mousse's refresh step: its extra cost over a plain step, against the time spent inside
torch.linalg.eigh during that step (2 GPT-2-124M layers at full width, fp32, the device's default).

    .venv/bin/python benchmarks/refresh_overhead.py

Prints the median plain step and, for each refresh step (t = 1, 11, 21, 31), extra / eigh: 1.0 means
the refresh costs exactly its eigendecompositions. A benchmark, not a test.
"""
import platform
import statistics
import time

import torch

from hf_mousse import Mousse

torch.manual_seed(0)
shapes = []
for _ in range(2):
    shapes += [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
gen = torch.Generator().manual_seed(1)
grads = [torch.randn(s, generator=gen) for s in shapes]
eigh_time = [0.0]
real = torch.linalg.eigh
def timed(*a, **k):
    t0 = time.perf_counter()
    r = real(*a, **k)
    eigh_time[0] += time.perf_counter() - t0
    return r
torch.linalg.eigh = timed
opt = Mousse(params, lr=0.01)
plain, refresh = [], []
for t in range(1, 32):
    for p, g in zip(params, grads):
        p.grad = g
    eigh_time[0] = 0.0
    t0 = time.perf_counter()
    opt.step()
    dt = time.perf_counter() - t0
    (refresh if t % 10 == 1 else plain).append((dt, eigh_time[0]))
base = statistics.median(d for d, _ in plain)
print(f"device: CPU {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
print(f"plain step median {base * 1000:.0f} ms")
for d, e in refresh:
    print(f"refresh step {d * 1000:.0f} ms: extra {(d - base) * 1000:.0f} ms, eigh {e * 1000:.0f} ms, "
          f"extra/eigh {(d - base) / e:.3f}")
