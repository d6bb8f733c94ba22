"""refresh="newton": the factors' inverse roots by the coupled Newton iteration (matmuls only) follow
the float64 reference (which uses eigh) within the same bar as refresh="eigh" (every shape and side:
test_reference.py; other roots here), converge at the worst condition the damping allows, and keep
the state and resume rules."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from test_reference import grads_for, rel_err, run_fast

from hf_mousse import Mousse, load_optimizer, save_optimizer
from hf_mousse.errors import CheckpointError, NonFiniteGradientError
from hf_mousse.optim.kronecker import inverse_root_newton, newton_iterations

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(
    "options",
    [dict(), dict(alpha=0.25, nesterov=True), dict(alpha=0.5, refresh_every=3, bias_correction=False)],
    ids=["paper-defaults", "alpha.25-nesterov", "alpha.5-T3-nobc"],
)
def test_newton_refresh_options_match_reference(options):
    """The paper's eps (1e-5) on full-rank factors, and other roots p = 1 / alpha."""
    w0 = torch.randn(12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = grads_for((12, 12), seed=3)
    kw = dict(lr=0.02, **options)
    expected = ref.mousse(w0, grads, **kw)
    got, _ = run_fast(Mousse, w0, grads, refresh="newton", **kw)
    assert rel_err(got[-1], expected[-1], w0) < 1e-4


def _extreme_factor(d: int, eps: float, seed: int) -> torch.Tensor:
    """A damped, trace-normalised rank-1 factor: eigenvalues d + eps once and eps d - 1 times, the
    spread that newton_iterations' bound is for (smallest eigenvalue eps, ||A||_F ~ d)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    vals = torch.full((d,), eps, dtype=torch.float64)
    vals[0] += d
    return (q * vals) @ q.mT, q, vals


def _rel(x: torch.Tensor, expected: torch.Tensor) -> float:
    return ((x.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_inverse_root_converges_at_the_damping_bound(p, eps):
    """At the worst spread the damping allows, the iteration count from the bound reaches the root of
    the fp32 input as closely as fp32 eigh does (both limited by fp32 rounding at condition d / eps),
    and the count is not loose: four fewer iterations are far from converged."""
    d = 64
    a, _, _ = _extreme_factor(d, eps, seed=p)
    a32 = a.float()
    vals, vecs = torch.linalg.eigh(a32.double())  # the exact root of what fp32 holds
    expected = (vecs * vals.pow(-1.0 / p)) @ vecs.mT
    v32, q32 = torch.linalg.eigh(a32)
    eigh_err = _rel((q32 * v32.clamp_min(eps).pow(-1.0 / p)) @ q32.mT, expected)
    n = newton_iterations(d, p, eps)
    got = inverse_root_newton(a32[None], p, n)[0]
    assert _rel(got, expected) < 3 * eigh_err
    assert torch.equal(got, got.mT)
    if eps == 1e-3:  # at 1e-5 fp32 rounding (~eps) hides the last iterations
        assert _rel(inverse_root_newton(a32[None], p, n - 4)[0], expected) > 10 * _rel(got, expected)


def test_alpha_must_be_one_over_an_integer():
    w = torch.nn.Parameter(torch.zeros(4, 4))
    for alpha in (0.3, 0.0):
        with pytest.raises(ValueError, match=r"alpha.*1/p for an integer p >= 1 with refresh='newton'.*"
                                             r"refresh='eigh'"):
            Mousse([w], alpha=alpha, refresh="newton")
    with pytest.raises(ValueError, match=r"refresh.*one of \('eigh', 'newton'\)"):
        Mousse([w], refresh="qr")
    Mousse([w], alpha=0.3)  # eigh takes any alpha


def _stepped(refresh: str, steps: int = 3) -> tuple[torch.nn.Module, Mousse]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    opt = Mousse.for_model(model, lr=0.02, refresh_every=2, refresh=refresh)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_resume_is_exact_and_the_method_cannot_change(tmp_path):
    model, opt = _stepped("newton")
    path = str(tmp_path / "optimizer.safetensors")
    save_optimizer(opt, path)
    fresh = Mousse.for_model(model, lr=0.02, refresh_every=2, refresh="newton")
    load_optimizer(fresh, path)
    for p in opt.state:
        for k, v in opt.state[p].items():
            w = fresh.state[p][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w
    other = Mousse.for_model(model, lr=0.02, refresh_every=2)  # eigh: the saved roots would not fit
    message = r"with refresh='eigh': the state was saved with refresh='newton'"
    with pytest.raises(CheckpointError, match=message):
        load_optimizer(other, path)


def test_a_checkpoint_from_before_the_option_resumes_as_eigh():
    """Groups saved before refresh= existed have no such key: they were all eigh."""
    model, opt = _stepped("eigh")
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        del group["refresh"]
    Mousse.for_model(model, lr=0.02, refresh_every=2).load_state_dict(sd)
    message = r"with refresh='newton': the state was saved with refresh='eigh'"
    with pytest.raises(CheckpointError, match=message):
        Mousse.for_model(model, lr=0.02, refresh_every=2, refresh="newton").load_state_dict(sd)


def _roots(opt: Mousse, p: torch.Tensor) -> dict[str, torch.Tensor]:
    return {side: opt.state[p][f"kron_{side}_root"].clone() for side in ("left", "right")}


def test_invalid_factors_keep_their_roots():
    """A factor with zero trace (an expert that has only seen zero gradients) is not refreshed: its root
    stays the initial identity, while the other experts' roots, refreshed in the same batch, move;
    the weights stay finite."""
    g = torch.Generator().manual_seed(0)
    experts = torch.nn.Parameter(torch.randn(3, 8, 12, generator=g))
    opt = Mousse([experts], lr=0.02, refresh="newton", refresh_every=1)
    eye = {side: torch.eye(d).expand(3, d, d) for side, d in (("left", 8), ("right", 12))}
    for _ in range(3):
        experts.grad = torch.randn(3, 8, 12, generator=g)
        experts.grad[1] = 0
        opt.step()
        for side, root in _roots(opt, experts).items():
            assert torch.equal(root[1], eye[side][1]), side  # the zero factor kept its root
            assert not torch.equal(root[0], eye[side][0]) and not torch.equal(root[2], eye[side][2]), side
    opt.check_finite()
    assert torch.isfinite(experts).all()


def test_a_nonfinite_step_keeps_the_roots():
    """nonfinite="raise": a step with a NaN gradient that falls on a refresh leaves every inverse root
    exactly as it was (a skipped factor is not refreshed); the next finite step refreshes them."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((8, 12), (8, 12), (3, 8, 12))]
    opt = Mousse(params, lr=0.02, refresh="newton", refresh_every=1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    roots = [_roots(opt, p) for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    params[1].grad[0, 0] = float("nan")
    opt.step()  # t = 2: a refresh is due, on a non-finite step
    for p, before in zip(params, roots):
        for side, root in _roots(opt, p).items():
            assert torch.equal(root, before[side]), side
    with pytest.raises(NonFiniteGradientError):
        opt.check_finite()
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    for p, before in zip(params, roots):
        for side, root in _roots(opt, p).items():
            assert not torch.equal(root, before[side]), side
