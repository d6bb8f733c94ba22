"""Kronecker-factor preconditioning for Mousse (ALGORITHMS.md §b.3, steps 4-12).

All functions work on stacks: factors (B, d, d), eigenvalues (B, d), matrices (B, m, n), fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EighStats:
    refreshed: int = 0  # matrices whose eigenbasis was recomputed
    fp64_retries: int = 0  # fp32 eigh failed and float64 succeeded
    failures: int = 0  # both failed: the old eigenbasis was kept


def gram(g: torch.Tensor, side: str) -> torch.Tensor:
    """G G^T (left, m x m) or G^T G (right, n x n) for a stack G (B, m, n)."""
    return g @ g.mT if side == "left" else g.mT @ g


def _eigh(f: torch.Tensor, stats: EighStats) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        return torch.linalg.eigh(f)
    except RuntimeError:  # torch.linalg.LinAlgError: ill-conditioned input, no convergence
        pass
    try:
        vals, vecs = torch.linalg.eigh(f.double())
        stats.fp64_retries += 1
        return vals.float(), vecs.float()
    except RuntimeError:
        return None


def refresh_eigenbasis(
    factor: torch.Tensor,
    eigvals: torch.Tensor,
    eigvecs: torch.Tensor,
    *,
    bias_correction: float,
    eps: float,
    stats: EighStats,
) -> None:
    """Recompute (in place) the eigenbasis of each normalised factor in the stack.

    ``bias_correction`` is 1 - beta**t (1 to disable). Steps: F / (1 - beta^t), scale to mean
    eigenvalue 1, eigh(F + eps I) in fp32 (float64 retry), shift eigenvalues so the smallest is eps.
    A factor with zero (or non-finite) trace keeps its old basis: an all-zero gradient must not
    produce NaN (the official code divides by the trace unguarded).
    """
    d = factor.size(-1)
    eye = torch.eye(d, device=factor.device, dtype=factor.dtype)
    f = factor / bias_correction
    trace = f.diagonal(dim1=-2, dim2=-1).sum(-1)
    valid = torch.isfinite(trace) & (trace > torch.finfo(f.dtype).tiny * d)
    safe_trace = torch.where(valid, trace, torch.ones_like(trace))
    f = f * (d / safe_trace)[:, None, None]
    # Invalid entries become eps*I here so that eigh never sees NaN; their result is discarded below.
    f = torch.where(valid[:, None, None], f, torch.zeros_like(f)) + eps * eye
    result = _eigh(f, stats)
    if result is None:  # some matrix in the batch failed both ways: retry one by one
        vals, vecs = eigvals.clone(), eigvecs.clone()
        ok = torch.zeros(f.size(0), dtype=torch.bool, device=f.device)
        for i in range(f.size(0)):
            r = _eigh(f[i], stats)
            if r is None:
                stats.failures += 1
            else:
                vals[i], vecs[i] = r
                ok[i] = True
        valid = valid & ok
    else:
        vals, vecs = result
    shift = torch.clamp(-vals.amin(dim=-1, keepdim=True), min=0.0) + eps
    vals = vals + shift
    eigvals.copy_(torch.where(valid[:, None], vals, eigvals))
    eigvecs.copy_(torch.where(valid[:, None, None], vecs, eigvecs))
    stats.refreshed += f.size(0)


def precondition(
    direction: torch.Tensor,
    left: tuple[torch.Tensor, torch.Tensor] | None,
    right: tuple[torch.Tensor, torch.Tensor] | None,
    alpha: float,
    orthogonalize,
    graft: bool,
) -> torch.Tensor:
    """U = Q_L D_L^-a NS(D_L^-a Q_L^T M Q_R D_R^-a) D_R^-a Q_R^T, grafted to ||NS(...)||_F.

    ``direction`` is the stack (B, m, n) being orthogonalised (momentum or Nesterov mix), already
    rounded to the NS dtype by the caller as the authors' code does. ``left``/``right`` are
    (eigvals, eigvecs) stacks or None for a side that is not preconditioned. ``orthogonalize`` maps an
    fp32 stack to its NS output (any dtype). Returns fp32.

    Rotating, whitening, orthogonalising and mapping back equals L^-a NS(L^-a M R^-a) R^-a for the
    damped factors L = Q_L D_L Q_L^T, R = Q_R D_R Q_R^T, because NS commutes with orthogonal
    rotations: NS(Q X P^T) = Q NS(X) P^T.
    """
    x = direction.float()
    scale = torch.ones((), device=x.device)
    if left is not None:
        x = left[1].mT @ x
        scale = scale * left[0].pow(alpha)[:, :, None]
    if right is not None:
        x = x @ right[1]
        scale = scale * right[0].pow(alpha)[:, None, :]
    o = orthogonalize(x / scale).float()
    u = o / scale  # the same negative power again (author blog, official code)
    if left is not None:
        u = left[1] @ u
    if right is not None:
        u = u @ right[1].mT
    if graft:
        target = torch.linalg.vector_norm(o, dim=(-2, -1), keepdim=True)
        norm = torch.linalg.vector_norm(u, dim=(-2, -1), keepdim=True)
        u = u * (target / norm.clamp_min(torch.finfo(u.dtype).tiny))
    return u
