"""Section 8 of issue 2: skipped params, zero and non-finite gradients, validation, closures,
bf16 parameters with fp32 state, state_dict round trips, eigh failures."""

from __future__ import annotations

import io
import math

import pytest
import torch

from hf_mousse import MiMuon, Mousse, Muon
from hf_mousse.errors import InvalidHyperparameterError, NonFiniteGradientError, UnsupportedParameterError

ALL = [Muon, Mousse, MiMuon]
ids = [c.__name__ for c in ALL]


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 12), (12, 8), (8, 12), (6,), (3, 8, 12)]  # two same-shape matrices, a vector, experts
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def set_grads(params, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.dtype)


@pytest.mark.parametrize("cls", ALL, ids=ids)
def test_params_without_grad_are_skipped(cls):
    params = make_params()
    opt = cls(params, lr=0.02)
    set_grads(params, 1)
    params[1].grad = None
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1], before)
    assert params[1] not in opt.state
    assert not torch.equal(params[0], make_params()[0])


@pytest.mark.parametrize("cls", ALL, ids=ids)
def test_zero_gradients_give_no_nan(cls):
    params = make_params()
    opt = cls(params, lr=0.02, weight_decay=0.1, scalar_weight_decay=0.1)
    init = [p.detach().clone() for p in params]
    for _ in range(12):  # crosses Mousse's refreshes at t = 1 and 11 with all-zero factors
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, w in zip(params, init):
        assert torch.isfinite(p).all()
        # Only weight decay acts: W = W0 * (1 - lr * wd)^12.
        torch.testing.assert_close(p.detach(), w * (1 - 0.02 * 0.1) ** 12)
    assert opt.stats()["eigh_failures"] == 0


@pytest.mark.parametrize("cls", ALL, ids=ids)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_by_default_and_leaves_params(cls, bad):
    """The default nonfinite="raise" keeps step() free of device reads: the step changes nothing
    and the error comes at the next check (check_finite, stats, diagnostics, state_dict; see
    tests/test_no_sync.py)."""
    params = make_params()
    opt = cls([{"params": params, "param_names": [f"w{i}" for i in range(len(params))]}], lr=0.02)
    set_grads(params, 1)
    opt.step()
    snapshot = [p.detach().clone() for p in params]
    set_grads(params, 2)
    params[2].grad[0, 0] = bad
    opt.step()
    assert all(torch.equal(p, s) for p, s in zip(params, snapshot))
    with pytest.raises(NonFiniteGradientError, match="w2"):
        opt.check_finite()


@pytest.mark.parametrize("cls", ALL, ids=ids)
def test_nonfinite_skip_mode_counts_and_skips(cls):
    params = make_params()
    opt = cls(params, lr=0.02, nonfinite="skip")
    set_grads(params, 1)
    params[3].grad[0] = float("nan")
    before = [p.detach().clone() for p in params]
    opt.step()
    assert opt.stats()["nonfinite_skips"] == 1
    assert opt.diagnostics()["optim/nonfinite_skips"] == 1
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert len(opt.state) == 0  # skipped before any state was made: step counters did not advance
    set_grads(params, 2)
    opt.step()
    assert opt.stats()["nonfinite_skips"] == 1
    assert not torch.equal(params[0], before[0])


BAD_HYPERPARAMETERS = [
    (Muon, "lr", -1.0),
    (Muon, "momentum", 1.0),
    (Muon, "weight_decay", -0.1),
    (Muon, "nesterov", "yes"),
    (Muon, "ns", "newton"),
    (Muon, "ns_steps", 0),
    (Muon, "ns_dtype", "int8"),
    (Muon, "adjust_lr", "rms"),
    (Muon, "weight_decay_schedule", "cosine"),
    (Muon, "scalar_optimizer", "sgd"),
    (Muon, "betas", (0.9, 1.5)),
    (Muon, "scalar_eps", 0.0),
    (Muon, "nonfinite", "warn"),
    (Mousse, "alpha", -0.1),
    (Mousse, "beta", 1.0),
    (Mousse, "refresh_every", 0),
    (Mousse, "eps", 0.0),
    (Mousse, "sides", "top"),
    (Mousse, "grafting", "on"),
    (MiMuon, "gap_threshold", -1.0),
    (MiMuon, "gap_every", 0),
    (MiMuon, "sgd_scale", "auto"),
    # issue 12: values that made NaN weights (or silently zero updates) ...
    (Mousse, "eps", 1e-40),  # below float32's smallest normal number: 0 in the factors
    (Mousse, "alpha", 5.0),
    (Mousse, "alpha", math.nan),
    (Muon, "lr", math.inf),
    (Muon, "scalar_lr", math.inf),
    (MiMuon, "sgd_lr_ratio", math.inf),
    (MiMuon, "gap_threshold", math.nan),
    (Muon, "ns", [(math.nan, 1.0, 1.0)]),
    (Muon, "ns", 5),
    (Muon, "ns_eps", math.inf),
    (Muon, "ns_eps", 1e-50),
    (Muon, "scalar_eps", 1e-50),
    (Muon, "momentum", math.nan),
    (Muon, "weight_decay", math.inf),
    (Muon, "scalar_weight_decay", -1.0),
    # ... values of the wrong kind, which raised a bare TypeError or were taken as numbers
    (Mousse, "alpha", "0.1"),
    (Mousse, "beta", "0.9"),
    (Muon, "betas", 0.9),
    (Muon, "betas", (0.9, True)),
    (Muon, "lr", True),
    (Mousse, "refresh_every", True),
    (MiMuon, "gap_every", True),
    (Muon, "ns_steps", True),
]


