"""Mousse's staggered refresh schedule: each matrix refreshes every T steps at its own, cost-balanced
phase (all at step 1), follows the float64 reference with that phase, and resumes exactly."""

from __future__ import annotations

import io

import pytest
import reference as ref
import torch

from hf_mousse import Mousse, load_optimizer, save_optimizer
from hf_mousse.optim import state_keys

pytestmark = pytest.mark.usefixtures("single_thread")

T = 4
STEPS = 14  # crosses 3 refreshes per matrix after step 1
KW = dict(lr=0.02, weight_decay=0.01, refresh_every=T, eps=1e-3, refresh_schedule="staggered")


def grads_for(shape, seed):
    g = torch.Generator().manual_seed(seed)
    row = torch.logspace(0, 1, shape[0], dtype=torch.float64)[:, None]
    return [torch.randn(shape, generator=g, dtype=torch.float64) * row for _ in range(STEPS)]


def test_phases_spread_refreshes_and_each_matrix_follows_the_reference():
    """Four same-shape matrices and T = 4: phases 0..3, so after step 1 each step refreshes exactly one
    matrix (2 factors), and each matrix's weights equal the reference refreshing at t = 1 + phase + jT."""
    w0 = [torch.randn(6, 6, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
          for i in range(4)]
    grads = [grads_for((6, 6), seed=10 + i) for i in range(4)]
    params = [torch.nn.Parameter(w.float().clone()) for w in w0]
    opt = Mousse(params, **KW)
    refreshed = []
    for t in range(STEPS):
        before = opt.stats()["eigh_refreshes"]
        for p, g in zip(params, grads):
            p.grad = g[t].float()
        opt.step()
        refreshed.append(opt.stats()["eigh_refreshes"] - before)
    assert sorted(opt.state[p][state_keys.REFRESH_PHASE] for p in params) == [0, 1, 2, 3]
    assert refreshed == [8] + [2] * (STEPS - 1)
    for p, w, g in zip(params, w0, grads):
        phase = opt.state[p][state_keys.REFRESH_PHASE]
        expected = ref.mousse(w, g, **{k: v for k, v in KW.items() if k != "refresh_schedule"},
                              refresh_phase=phase)
        moved = (expected[-1] - w).norm()
        assert ((p.detach().double() - expected[-1]).norm() / moved).item() < 1e-4, f"phase {phase}"
    # ... and the phase matters: the together schedule is a different trajectory for phase != 0.
    other = next(i for i, p in enumerate(params) if opt.state[p][state_keys.REFRESH_PHASE] != 0)
    together = ref.mousse(w0[other], grads[other], **{k: v for k, v in KW.items() if k != "refresh_schedule"})
    assert (together[-1] - params[other].detach().double()).norm() > 1e-3 * (together[-1] - w0[other]).norm()


def test_phases_balance_cost_not_count():
    """A large matrix (two 24 x 24 factors) costs as much as many small ones: the phases put it alone."""
    big = torch.nn.Parameter(torch.randn(24, 24))
    small = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(6)]
    opt = Mousse([big, *small], refresh_every=3, refresh_schedule="staggered")
    for p in [big, *small]:
        p.grad = torch.randn_like(p)
    opt.step()
    big_phase = opt.state[big][state_keys.REFRESH_PHASE]
    assert all(opt.state[p][state_keys.REFRESH_PHASE] != big_phase for p in small)


@pytest.mark.parametrize("via", ["state_dict", "safetensors"])
def test_staggered_round_trip_resumes_exactly(via, tmp_path):
    """The phases are state: 6 steps, save (torch state_dict, or optimizer.safetensors by name), 8
    more, versus a fresh optimizer loaded at step 6."""
    params = [torch.nn.Parameter(torch.randn(5, 7, generator=torch.Generator().manual_seed(i)))
              for i in range(3)]
    grads = [[torch.randn(5, 7, generator=torch.Generator().manual_seed(100 * i + t)) for t in range(14)]
             for i in range(3)]

    def run(optimizer, ps, steps):
        for t in steps:
            for p, g in zip(ps, grads):
                p.grad = g[t]
            optimizer.step()

    def named(ps):
        return [{"params": ps, "param_names": [f"w{i}" for i in range(len(ps))]}]

    opt = Mousse(named(params), **KW)
    run(opt, params, range(6))
    buf, path = io.BytesIO(), str(tmp_path / "optimizer.safetensors")
    torch.save(opt.state_dict(), buf)
    save_optimizer(opt, path)
    saved = [p.detach().clone() for p in params]
    run(opt, params, range(6, 14))
    resumed = [torch.nn.Parameter(w) for w in saved]
    opt2 = Mousse(named(resumed), **KW)
    if via == "state_dict":
        buf.seek(0)
        opt2.load_state_dict(torch.load(buf, weights_only=True))
    else:
        load_optimizer(opt2, path)
    assert [opt2.state[p][state_keys.REFRESH_PHASE] for p in resumed] == [
        opt.state[p][state_keys.REFRESH_PHASE] for p in params]
    run(opt2, resumed, range(6, 14))
    assert all(torch.equal(a, b) for a, b in zip(params, resumed))
