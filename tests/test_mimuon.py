"""MiMuon's branch logic against the float64 reference (tests/reference.py): the SGD branch's LR
ratio and scale, the gap test's schedule (cached between tests), its rank-deficiency filter, and the
size-aware default gap rule."""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch

from hf_mousse import MiMuon

pytestmark = pytest.mark.usefixtures("single_thread")

# Every hyperparameter the tests depend on, explicitly (defaults may be re-calibrated).
BASE = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, gap_rule="relative", gap_every=5,
            sgd_scale="paper",
            sgd_lr_ratio=1.0, ns="keller_jordan", ns_steps=5, ns_eps=1e-7, ns_dtype="float32",
            adjust_lr="original")
# The reference takes the same keys, except the NS ones, which reference() translates.
NS_KEYS = ("ns", "ns_steps", "ns_eps", "ns_dtype")
FORCE_SGD = 2.0  # the relative gap (sigma_i - sigma_i+1) / sigma_1 never exceeds 1


def run(w0, grads, **kw):
    """MiMuon on one matrix; returns (weights after each step, muon-branch fraction)."""
    p = torch.nn.Parameter(w0.float().clone())
    opt = MiMuon([p], **kw)
    out = []
    for g in grads:
        p.grad = g.float().clone()
        opt.step()
        out.append(p.detach().double().clone())
    (fraction,) = opt.muon_branch_fraction().values()
    return out, fraction


def reference(w0, grads, **kw):
    """tests/reference.py's float64 MiMuon with the same settings; returns (weights, branches)."""
    assert (kw["ns"], kw["ns_steps"]) == ("keller_jordan", len(ref.KELLER_JORDAN))
    rest = {k: v for k, v in kw.items() if k not in NS_KEYS}
    return ref.mimuon(w0, grads, coefficients=ref.KELLER_JORDAN, eps=kw["ns_eps"], **rest)


def rel_err(fast, expected, w0):
    """Error relative to how far the reference moved (so a no-op cannot pass)."""
    return ((fast - expected).norm() / (expected - w0.double()).norm()).item()