@pytest.mark.parametrize(
    "cls, key, value", BAD_HYPERPARAMETERS, ids=[f"{c.__name__}-{k}={v!r}" for c, k, v in BAD_HYPERPARAMETERS]
)
def test_invalid_hyperparameters_name_the_parameter(cls, key, value):
    with pytest.raises(InvalidHyperparameterError, match=key) as info:
        cls(make_params(), **{key: value})
    assert isinstance(info.value, ValueError)


def test_whitening_that_would_overflow_float32_is_refused():
    """Mousse divides by eigenvalues >= eps raised to alpha on each side, twice: eps^(-2 alpha) is the
    largest amplification of a direction, and it must leave float32 norms room (<= 1e12)."""
    message = r"eps=1e-10.*eps\^\(-2 alpha\) <= 1e\+12 with alpha=1\.0"
    with pytest.raises(InvalidHyperparameterError, match=message):
        Mousse(make_params(), alpha=1.0, eps=1e-10)
    Mousse(make_params(), alpha=0.5, eps=1e-10)  # the authors' class default eps: 1e10
    Mousse(make_params(), alpha=1.0, eps=1e-5)


@pytest.mark.parametrize("eps", [1e-15, 1e-30])
def test_a_tiny_eps_keeps_its_floor_in_float32(eps):
    """The eigenvalue cleaning (lambda + max(0, -min lambda) + eps) loses eps in fp32 when the shift is
    much larger (1e-7 + 1e-15 == 1e-7); the floor must still hold, or 0 ** -alpha gives inf updates.
    A rank-deficient gradient (rank 2 of 8) makes the smallest eigenvalues ~0 up to rounding."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 12, generator=g))]
    opt = Mousse(params, lr=0.02, eps=eps, refresh_every=1)
    before = params[0].detach().clone()
    for _ in range(3):
        params[0].grad = torch.randn(8, 2, generator=g) @ torch.randn(2, 12, generator=g)
        opt.step()
    opt.check_finite()  # no NonFiniteUpdateError
    st = opt.state[params[0]]
    for side in ("left", "right"):
        assert st[f"kron_{side}_eigvals"].min() >= torch.tensor(eps, dtype=torch.float32)
    assert torch.isfinite(params[0]).all() and not torch.equal(params[0], before)


def test_overflowed_factors_are_counted():
    """A finite gradient of 1e30 overflows G G^T in fp32: the factor holds inf from then on and its
    eigenbasis is kept at every refresh. Under any nonfinite mode that is counted, not silent."""
    for mode in ("ignore", "raise"):
        params = make_params()[:1]
        opt = Mousse(params, lr=0.02, refresh_every=1, nonfinite=mode)
        for s in range(3):
            set_grads(params, s, scale=1e30 if s == 1 else 1.0)
            opt.step()
        assert not torch.isfinite(opt.state[params[0]]["kron_left"]).all()
        assert opt.stats()["eigh_nonfinite_factors"] == 4, mode  # two sides x refreshes at t = 2, 3


def test_invalid_group_value_is_caught_too():
    params = make_params()
    with pytest.raises(InvalidHyperparameterError, match="alpha"):
        Mousse([{"params": params[:1], "role": "matrix", "alpha": -1.0}])
    with pytest.raises(UnsupportedParameterError, match="scalar"):
        Muon([{"params": params[3:4], "role": "matrix"}])
    with pytest.raises(UnsupportedParameterError, match="split=5"):
        Muon([{"params": params[:1], "role": "matrix", "split": 5}])


def test_sparse_gradient_is_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = Muon(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(UnsupportedParameterError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("cls", ALL, ids=ids)
def test_step_closure_positional_and_keyword(cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    opt = cls(model.parameters(), lr=0.02)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure)
    second = opt.step(closure=closure)
    assert isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)
    assert second.item() < first.item()


@pytest.mark.parametrize("cls", ALL, ids=ids)
def test_bf16_params_keep_fp32_state_through_state_dict(cls):
    params = make_params(torch.bfloat16)
    opt = cls(params, lr=0.02)
    for s in range(3):
        set_grads(params, s)
        opt.step()
    for p in params:
        assert p.dtype == torch.bfloat16 and torch.isfinite(p.float()).all()
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert value.dtype == torch.float32, key
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    other = cls(params, lr=0.02)
    other.load_state_dict(loaded)
    for p in params:
        for key, value in other.state[p].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == opt.state[p][key].dtype, key
                assert torch.equal(value, opt.state[p][key]), key


@pytest.mark.parametrize("cls", ALL, ids=ids)
def test_state_dict_round_trip_resumes_exactly(cls):
    """7 steps, save, 8 more; versus a fresh optimizer loaded at step 7 doing the same 8 steps.
    Steps 8-15 include Mousse's refresh at t = 11, so cached eigenbases must round-trip."""
    kw = dict(lr=0.02, weight_decay=0.05, scalar_lr=0.01)
    params = make_params()
    opt = cls(params, **kw)
    for s in range(7):
        set_grads(params, s)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved_weights = [p.detach().clone() for p in params]
    for s in range(7, 15):
        set_grads(params, s)
        opt.step()

    resumed = [torch.nn.Parameter(w.clone()) for w in saved_weights]
    opt2 = cls(resumed, **kw)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for s in range(7, 15):
        set_grads(resumed, s)
        opt2.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    since_construction = ("matrix_updates",)  # the rest is carried over by the checkpoint
    assert ({k: v for k, v in opt2.stats().items() if k not in since_construction}
            == {k: v for k, v in opt.stats().items() if k not in since_construction})


