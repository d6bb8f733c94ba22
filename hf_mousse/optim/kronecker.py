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
    # Refreshes of a factor holding inf/NaN (an overflowed EMA, or a non-finite gradient under
    # nonfinite="ignore"): the old eigenbasis was kept. Counted on the device; settle() reads it.
    nonfinite_factors: int = 0
    pending: torch.Tensor | None = None

    def count_nonfinite(self, mask: torch.Tensor) -> None:
        n = mask.sum()
        self.pending = n if self.pending is None else self.pending + n.to(self.pending.device)

    def settle(self) -> None:
        """Add the device count to ``nonfinite_factors`` (one device read, if a refresh ran since)."""
        if self.pending is not None:
            self.nonfinite_factors += int(self.pending)
            self.pending = None


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
    apply: torch.Tensor | None = None,
) -> None:
    """Recompute (in place) the eigenbasis of each normalised factor in the stack.

    ``bias_correction`` is 1 - beta**t (1 to disable). Steps: F / (1 - beta^t), scale to mean
    eigenvalue 1, eigh(F + eps I) in fp32 (float64 retry), shift eigenvalues so the smallest is eps
    (and clamp at eps, which only rounding needs).
    A factor with zero (or non-finite) trace keeps its old basis: an all-zero gradient must not
    produce NaN (the official code divides by the trace unguarded). Non-finite ones are counted
    (``stats.nonfinite_factors``): an overflowed factor stays overflowed, its basis frozen.

    One temporary of the factor's size (the damped, normalised copy) besides eigh's own: the scale
    is applied in one multiply and eps on the diagonal in place; results are selected into the
    state in place. ``apply`` (a 0-d bool tensor), when false, keeps every old basis without a host read.
    """
    d = factor.size(-1)
    trace = factor.diagonal(dim1=-2, dim2=-1).sum(-1) / bias_correction  # trace of F / (1 - beta^t)
    finite = torch.isfinite(trace)
    valid = finite & (trace > torch.finfo(factor.dtype).tiny * d)
    if apply is not None:  # a 0-d device flag: false keeps every old basis (a gated, non-finite step)
        valid = valid & apply
    stats.count_nonfinite(finite.logical_not() if apply is None else finite.logical_not() & apply)
    # F / (1 - beta^t) * d / trace, as one scale; invalid entries become eps I so eigh never sees NaN
    # (their result is discarded below).
    scale = d / (torch.where(valid, trace, torch.ones_like(trace)) * bias_correction)
    f = factor * scale[:, None, None]
    f.masked_fill_(~valid[:, None, None], 0.0)
    f.diagonal(dim1=-2, dim2=-1).add_(eps)
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
    vals += torch.clamp(-vals.amin(dim=-1, keepdim=True), min=0.0) + eps
    # The floor must hold in fp32 too: a shift >> eps absorbs eps (1e-7 + 1e-14 == 1e-7 in fp32) and
    # leaves an eigenvalue of 0, whose negative power is inf. Exact arithmetic never clamps here.
    vals.clamp_min_(eps)
    torch.where(valid[:, None], vals, eigvals, out=eigvals)
    torch.where(valid[:, None, None], vecs, eigvecs, out=eigvecs)
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