def start(shape, seed):
    """Initial weights, exactly representable in fp32 (the fast optimizer's parameter dtype)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).double()


def random_problem(shape, steps, seed):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, generator=g).double()
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]
    return w0, grads


def spectrum_matrix(shape, sigma, seed):
    """A matrix with the given singular values (the rest 0) and random singular vectors."""
    m, n = shape
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.zeros(m, n, dtype=torch.float64)
    k = len(sigma)
    s[range(k), range(k)] = torch.tensor(sigma, dtype=torch.float64)
    return u @ s @ v.T


@pytest.mark.parametrize("sgd_scale", ["paper", "match"])
def test_sgd_lr_ratio_scales_the_sgd_branch(sgd_scale):
    """On the SGD branch the step is sgd_lr_ratio times the (paper or matched) momentum step: the
    first update is exactly -lr * ratio * D (times sqrt(r) / ||D|| for "match"), and 8 steps
    agree with the reference; ratio 1 would land far away."""
    shape = (8, 12)
    w0, grads = random_problem(shape, 8, seed=0)
    kw = {**BASE, "gap_threshold": FORCE_SGD, "sgd_scale": sgd_scale, "sgd_lr_ratio": 0.25,
          "weight_decay": 0.0}
    got, fraction = run(w0, grads, **kw)
    assert fraction == 0.0

    mu = kw["momentum"]
    d = (1 - mu) * (1 + mu) * grads[0]  # Nesterov mix after one step of EMA momentum from 0
    if sgd_scale == "match":
        d = d * math.sqrt(min(shape)) / d.norm()
    first = -kw["lr"] * kw["sgd_lr_ratio"] * d
    err = ((got[0] - w0) - first).norm() / first.norm()
    assert err < 1e-4, f"first step is {(got[0] - w0).norm():.4g}, expected {first.norm():.4g}"

    expected, branches = reference(w0, grads, **kw)
    assert not any(branches)
    assert rel_err(got[-1], expected[-1], w0) < 1e-4
    unit_ratio, _ = reference(w0, grads, **{**kw, "sgd_lr_ratio": 1.0})
    assert rel_err(unit_ratio[-1], expected[-1], w0) > 0.5  # the ratio matters at this tolerance


@pytest.mark.parametrize("shape", [(6, 20), (20, 6)], ids=["wide", "tall"])
def test_match_scale_uses_short_side(shape):
    """sgd_scale="match" rescales the momentum to Frobenius norm sqrt(min(m, n)), the norm of an
    orthogonal m x n matrix, for wide and tall matrices alike: one step moves the weights by
    exactly lr * sgd_lr_ratio * sqrt(min(m, n)) (no weight decay), and 8 steps match the reference."""
    w0, grads = random_problem(shape, 8, seed=1)
    kw = {**BASE, "gap_threshold": FORCE_SGD, "sgd_scale": "match", "sgd_lr_ratio": 0.5,
          "weight_decay": 0.0}
    got, fraction = run(w0, grads, **kw)
    assert fraction == 0.0
    step = (got[0] - w0).norm().item()
    expected_step = kw["lr"] * kw["sgd_lr_ratio"] * math.sqrt(min(shape))
    assert step == pytest.approx(expected_step, rel=1e-4), (
        f"first step norm {step:.5f}; sqrt(min) gives {expected_step:.5f}, "
        f"sqrt(max) would give {kw['lr'] * kw['sgd_lr_ratio'] * math.sqrt(max(shape)):.5f}"
    )
    expected, _ = reference(w0, grads, **{**kw, "weight_decay": 0.1})
    got, _ = run(w0, grads, **{**kw, "weight_decay": 0.1})
    assert rel_err(got[-1], expected[-1], w0) < 1e-4


def test_gap_is_tested_every_gap_every_steps_and_cached():
    """The branch is chosen at t = 1, K + 1, 2K + 1, ... and kept in between: a spectrum that goes
    flat at step 3 keeps the Muon branch until the test at step 6. Testing every step would switch
    at step 3 (checked on the reference, so the data really tells the two apart)."""
    shape = (10, 14)
    spread = spectrum_matrix(shape, torch.linspace(1.0, 0.1, 10).tolist(), seed=2) * 4
    flat = spectrum_matrix(shape, [3.0] * 10, seed=3)
    grads = [spread] * 2 + [flat + 0.01 * spread * i for i in range(10)]
    w0 = start(shape, seed=4)
    kw = {**BASE, "gap_threshold": 0.05, "gap_every": 5, "momentum": 0.5, "nesterov": False}

    expected, branches = reference(w0, grads, **kw)
    assert branches == [True] * 5 + [False] * 7
    _, every_step = reference(w0, grads, **{**kw, "gap_every": 1})
    assert every_step[:5] != branches[:5], "the data must tell caching from testing every step"

    got, fraction = run(w0, grads, **kw)
    assert fraction == pytest.approx(5 / 12), f"Muon branch on {fraction * 12:.0f} of 12 steps, expected 5"
    assert rel_err(got[-1], expected[-1], w0) < 1e-4
    for t in (2, 4, 5, 11):  # steps 3, 5 (cached Muon), 6 (new test: SGD), 12
        assert rel_err(got[t], expected[t], w0) < 1e-4, f"step {t + 1}"


def test_rank_deficient_momentum_with_separated_spectrum_takes_muon_branch():
    """Singular values below sigma_1 * sqrt(r * eps_fp32) are numerically zero and must not enter the
    gap: a rank-4 momentum with singular values 1, 0.75, 0.5, 0.25 has relative gap 0.25 and takes
    the Muon branch (counting the zero singular values would give a gap of ~0 and the SGD branch)."""
    shape = (8, 12)
    base = spectrum_matrix(shape, [1.0, 0.75, 0.5, 0.25], seed=5)
    grads = [base * (1 + 0.1 * t) for t in range(7)]  # same singular vectors: momentum stays rank 4
    w0 = start(shape, seed=6)
    kw = {**BASE, "gap_threshold": 0.1, "gap_every": 3}
    assert ref.gap_statistic(base, "relative") == pytest.approx(0.25)

    expected, branches = reference(w0, grads, **kw)
    assert all(branches)
    got, fraction = run(w0, grads, **kw)
    assert fraction == 1.0, "a rank-deficient, well separated momentum took the SGD branch"
    assert rel_err(got[-1], expected[-1], w0) < 1e-4


def test_small_but_resolvable_singular_values_count_in_the_gap():
    """The filter drops only what fp32 cannot resolve: singular values 0.01 and 0.0099 of a
    full-rank momentum (sigma^2 = 1e-4, far above sigma_1^2 * r * eps_fp32 ~ 1e-6) are kept, their
    gap of 1e-4 is below the threshold, and the matrix takes the SGD branch."""
    shape = (8, 12)
    sigma = [1.0, 0.85, 0.7, 0.55, 0.4, 0.25, 0.01, 0.0099]
    base = spectrum_matrix(shape, sigma, seed=7)
    grads = [base * (1 + 0.1 * t) for t in range(7)]
    w0 = start(shape, seed=8)
    kw = {**BASE, "gap_threshold": 0.01, "gap_every": 3}
    assert ref.gap_statistic(base, "relative") == pytest.approx(1e-4)

    expected, branches = reference(w0, grads, **kw)
    assert not any(branches)
    got, fraction = run(w0, grads, **kw)
    assert fraction == 0.0
    assert rel_err(got[-1], expected[-1], w0) < 1e-4


def test_scaled_rule_measures_the_gap_in_mean_spacings():
    """gap_rule="scaled" (the default) is the relative gap times (k - 1), k = resolvable singular
    values: at the default threshold a random Gaussian momentum takes the Muon branch whatever its
    size (its relative gap shrinks with the size and falls below 1e-3 from ~256 on), while one with
    equal singular values (already orthogonal up to scale) takes the SGD branch."""
    g = torch.Generator().manual_seed(9)
    for n in (32, 256):
        d = torch.randn(n, n, generator=g, dtype=torch.float64)
        s = torch.linalg.svdvals(d)
        k = int((s**2 > s[0] ** 2 * n * torch.finfo(torch.float32).eps).sum())  # resolvable values
        relative, scaled = ref.gap_statistic(d, "relative"), ref.gap_statistic(d, "scaled")
        assert k > n // 2 and scaled == pytest.approx(relative * (k - 1))
        opt = MiMuon([torch.nn.Parameter(torch.zeros(n, n))], lr=0.01)  # the default rule and threshold
        opt.param_groups[0]["params"][0].grad = d.float()
        opt.step()
        assert opt.muon_branch_fraction() == {"0:0": 1.0}, f"{n}x{n} Gaussian: scaled gap {scaled:.2e}"
    assert ref.gap_statistic(torch.randn(256, 256, generator=g, dtype=torch.float64), "relative") < 1e-3
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    opt = MiMuon([torch.nn.Parameter(torch.zeros(32, 32))], lr=0.01)
    opt.param_groups[0]["params"][0].grad = q.float()
    opt.step()
    assert opt.muon_branch_fraction() == {"0:0": 0.0}


def test_scaled_rule_matches_reference_across_a_switch():
    """The default rule over a run whose spectrum goes flat mid-way: same weights and branches as the
    float64 reference. At the test of step 11 the momentum's scaled gap (~1.5e-4) is above the
    threshold and its relative gap (~1.7e-5) below it, so only the scaled rule stays on Muon there."""
    shape = (10, 14)
    spread = spectrum_matrix(shape, torch.linspace(1.0, 0.1, 10).tolist(), seed=10) * 4
    flat = spectrum_matrix(shape, [3.0] * 10, seed=11)
    grads = [spread] * 6 + [flat] * 14
    w0 = start(shape, seed=12)
    kw = {**BASE, "gap_rule": "scaled", "gap_threshold": 5e-5, "gap_every": 5, "momentum": 0.3}
    expected, branches = reference(w0, grads, **kw)
    assert branches == [True] * 15 + [False] * 5
    _, relative = reference(w0, grads, **{**kw, "gap_rule": "relative"})
    assert relative == [True] * 10 + [False] * 10  # the data tells the two rules apart
    got, fraction = run(w0, grads, **kw)
    assert fraction == pytest.approx(sum(branches) / len(branches))
    assert rel_err(got[-1], expected[-1], w0) < 1e-4
