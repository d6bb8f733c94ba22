"""Plain float64 reference implementations, written from ALGORITHMS.md, one matrix at a time.

Deliberately naive: no batching, no layouts, no in-place tricks. The fast optimizers are
compared against these.
"""

from __future__ import annotations

import math

import torch

DION = [
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
]
KELLER_JORDAN = [(3.4445, -4.7750, 2.0315)] * 5


def ns(x: torch.Tensor, coefficients, eps: float) -> torch.Tensor:
    """§a.2: transpose if tall, divide by (Frobenius norm + eps), iterate a X + (b A + c A^2) X."""
    x = x.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)
    for a, b, c in coefficients:
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def lr_ratio(adjust_lr, m, n):
    return {
        "original": math.sqrt(max(1, m / n)),
        "match_rms_adamw": 0.2 * math.sqrt(max(m, n)),
        "spectral_norm": math.sqrt(m / n),
        None: 1.0,
    }[adjust_lr]


def muon(w0, grads, *, lr, momentum=0.95, nesterov=True, weight_decay=0.0, coefficients=KELLER_JORDAN,
         eps=1e-7, adjust_lr="original"):
    """torch.optim.Muon's recursion (EMA momentum), float64. Returns the weight after each step."""
    w = w0.double().clone()
    b = torch.zeros_like(w)
    out = []
    m, n = w.shape
    for g in grads:
        g = g.double()
        b = momentum * b + (1 - momentum) * g
        u = (1 - momentum) * g + momentum * b if nesterov else b
        o = ns(u, coefficients, eps)
        w = w * (1 - lr * weight_decay) - lr * lr_ratio(adjust_lr, m, n) * o
        out.append(w.clone())
    return out


def _refresh(f, t, beta, eps, bias_correction):
    d = f.shape[0]
    fh = f / (1 - beta**t) if bias_correction else f
    fb = fh * d / torch.trace(fh)
    lam, q = torch.linalg.eigh(fb + eps * torch.eye(d, dtype=f.dtype))
    lam = lam + max(0.0, -lam.min().item()) + eps
    return lam, q


def _block_diagonal(f, blocks):
    b = f.size(0) // blocks
    mask = torch.block_diag(*[torch.ones(b, b, dtype=f.dtype)] * blocks)
    return f * mask


def mousse(w0, grads, *, lr=0.01, momentum=0.95, nesterov=False, weight_decay=0.01, alpha=0.125, beta=0.95,
           refresh_every=10, eps=1e-5, bias_correction=True, grafting=True, sides="both",
           coefficients=DION, ns_eps=1e-8, adjust_lr="spectral_norm", refresh_phase=0, refresh_delay=0,
           blocks=(1, 1)):
    """§b.4 pseudocode, float64, bf16 casts omitted. Returns the weight after each step.
    ``refresh_phase`` p != 0 (hf_mousse's staggered schedule) refreshes at t = 1 and t = 1 + p + jT.
    ``refresh_delay`` d: a refresh computed at step t > 1 (from the factors as of step t) is used from
    step t + d on; the one at t = 1 at once. ``blocks`` (left, right): each factor keeps only that many
    equal diagonal blocks (``max_factor_dim``): the full factor with its off-diagonal blocks zeroed."""
    w = w0.double().clone()
    m, n = w.shape
    M = torch.zeros_like(w)
    L, R = torch.zeros(m, m, dtype=w.dtype), torch.zeros(n, n, dtype=w.dtype)
    use_left, use_right = sides in ("both", "left"), sides in ("both", "right")
    lam_l = q_l = lam_r = q_r = None
    landing = {}  # step -> the bases computed refresh_delay steps earlier
    out = []
    for t, g in enumerate(grads, start=1):
        g = g.double()
        M = momentum * M + g
        u = g + momentum * M if nesterov else M
        if use_left:
            L = beta * L + (1 - beta) * _block_diagonal(g @ g.T, blocks[0])
        if use_right:
            R = beta * R + (1 - beta) * _block_diagonal(g.T @ g, blocks[1])
        if t == 1 or (t - 1 - refresh_phase) % refresh_every == 0:
            left = _refresh(L, t, beta, eps, bias_correction) if use_left else (None, None)
            right = _refresh(R, t, beta, eps, bias_correction) if use_right else (None, None)
            landing[t if t == 1 else t + refresh_delay] = (*left, *right)
        if t in landing:
            lam_l, q_l, lam_r, q_r = landing.pop(t)
        x = u
        if use_left:
            x = (q_l.T @ x) / lam_l.pow(alpha)[:, None]
        if use_right:
            x = (x @ q_r) / lam_r.pow(alpha)[None, :]
        o = ns(x, coefficients, ns_eps)
        gamma = o.norm()
        y = o
        if use_left:
            y = q_l @ (y / lam_l.pow(alpha)[:, None])
        if use_right:
            y = (y / lam_r.pow(alpha)[None, :]) @ q_r.T
        if grafting:
            y = y * gamma / y.norm()
        w = w * (1 - lr * weight_decay) - lr * lr_ratio(adjust_lr, m, n) * y
        out.append(w.clone())
    return out


def gap_statistic(d: torch.Tensor, rule: str = "scaled") -> float:
    """The MiMuon gap statistic of hf_mousse, from an SVD: singular values kept where
    sigma_i^2 > sigma_1^2 * r * eps_fp32; min adjacent gap over sigma_1 ("relative"), times the
    number of kept values minus one ("scaled"); inf if fewer than two are kept."""
    s = torch.linalg.svdvals(d.double())
    r = min(d.shape)
    kept = s[s**2 > s[0] ** 2 * r * torch.finfo(torch.float32).eps]
    if len(kept) < 2:
        return math.inf
    relative = ((kept[:-1] - kept[1:]) / kept[0]).min().item()
    return relative if rule == "relative" else relative * (len(kept) - 1)


def mimuon(w0, grads, *, lr, momentum=0.95, nesterov=True, weight_decay=0.0, gap_rule="scaled",
           gap_threshold=1e-3, gap_every=10, sgd_scale="paper", sgd_lr_ratio=1.0, coefficients=KELLER_JORDAN,
           eps=1e-7, adjust_lr="original"):
    """hf_mousse's MiMuon realisation (README), float64. Returns (weights, branch per step)."""
    w = w0.double().clone()
    m, n = w.shape
    b = torch.zeros_like(w)
    out, branches = [], []
    use_muon = True
    for t, g in enumerate(grads, start=1):
        g = g.double()
        b = momentum * b + (1 - momentum) * g
        d = (1 - momentum) * g + momentum * b if nesterov else b
        if gap_every == 1 or t % gap_every == 1:
            use_muon = gap_statistic(d, gap_rule) >= gap_threshold
        if use_muon:
            u = lr_ratio(adjust_lr, m, n) * ns(d, coefficients, eps)
        else:
            u = sgd_lr_ratio * d
            if sgd_scale == "match":
                u = u * math.sqrt(min(m, n)) / d.norm()
        w = w * (1 - lr * weight_decay) - lr * u
        out.append(w.clone())
        branches.append(use_muon)
    return out, branches
