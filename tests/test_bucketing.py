"""Same-shape matrices stacked into one batch are optimised exactly as if each were alone.

Mousse keeps per-matrix state (momentum, Kronecker factors, cached eigenbases) and processes
same-shape matrices of a param group as one stack, refreshing the eigenbases of those whose step
is due. These tests feed one optimizer holding many same-shape matrices, and one optimizer per
matrix, the same gradients, and require the same weights and the same state.
"""

from __future__ import annotations

import pytest
import torch

from hf_mousse import MiMuon, Mousse

pytestmark = pytest.mark.usefixtures("single_thread")

M, N = 6, 10  # every matrix block in the bucket; wide, so left and right factors differ in size
STEPS = 13
SKIPS = {2, 7, 8}  # global steps on which the "lagging" parameter gets no gradient
NAMES = ("a", "b", "c", "experts", "lagging")

MOUSSE = dict(lr=0.05, momentum=0.9, nesterov=False, weight_decay=0.01, alpha=0.25, beta=0.9,
              refresh_every=3, eps=1e-4, bias_correction=True, grafting=True, ns="dion", ns_steps=5,
              ns_eps=1e-8, ns_dtype="float32", adjust_lr="spectral_norm")


def gradient_stream(seed: int = 0):
    """Per step, a dict name -> gradient. Each matrix (and each expert block) has its own fixed
    row/column scaling, so the Kronecker factors, and hence the eigenbases, all differ."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (M, N), "b": (M, N), "c": (M, N), "experts": (2, M, N), "lagging": (M, N)}
    scales = {}
    for name, shape in shapes.items():
        rows = torch.rand(shape[:-1] + (1,), generator=g) * 3 + 0.2
        cols = torch.rand(shape[:-2] + (1, N), generator=g) * 3 + 0.2
        scales[name] = (rows, cols, torch.randn(shape, generator=g))
    stream = []
    for t in range(1, STEPS + 1):
        step = {}
        for name, (rows, cols, mean) in scales.items():
            if name == "lagging" and t in SKIPS:
                continue
            step[name] = (0.5 * mean + torch.randn(mean.shape, generator=g)) * rows * cols
        stream.append(step)
    return stream


def initial_weights(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (M, N), "b": (M, N), "c": (M, N), "experts": (2, M, N), "lagging": (M, N)}
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def flat_state(state: dict) -> dict:
    return {k: v.reshape(-1) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def run_bucketed_and_alone(cls, **kw):
    """One optimizer for all five parameters (one stack of 6 blocks) and one optimizer per matrix
    block (the experts tensor split into its two 2-D matrices), stepped on the same gradients."""
    w0 = initial_weights()
    together = {name: torch.nn.Parameter(w.clone()) for name, w in w0.items()}
    opt = cls([{"params": list(together.values()), "param_names": list(together)}], **kw)

    alone = {name: [torch.nn.Parameter(w.clone())] for name, w in w0.items() if name != "experts"}
    alone["experts"] = [torch.nn.Parameter(w0["experts"][i].clone()) for i in range(2)]
    opts = {name: [cls([p], **kw) for p in ps] for name, ps in alone.items()}

    for step in gradient_stream():
        for name, p in together.items():
            p.grad = step[name].clone() if name in step else None
        opt.step()
        for name, ps in alone.items():
            if name not in step:
                continue
            grads = step[name] if name == "experts" else step[name][None]
            for p, o, gr in zip(ps, opts[name], grads):
                p.grad = gr.clone()
                o.step()
    return together, opt, alone, opts


@pytest.mark.parametrize("sides", ["both", "left", "right"])
def test_mousse_bucket_equals_one_optimizer_per_matrix(sides):
    """Three same-shape matrices with different gradient statistics, a 3-D stack of two experts
    (block counts differ within the bucket) and a matrix that skips gradients (its step counter
    lags, so its eigenbasis refreshes at other global steps) share one stack; 13 steps with
    refresh_every=3 cross 4-5 refreshes each. Weights and every state tensor (momentum, factors,
    eigenvalues, eigenvectors, step) must equal those of one Mousse per matrix block."""
    together, opt, alone, opts = run_bucketed_and_alone(Mousse, sides=sides, **MOUSSE)
    n_sides = 2 if sides == "both" else 1

    for name, p in together.items():
        expected = torch.cat([q.detach().reshape(-1) for q in alone[name]])
        moved = (expected - initial_weights()[name].reshape(-1)).norm()
        err = ((p.detach().reshape(-1) - expected).norm() / moved).item()
        assert err < 1e-6, f"{name}: weights differ from the per-matrix run (relative error {err:.2e})"

        got = flat_state(opt.state[p])
        refs = [flat_state(o.state[q]) for o, q in zip(opts[name], alone[name])]
        assert set(got) == set(refs[0]), f"{name}: state keys differ"
        for key, value in got.items():
            if isinstance(value, torch.Tensor):
                ref = torch.cat([r[key] for r in refs])
                scale = ref.abs().max().clamp_min(1e-12)
                err = ((value - ref).abs().max() / scale).item()
                assert err < 1e-6, f"{name}: state {key!r} differs from the per-matrix run ({err:.2e})"
            else:
                assert all(value == r[key] for r in refs), f"{name}: state {key!r}={value!r}"

    # the lagging parameter really lagged, and refreshes were counted per matrix block
    assert opt.state[together["lagging"]]["step"] == STEPS - len(SKIPS)
    refreshes = sum(o.stats()["eigh_refreshes"] for os_ in opts.values() for o in os_)
    assert opt.stats()["eigh_refreshes"] == refreshes
    assert refreshes == n_sides * (5 * 5 + 4)  # t = 1, 4, 7, 10, 13 for 5 blocks; the lagging one 4x


def test_mimuon_bucket_equals_one_optimizer_per_matrix():
    """MiMuon's cached branch is per matrix block: with a threshold that sends some blocks to each
    branch, a shared stack (including a 3-D experts tensor and a lagging matrix, which tests its
    gap at other global steps) gives the same weights and branch fractions as separate optimizers."""
    kw = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, gap_rule="relative",
              gap_threshold=0.03, gap_every=3, sgd_scale="match", sgd_lr_ratio=0.5, ns="keller_jordan",
              ns_steps=5, ns_eps=1e-7, ns_dtype="float32", adjust_lr="original")
    together, opt, alone, opts = run_bucketed_and_alone(MiMuon, **kw)
    for name, p in together.items():
        expected = torch.cat([q.detach().reshape(-1) for q in alone[name]])
        moved = (expected - initial_weights()[name].reshape(-1)).norm()
        err = ((p.detach().reshape(-1) - expected).norm() / moved).item()
        assert err < 1e-6, f"{name}: weights differ from the per-matrix run (relative error {err:.2e})"
    fractions = opt.muon_branch_fraction()
    alone_fractions = {name: sum(next(iter(o.muon_branch_fraction().values())) for o in os_) / len(os_)
                       for name, os_ in opts.items()}
    for name in NAMES:
        assert fractions[name] == pytest.approx(alone_fractions[name], abs=1e-6), name
    values = sorted(alone_fractions.values())
    assert values[0] < 1.0 and values[-1] > 0.0, f"both branches must occur: {alone_fractions}"


def test_cached_eigenbases_are_stacked_once_not_copied_every_step():
    """The eigenbases of a bucket live in one stacked tensor that the parameters' state entries view:
    the same storage on every step (refreshes included) and shared by the bucket's matrices, so no
    per-step concatenation; a state loaded from a state_dict is restacked and gives the same steps."""
    params = [torch.nn.Parameter(torch.randn(6, 9, generator=torch.Generator().manual_seed(i)))
              for i in range(3)]
    opt = Mousse(params, lr=0.02, refresh_every=3)

    def storages():
        return {opt.state[p][key].untyped_storage().data_ptr()
                for p in params for key in ("kron_left_eigvecs", "kron_left_eigvals")}

    def step(seed):
        for i, p in enumerate(params):
            p.grad = torch.randn(6, 9, generator=torch.Generator().manual_seed(100 * seed + i))
        opt.step()

    step(0)
    shared = storages()
    assert len(shared) == 2  # one stack per key for the three matrices
    for seed in range(1, 8):  # refreshes at t = 4 and 7
        step(seed)
        assert storages() == shared, f"step {seed + 1} restacked the cached eigenbases"
    other = Mousse([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.02, refresh_every=3)
    other.load_state_dict(opt.state_dict())
    for seed in range(8, 11):
        for i, (p, q) in enumerate(zip(params, other.param_groups[0]["params"])):
            p.grad = q.grad = torch.randn(6, 9, generator=torch.Generator().manual_seed(100 * seed + i))
        opt.step()
        other.step()
    assert all(torch.equal(p, q) for p, q in zip(params, other.param_groups[0]["params"]))
