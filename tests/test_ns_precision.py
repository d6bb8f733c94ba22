"""The bf16 Newton–Schulz path (the CUDA default) agrees with the float64 references within a
bf16 tolerance, on CPU, for square, wide and tall matrices over several steps.

Measured on the code this file was written against (10 steps, errors relative to the reference):
bf16 per-step update errors 1.9e-2 - 2.2e-2 (Muon) and 0.8e-2 - 1.2e-2 (Mousse), final-weight
errors 2.9e-3 - 9.7e-3; fp32 stays below 1e-4. Bugs confined to the bf16 path give far more:
Keller Jordan's coefficients in Mousse's bf16 path 0.21-0.22 per step; one NS iteration short
0.19-0.40 per step (Mousse wide/tall: 0.05 final); no Frobenius pre-normalisation NaN.

Skipping the transpose of tall matrices does not change the result in exact arithmetic
(p(X X^T) X = X p(X^T X)), only the cost and the rounding; the orientation test below sees the
rounding: a transposed parameter must get the transposed update (bf16 Muon: 0 measured; without
the transpose in bf16, 2.3e-2).
"""

from __future__ import annotations

import pytest
import reference as ref
import torch

from hf_mousse import Mousse, Muon

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPES = {"square": (16, 16), "wide": (12, 32), "tall": (32, 12)}
STEPS = 10
STEP_TOL = 0.1  # per-step update, relative to the reference's update
FINAL_TOL = 0.025  # final weights, relative to how far the reference moved
BF16_FLOOR = 1e-4  # the bf16 path must differ from fp32 by more than fp32's own error

MUON = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, ns="keller_jordan", ns_steps=5,
            ns_eps=1e-7, adjust_lr="original")
# eps 1e-3: on wide/tall matrices the long-side factor is rank-deficient; see test_reference.py.
MOUSSE = dict(lr=0.02, momentum=0.95, nesterov=False, weight_decay=0.0, alpha=0.125, beta=0.95,
              refresh_every=3, eps=1e-3, bias_correction=True, grafting=True, sides="both", ns="dion",
              ns_steps=5, ns_eps=1e-8, adjust_lr="spectral_norm")
CASES = {
    "muon": (Muon, MUON, lambda w0, grads: ref.muon(
        w0, grads, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0,
        coefficients=ref.KELLER_JORDAN, eps=1e-7, adjust_lr="original")),
    "mousse": (Mousse, MOUSSE, lambda w0, grads: ref.mousse(
        w0, grads, lr=0.02, momentum=0.95, nesterov=False, weight_decay=0.0, alpha=0.125, beta=0.95,
        refresh_every=3, eps=1e-3, bias_correction=True, grafting=True, sides="both",
        coefficients=ref.DION, ns_eps=1e-8, adjust_lr="spectral_norm")),
}