def test_eigh_float64_retry_and_failure_keep_training(monkeypatch):
    params = make_params()[:3]
    opt = Mousse(params, lr=0.02, refresh_every=1)
    set_grads(params, 0)
    opt.step()
    basis = opt.state[params[0]]["kron_left_eigvecs"].clone()
    real_eigh = torch.linalg.eigh

    def fp32_fails(a, *args, **kwargs):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated: fp32 eigh did not converge")
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", fp32_fails)
    set_grads(params, 1)
    opt.step()
    stats = opt.stats()
    assert stats["eigh_fp64_retries"] > 0 and stats["eigh_failures"] == 0
    assert not torch.equal(opt.state[params[0]]["kron_left_eigvecs"], basis)

    def always_fails(a, *args, **kwargs):
        raise torch.linalg.LinAlgError("simulated: eigh did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", always_fails)
    basis = opt.state[params[0]]["kron_left_eigvecs"].clone()
    before = params[0].detach().clone()
    set_grads(params, 2)
    opt.step()  # does not raise
    assert opt.stats()["eigh_failures"] == 6  # 3 matrices x 2 sides, old bases kept
    assert torch.equal(opt.state[params[0]]["kron_left_eigvecs"], basis)
    assert torch.isfinite(params[0]).all() and not torch.equal(params[0], before)


def test_eigh_failing_for_one_matrix_of_a_batch_keeps_only_its_basis(monkeypatch):
    """eigh fails, in fp32 and in float64, for one expert's factors only (the batch fails, the retry one
    by one fails for that matrix): that expert keeps its eigenvalues and eigenvectors exactly, the
    other experts of the same batch are refreshed, and each failure is counted. Expert 1's gradients
    are diagonal, so its damped factors are the only diagonal ones and the mock can tell them apart."""
    g = torch.Generator().manual_seed(0)
    experts = torch.nn.Parameter(torch.randn(3, 8, 12, generator=g))
    opt = Mousse([experts], lr=0.02, refresh_every=1)

    def set_grad():
        experts.grad = torch.randn(3, 8, 12, generator=g)
        experts.grad[1] = 0
        experts.grad[1].diagonal().copy_(torch.rand(8, generator=g) + 0.5)

    set_grad()
    opt.step()  # a real refresh: every expert has its own basis
    keys = [f"kron_{side}_{what}" for side in ("left", "right") for what in ("eigvals", "eigvecs")]
    before = {k: opt.state[experts][k].clone() for k in keys}
    real_eigh = torch.linalg.eigh

    def is_diagonal(a):
        return torch.equal(a, torch.diag_embed(a.diagonal(dim1=-2, dim2=-1)))

    def fails_for_expert_1(a, *args, **kwargs):
        if any(is_diagonal(m) for m in (a if a.dim() == 3 else a[None])):
            raise torch.linalg.LinAlgError(f"simulated: {a.dtype} eigh did not converge")
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", fails_for_expert_1)
    set_grad()
    opt.step()
    stats = opt.stats()
    assert stats["eigh_failures"] == 2  # expert 1's left and right factors
    for k in keys:
        now = opt.state[experts][k]
        assert torch.equal(now[1], before[k][1]), k  # kept, bit for bit
        assert not torch.equal(now[0], before[k][0]) and not torch.equal(now[2], before[k][2]), k
    assert torch.isfinite(experts).all()
