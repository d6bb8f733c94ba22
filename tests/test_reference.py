"""The fast optimizers agree with the plain float64 references of tests/reference.py."""

from __future__ import annotations

import pytest
import reference as ref
import torch

from hf_mousse import MiMuon, Mousse, Muon
from hf_mousse.optim import state_keys

SHAPES = {"square": (12, 12), "wide": (8, 20), "tall": (20, 8)}
STEPS = 25  # crosses eigenbasis refreshes at t = 1, 11, 21


def grads_for(shape, steps=STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A fixed anisotropic scaling makes the factors far from identity, so whitening matters.
    row = torch.logspace(0, 1, shape[0], dtype=torch.float64)[:, None]
    col = torch.logspace(0.5, 0, shape[1], dtype=torch.float64)[None, :]
    return [torch.randn(shape, generator=g, dtype=torch.float64) * row * col for _ in range(steps)]


def run_fast(opt_cls, w0, grads, **kwargs):
    p = torch.nn.Parameter(w0.float().clone())
    opt = opt_cls([p], **kwargs)
    out = []
    for g in grads:
        p.grad = g.float()
        opt.step()
        out.append(p.detach().double().clone())
    return out, opt


def rel_err(fast, reference, w0):
    """Error relative to how far the reference moved (so a no-op cannot pass)."""
    return ((fast - reference).norm() / (reference - w0.double()).norm()).item()


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("sides", ["both", "left", "right"])
@pytest.mark.parametrize("refresh", ["eigh", "newton"])
def test_mousse_matches_reference(shape, sides, refresh):
    """Both refresh methods against the same reference (which uses eigh), with the same bar."""
    # eps = 1e-3: on wide/tall matrices the long-side factor is rank-deficient after one step, and
    # its null-space eigenvalues (about eps) carry fp32 eigh noise of ~1e-6. With eps = 1e-5 that is
    # a few % of lambda^-alpha there (the official code has the same fp32 sensitivity), which would
    # hide real bugs behind a loose tolerance. The paper's eps is tested on full-rank factors below.
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = grads_for(shape)
    kw = dict(lr=0.02, weight_decay=0.01, sides=sides, refresh_every=10, eps=1e-3)
    expected = ref.mousse(w0, grads, **kw)
    got, opt = run_fast(Mousse, w0, grads, refresh=refresh, **kw)
    assert opt.stats()["eigh_refreshes"] == 3 * (2 if sides == "both" else 1)  # refreshes at t = 1, 11, 21
    if refresh == "newton":  # the state holds inverse roots, not eigenbases
        state = next(iter(opt.state.values()))
        assert state_keys.kron_root("left") in state or sides == "right"
        assert not any(k.endswith(("_eigvals", "_eigvecs")) for k in state)
    for t in (0, 9, 10, 19, 20, STEPS - 1):
        assert rel_err(got[t], expected[t], w0) < 1e-4, f"step {t + 1}"


@pytest.mark.parametrize("sides", ["both", "left", "right"])
def test_mousse_paper_defaults_match_reference(sides):
    w0 = torch.randn(12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = grads_for((12, 12))
    expected = ref.mousse(w0, grads, lr=0.02, sides=sides)  # eps 1e-5, alpha 0.125, T 10, beta 0.95
    got, _ = run_fast(Mousse, w0, grads, lr=0.02, sides=sides)
    assert rel_err(got[-1], expected[-1], w0) < 1e-4


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize(
    "options",
    [
        dict(nesterov=True, refresh_every=1),
        dict(grafting=False, bias_correction=False, alpha=0.25),
        dict(refresh_every=7, beta=0.9, eps=1e-3, adjust_lr="match_rms_adamw"),
    ],
    ids=["nesterov-T1", "nograft-nobc-alpha.25", "T7-beta.9"],
)
def test_mousse_options_match_reference(shape, options):
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = grads_for(shape, seed=3)
    kw = dict(lr=0.02, weight_decay=0.01, **{"eps": 1e-3, **options})
    expected = ref.mousse(w0, grads, **kw)
    got, _ = run_fast(Mousse, w0, grads, **kw)
    assert rel_err(got[-1], expected[-1], w0) < 1e-4


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw", "spectral_norm"])
def test_muon_matches_reference(shape, nesterov, adjust_lr):
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = grads_for(shape, seed=5)
    kw = dict(lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr=adjust_lr)
    expected = ref.muon(w0, grads, **kw)
    got, _ = run_fast(Muon, w0, grads, **kw)
    assert rel_err(got[-1], expected[-1], w0) < 1e-4


def test_mimuon_matches_reference_with_both_branches():
    """Two same-shape matrices in one bucket: one with a well separated spectrum (Muon branch),
    one with (nearly) equal singular values (SGD branch)."""
    g = torch.Generator().manual_seed(6)
    q1, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    spread = q1 @ torch.diag(torch.linspace(1.0, 0.1, 10, dtype=torch.float64)) @ q2  # gaps 0.1
    grads_a = [spread + 1e-3 * torch.randn(10, 10, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    grads_b = [q1 @ q2 * (1 + 0.1 * i) for i in range(STEPS)]  # orthogonal: all sigma equal
    w0a = torch.randn(10, 10, generator=g, dtype=torch.float64)
    w0b = torch.randn(10, 10, generator=g, dtype=torch.float64)
    kw = dict(lr=0.02, weight_decay=0.1, gap_threshold=1e-2, gap_every=10, sgd_scale="match")
    exp_a, br_a = ref.mimuon(w0a, grads_a, **kw)
    exp_b, br_b = ref.mimuon(w0b, grads_b, **kw)
    assert all(br_a) and not any(br_b), "test data must exercise both branches"

    pa, pb = torch.nn.Parameter(w0a.float()), torch.nn.Parameter(w0b.float())
    opt = MiMuon([pa, pb], **kw)
    for ga, gb in zip(grads_a, grads_b):
        pa.grad, pb.grad = ga.float(), gb.float()
        opt.step()
    assert rel_err(pa.detach().double(), exp_a[-1], w0a) < 1e-4
    assert rel_err(pb.detach().double(), exp_b[-1], w0b) < 1e-4
    frac = list(opt.muon_branch_fraction().values())
    assert frac == [1.0, 0.0]


def test_mimuon_paper_scale_matches_reference():
    """Unnormalised SGD branch; the spectrum changes mid-run so the cached branch flips."""
    g = torch.Generator().manual_seed(7)
    q1, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    spread = q1 @ torch.diag(torch.linspace(1.0, 0.1, 12, dtype=torch.float64)) @ q2[:12]
    flat = q1 @ q2[:12] * 3
    grads = [spread] * 12 + [flat] * 13
    w0 = torch.randn(12, 20, generator=g, dtype=torch.float64)
    kw = dict(lr=0.05, weight_decay=0.1, gap_threshold=0.05, gap_every=3, nesterov=False, momentum=0.5)
    expected, branches = ref.mimuon(w0, grads, **kw)
    got, _ = run_fast(MiMuon, w0, grads, **kw)
    assert rel_err(got[-1], expected[-1], w0) < 1e-4
    assert 0 < sum(branches) < len(branches), "threshold must mix both branches over the run"


def test_mousse_alpha0_equals_heavy_ball_muon():
    """With alpha = 0 whitening is the identity and NS commutes with the rotations: Mousse is
    Muon (Dion coefficients, spectral_norm LR, no Nesterov); grafting keeps the NS norm."""
    w0 = torch.randn(16, 24, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grads = grads_for((16, 24), seed=10)
    common = dict(lr=0.02, weight_decay=0.01, nesterov=False, adjust_lr="spectral_norm", ns="dion",
                  ns_eps=1e-8)
    mousse, _ = run_fast(Mousse, w0, grads, alpha=0.0, grafting=True, **common)
    muon, _ = run_fast(Muon, w0, grads, **common)
    assert rel_err(mousse[-1], muon[-1], w0) < 1e-4
    # ... and alpha > 0 really changes the update (the comparison above is not vacuous).
    whitened, _ = run_fast(Mousse, w0, grads, alpha=0.125, **common)
    assert rel_err(whitened[-1], muon[-1], w0) > 1e-2


@pytest.mark.parametrize("ns_dtype, tol", [("bfloat16", 1e-6), ("float32", 2e-2)])
def test_muon_matches_torch_muon(ns_dtype, tol):
    """Same settings as torch.optim.Muon (2-D params) over 10 steps."""
    g = torch.Generator().manual_seed(11)
    shapes = [(16, 16), (32, 16), (16, 48)]
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(10)]
    ours = [torch.nn.Parameter(w.clone()) for w in init]
    theirs = [torch.nn.Parameter(w.clone()) for w in init]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    opt_a = Muon(ours, ns_dtype=ns_dtype, **kw)
    opt_b = torch.optim.Muon(theirs, **kw)
    for step_grads in grads:
        for a, b, gr in zip(ours, theirs, step_grads):
            a.grad, b.grad = gr.clone(), gr.clone()
        opt_a.step()
        opt_b.step()
    for a, b, w in zip(ours, theirs, init):
        moved = (b - w).norm()
        assert moved > 0
        assert ((a - b).norm() / moved).item() < tol


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_mousse_small_side_whitens_the_smaller_factor(shape):
    """sides="small" is one-sided Mousse on the smaller side of each matrix (left when m <= n): it
    follows the float64 reference of that side, keeps only that factor, and differs from the other
    side's reference (for non-square shapes)."""
    m, n = shape
    side, other = ("left", "right") if m <= n else ("right", "left")
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = grads_for(shape)
    kw = dict(lr=0.02, weight_decay=0.01, refresh_every=10, eps=1e-3)
    got, opt = run_fast(Mousse, w0, grads, sides="small", **kw)
    expected = ref.mousse(w0, grads, sides=side, **kw)
    assert rel_err(got[-1], expected[-1], w0) < 1e-4
    state = next(iter(opt.state.values()))
    assert state_keys.kron(side) in state and state_keys.kron(other) not in state
    assert state[state_keys.kron(side)].shape[-1] == min(m, n)
    if m != n:
        assert rel_err(got[-1], ref.mousse(w0, grads, sides=other, **kw)[-1], w0) > 1e-3


@pytest.mark.parametrize("shape, max_dim, blocks", [
    ((12, 12), 4, (3, 3)),  # both sides cut
    ((8, 20), 8, (1, 4)),  # the long side only: 20 -> 4 blocks of 5 (the fewest equal blocks <= 8)
    ((20, 8), 10, (2, 1)),
    ((8, 20), 0, (1, 1)),  # 0: whole factors
])
@pytest.mark.parametrize("refresh", ["eigh", "newton"])
@pytest.mark.parametrize("refresh_delay", [0, 1])
def test_mousse_max_factor_dim_keeps_block_diagonal_factors(shape, max_dim, blocks, refresh, refresh_delay):
    """max_factor_dim=B cuts a side longer than B into equal diagonal blocks, each with its own factor and
    basis: the float64 reference with each factor's off-diagonal blocks zeroed (normalised as one factor),
    for two matrices stacked in one bucket; its state holds blocks x (d/blocks)^2 per side, not d^2; and
    cutting really changes the run (it differs from the whole-factor reference)."""
    m, n = shape
    kw = dict(lr=0.02, weight_decay=0.01, refresh_every=4, eps=1e-3, refresh_delay=refresh_delay)
    w0s = [torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
           for s in (1, 2)]
    gradss = [grads_for(shape, seed=s) for s in (1, 2)]
    ps = [torch.nn.Parameter(w.float().clone()) for w in w0s]
    opt = Mousse(ps, max_factor_dim=max_dim, refresh=refresh, **kw)
    for t in range(STEPS):
        for p, grads in zip(ps, gradss):
            p.grad = grads[t].float()
        opt.step()
    for p, w0, grads in zip(ps, w0s, gradss):
        expected = ref.mousse(w0, grads, blocks=blocks, **kw)[-1]
        assert rel_err(p.detach().double(), expected, w0) < 1e-4
        if blocks != (1, 1):
            assert rel_err(expected, ref.mousse(w0, grads, **kw)[-1], w0) > 1e-2
    state = opt.state[ps[0]]
    for side, d, nb in (("left", m, blocks[0]), ("right", n, blocks[1])):
        assert state[state_keys.kron(side)].shape == (nb, d // nb, d // nb)
