"""Batched Newton–Schulz orthogonalisation (ALGORITHMS.md §a.2).

Every function takes a stack of matrices ``X`` of shape (batch, m, n) and returns a stack of the
same shape. Tall matrices are transposed so that the Gram matrix is always built on the short side.
"""

from __future__ import annotations

import math

import torch

# Name -> per-iteration (a, b, c) schedule. A schedule shorter than the requested step count repeats
# its last triple (the Polar Express convention); Keller Jordan's set is a single repeated triple.
NS_COEFFICIENTS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "keller_jordan": ((3.4445, -4.7750, 2.0315),),
    "dion": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ),
    "polar_express": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
    "cubic": ((2.0, -1.5, 0.5),),
}
# Default number of iterations per named set.
NS_DEFAULT_STEPS = {"keller_jordan": 5, "dion": 5, "polar_express": 5, "cubic": 12}
# Polar Express pre-scales by a safety factor so that bf16 rounding cannot push sigma_max above 1.
_NORM_SAFETY = {"polar_express": 1.02}


def resolve_schedule(ns, ns_steps: int | None) -> list[tuple[float, float, float]]:
    """Return the list of (a, b, c) triples, one per iteration, for a named or explicit set."""
    if isinstance(ns, str):
        if ns not in NS_COEFFICIENTS:
            raise ValueError(
                f"unknown Newton-Schulz coefficient set ns={ns!r}; "
                f"choose one of {sorted(NS_COEFFICIENTS)} or pass a sequence of (a, b, c) triples"
            )
        base = list(NS_COEFFICIENTS[ns])
        steps = NS_DEFAULT_STEPS[ns] if ns_steps is None else ns_steps
    else:
        try:
            base = [tuple(float(v) for v in t) for t in ns]
        except (TypeError, ValueError):
            base = []
        if not base or any(len(t) != 3 or not all(math.isfinite(v) for v in t) for t in base):
            raise ValueError(f"ns must be a name or a non-empty sequence of (a, b, c) triples of finite "
                             f"numbers, got {ns!r}")
        steps = len(base) if ns_steps is None else ns_steps
    if steps < 1:
        raise ValueError(f"ns_steps must be >= 1, got {steps}")
    return [base[min(i, len(base) - 1)] for i in range(steps)]


def newton_schulz(
    x: torch.Tensor,
    schedule: list[tuple[float, float, float]],
    eps: float,
    dtype: torch.dtype,
    norm_safety: float = 1.0,
) -> torch.Tensor:
    """Approximate the orthogonal polar factor of each matrix in ``x`` (batch, m, n).

    Runs in ``dtype`` (bf16 on CUDA for speed, fp32 on CPU) and returns a tensor of that dtype.
    """
    tall = x.size(-2) > x.size(-1)
    y = x.to(dtype)
    if tall:
        y = y.mT
    norm = torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True)
    y = y / (norm * norm_safety + eps)
    for a, b, c in schedule:
        gram = y @ y.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        y = torch.baddbmm(y, poly, y, beta=a, alpha=1.0)
    return y.mT if tall else y


def norm_safety_for(ns) -> float:
    return _NORM_SAFETY.get(ns, 1.0) if isinstance(ns, str) else 1.0