def problem(shape, seed=0):
    """fp32-representable start and anisotropic gradients (factors far from identity)."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, generator=g).double()
    row = torch.logspace(0, 1, shape[0], dtype=torch.float64)[:, None]
    col = torch.logspace(0.5, 0, shape[1], dtype=torch.float64)[None, :]
    grads = [torch.randn(shape, generator=g, dtype=torch.float64) * row * col for _ in range(STEPS)]
    return w0, grads


def errors(cls, kw, expected, w0, grads):
    """(largest per-step update error, final-weight error), both relative to the reference."""
    p = torch.nn.Parameter(w0.float().clone())
    opt = cls([p], **kw)
    worst, prev, prev_ref = 0.0, w0, w0
    for g, e in zip(grads, expected):
        p.grad = g.float()
        opt.step()
        w = p.detach().double().clone()
        worst = max(worst, ((w - prev - (e - prev_ref)).norm() / (e - prev_ref).norm()).item())
        prev, prev_ref = w, e
    return worst, ((prev - expected[-1]).norm() / (expected[-1] - w0).norm()).item()


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", CASES)
def test_bf16_newton_schulz_matches_float64_reference(name, shape):
    """ns_dtype="bfloat16": every step's update within STEP_TOL and the final weights within
    FINAL_TOL of the float64 reference (Mousse crosses eigenbasis refreshes at t = 1, 4, 7, 10),
    and the bf16 path is really taken (its error exceeds the fp32 path's by far)."""
    cls, kw, reference = CASES[name]
    w0, grads = problem(shape)
    expected = reference(w0, grads)
    step_err, final_err = errors(cls, {**kw, "ns_dtype": "bfloat16"}, expected, w0, grads)
    print(f"{name} {shape}: bf16 per-step {step_err:.2e}, final {final_err:.2e}")
    assert step_err < STEP_TOL, f"bf16 {name} {shape}: a step's update is off by {step_err:.3f}"
    assert final_err < FINAL_TOL, f"bf16 {name} {shape}: final weights off by {final_err:.3f}"
    _, fp32_err = errors(cls, {**kw, "ns_dtype": "float32"}, expected, w0, grads)
    assert fp32_err < BF16_FLOOR < final_err, f"fp32 error {fp32_err:.1e}, bf16 error {final_err:.1e}"


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("sides", ["both", "left", "right"])
@pytest.mark.parametrize("refresh", ["eigh", "newton"])
def test_bf16_factor_products_and_rotations_within_the_bf16_bar(shape, sides, refresh):
    """matmul_dtype="bfloat16" (factor EMAs and the four rotations on tensor cores) stays within the
    bar of bf16 Newton–Schulz above, alone and together with bf16 NS (the CUDA setting), and really
    takes the bf16 path (its error exceeds fp32's floor). Measured here: per-step errors 3e-3 - 3.1e-2,
    final-weight errors 1.3e-3 - 6.4e-3 (bf16 NS alone: 1.9e-2 - 2.2e-2 and 2.9e-3 - 9.7e-3). Rounding
    the products' results to bf16 too broke this bar on wide and tall matrices (per-step 0.12 - 0.15
    with eigh; 1.0 with newton, whose root diverged on the no longer semi-definite factors)."""
    _, kw, _ = CASES["mousse"]
    kw = {**kw, "sides": sides, "refresh": refresh}
    w0, grads = problem(shape)
    expected = ref.mousse(w0, grads, lr=0.02, weight_decay=0.0, refresh_every=3, eps=1e-3, sides=sides)
    for ns_dtype in ("float32", "bfloat16"):
        step_err, final_err = errors(Mousse, {**kw, "ns_dtype": ns_dtype, "matmul_dtype": "bfloat16"},
                                     expected, w0, grads)
        print(f"{shape} {sides} {refresh} ns {ns_dtype}: per-step {step_err:.2e}, final {final_err:.2e}")
        assert step_err < STEP_TOL, f"ns {ns_dtype}: a step's update is off by {step_err:.3f}"
        assert final_err < FINAL_TOL, f"ns {ns_dtype}: final weights off by {final_err:.3f}"
        assert BF16_FLOOR < final_err, f"ns {ns_dtype}: error {final_err:.1e}: bf16 products not taken?"


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("refresh", ["eigh", "newton"])
@pytest.mark.parametrize("matmul_dtype", ["float32", "bfloat16"])
def test_bf16_stored_bases_within_the_bf16_bar(shape, refresh, matmul_dtype):
    """basis_dtype="bfloat16" (eigenvectors or inverse roots kept in bf16: half their memory) stays
    within the bf16 Newton–Schulz bar, alone and with bf16 products, keeps those entries in bf16 (and
    the factors and eigenvalues in fp32), and really rounds them (error above fp32's floor)."""
    _, kw, _ = CASES["mousse"]
    kw = {**kw, "refresh": refresh, "basis_dtype": "bfloat16", "matmul_dtype": matmul_dtype,
          "ns_dtype": "float32"}
    w0, grads = problem(shape)
    expected = ref.mousse(w0, grads, lr=0.02, weight_decay=0.0, refresh_every=3, eps=1e-3)
    step_err, final_err = errors(Mousse, kw, expected, w0, grads)
    print(f"{shape} {refresh} matmul {matmul_dtype}: per-step {step_err:.2e}, final {final_err:.2e}")
    assert step_err < STEP_TOL and final_err < FINAL_TOL, (step_err, final_err)
    assert BF16_FLOOR < final_err
    p = torch.nn.Parameter(w0.float())
    opt = Mousse([p], **kw)
    p.grad = grads[0].float()
    opt.step()
    dtypes = {k: v.dtype for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    stored = [k for k in dtypes if k.endswith(("_eigvecs", "_root"))]
    assert len(stored) == 2 and all(dtypes[k] == torch.bfloat16 for k in stored), dtypes
    assert all(dtypes[k] == torch.float32 for k in dtypes if k not in stored), dtypes


# (optimizer, ns_dtype, tolerance). Muon's two orientations see bitwise-equal NS inputs, so only
# the matmuls' accumulation order can differ (measured here: 0 in bf16, 4e-6 in fp32). Mousse in
# bf16 is left out: its fp32 factors and eigenbases differ between orientations by fp32 rounding,
# which bf16 rounding of the NS input then amplifies to up to 6e-4 (seed-dependent), too close
# to the 8e-3 of the bug this test is for. The NS routine is shared, so Muon covers it.
ORIENTATION = [("muon", "float32", 1e-4), ("muon", "bfloat16", 2e-3), ("mousse", "float32", 1e-4)]


@pytest.mark.parametrize("name, ns_dtype, tol", ORIENTATION)
def test_transposed_parameter_gets_transposed_update(name, ns_dtype, tol):
    """A tall matrix W and a wide parameter holding W^T, fed G and G^T, stay transposes of each other
    over 10 steps (for Mousse, left and right factors swap roles): Newton–Schulz iterates on the
    wide orientation, in bf16 as in fp32. LR scaling is off (adjust_lr=None) since it depends on
    the orientation by design."""
    cls, kw, _ = CASES[name]
    w0, grads = problem((32, 12), seed=1)
    tall = torch.nn.Parameter(w0.float())
    wide = torch.nn.Parameter(w0.float().T.contiguous())
    opt = cls([tall, wide], **{**kw, "adjust_lr": None, "ns_dtype": ns_dtype})
    worst = 0.0
    for g in grads:
        tall.grad, wide.grad = g.float(), g.float().T.contiguous()
        opt.step()
        moved = (tall.detach().double() - w0).norm()
        worst = max(worst, ((tall.detach() - wide.detach().T).double().norm() / moved).item())
    assert worst < tol, f"{name} {ns_dtype}: W^T's update differs by {worst:.2e} from W's"
