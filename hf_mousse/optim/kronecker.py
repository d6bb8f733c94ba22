"""Kronecker-factor preconditioning for Mousse (ALGORITHMS.md §b.3, steps 4-12).

All functions work on stacks: factors (B, d, d), eigenvalues (B, d), matrices (B, m, n), fp32.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
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


def gram(g: torch.Tensor, side: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """G G^T (left, m x m) or G^T G (right, n x n) for a stack G (B, m, n), fp32; the product in
    ``dtype`` (see :func:`matmul`)."""
    return matmul(g, g.mT, dtype) if side == "left" else matmul(g.mT, g, dtype)


def split_side(x: torch.Tensor, side: str, blocks: int) -> torch.Tensor:
    """A stack (B, m, n) cut along ``side``'s dimension into ``blocks`` equal parts, as (B * blocks, ., .):
    left: row blocks (m / blocks, n) (a view); right: column blocks (m, n / blocks). A side's
    block-diagonal factor (``max_factor_dim``) is then the stack of each part's own factor."""
    if blocks == 1:
        return x
    b, m, n = x.shape
    if side == "left":
        return x.reshape(b * blocks, m // blocks, n)
    return x.reshape(b, m, blocks, n // blocks).transpose(1, 2).reshape(b * blocks, m, n // blocks)


def join_side(x: torch.Tensor, side: str, blocks: int) -> torch.Tensor:
    """The inverse of :func:`split_side`: (B * blocks, ., .) parts back into the (B, m, n) stack."""
    if blocks == 1:
        return x
    bb, r, c = x.shape
    b = bb // blocks
    if side == "left":
        return x.reshape(b, blocks * r, c)
    return x.reshape(b, blocks, r, c).transpose(1, 2).reshape(b, r, blocks * c)


def matmul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a @ b for stacks (B, ., .), fp32 out, with the inputs in ``dtype``. bfloat16: tensor-core
    products (inputs rounded to bf16, accumulated and returned in fp32, never rounded to bf16: a
    rounded result would break the factors' positive semi-definiteness by more than the damping eps,
    while G~ G~^T of rounded inputs stays an exact Gram matrix). float32 is the faithful product."""
    if dtype == torch.float32:
        return a.float() @ b.float()
    a, b = a.to(dtype), b.to(dtype)
    if a.device.type == "cuda":
        return torch.bmm(a, b, out_dtype=torch.float32)
    # CPUs without bf16 units run bf16 GEMMs ~60x slower than fp32. The same numbers at fp32 speed:
    # the product of two bf16 values is exact in fp32, so an fp32 GEMM of the rounded inputs is what
    # a tensor core computes (up to summation order).
    return a.float() @ b.float()


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


def _damped(
    factor: torch.Tensor, *, bias_correction: float, eps: float, stats: EighStats, apply: torch.Tensor | None,
    blocks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F / (1 - beta^t) scaled to mean eigenvalue 1, + eps I; a bool per factor "refresh it").

    With ``blocks`` > 1 each run of that many consecutive entries is one block-diagonal factor (a side
    cut by ``max_factor_dim``): the mean eigenvalue, and so the scale and validity, are the whole
    factor's, as for the full factor with its off-diagonal blocks dropped.

    A factor with zero (or non-finite) trace is not refreshed: an all-zero gradient must not produce
    NaN (the official code divides by the trace unguarded); invalid entries become eps I so the
    decomposition never sees NaN (their result is discarded). Non-finite ones are counted
    (``stats.nonfinite_factors``): an overflowed factor stays overflowed, its preconditioner frozen.
    ``apply`` (a 0-d bool tensor), when false, refreshes nothing, without a host read.
    One temporary of the factor's size: the scale is one multiply, eps goes on the diagonal in place.
    """
    d = factor.size(-1) * blocks
    trace = factor.diagonal(dim1=-2, dim2=-1).sum(-1) / bias_correction  # trace of F / (1 - beta^t)
    if blocks > 1:  # each block: its whole factor's trace
        trace = trace.view(-1, blocks).sum(-1).repeat_interleave(blocks)
    finite = torch.isfinite(trace)
    valid = finite & (trace > torch.finfo(factor.dtype).tiny * d)
    if apply is not None:  # a 0-d device flag: false keeps every old basis (a gated, non-finite step)
        valid = valid & apply
    stats.count_nonfinite(finite.logical_not() if apply is None else finite.logical_not() & apply)
    scale = d / (torch.where(valid, trace, torch.ones_like(trace)) * bias_correction)
    f = factor * scale[:, None, None]
    f.masked_fill_(~valid[:, None, None], 0.0)
    f.diagonal(dim1=-2, dim2=-1).add_(eps)
    return f, valid


def refresh_eigenbasis(
    factor: torch.Tensor,
    eigvals: torch.Tensor,
    eigvecs: torch.Tensor,
    *,
    bias_correction: float,
    eps: float,
    stats: EighStats,
    apply: torch.Tensor | None = None,
    run=None,
    blocks: int = 1,
) -> None:
    """Recompute (in place) the eigenbasis of each normalised factor in the stack (``blocks``: see
    :func:`_damped`).

    ``bias_correction`` is 1 - beta**t (1 to disable). Steps: F / (1 - beta^t), scale to mean
    eigenvalue 1, eigh(F + eps I) in fp32 (float64 retry), shift eigenvalues so the smallest is eps
    (and clamp at eps, which only rounding needs). Factors :func:`_damped` finds invalid, and all
    of them when ``apply`` is false, keep their old basis; results are selected into the state in place.

    The damped copy of the factor is taken at once; the decomposition and the writes into
    ``eigvals``/``eigvecs`` are a function handed to ``run`` (default: called now), so that a
    :class:`BackgroundRefresh` can run them beside the next steps.
    """
    f, valid = _damped(factor, bias_correction=bias_correction, eps=eps, stats=stats, apply=apply,
                       blocks=blocks)
    stats.refreshed += f.size(0)

    def finish() -> None:
        ok = valid
        result = _eigh(f, stats)
        if result is None:  # some matrix in the batch failed both ways: retry one by one
            vals, vecs = eigvals.clone(), eigvecs.float()  # (a copy when stored in bf16)
            done = torch.zeros(f.size(0), dtype=torch.bool, device=f.device)
            for i in range(f.size(0)):
                r = _eigh(f[i], stats)
                if r is None:
                    stats.failures += 1
                else:
                    vals[i], vecs[i] = r
                    done[i] = True
            ok = ok & done
        else:
            vals, vecs = result
        vals += torch.clamp(-vals.amin(dim=-1, keepdim=True), min=0.0) + eps
        # The floor must hold in fp32 too: a shift >> eps absorbs eps (1e-7 + 1e-14 == 1e-7 in fp32) and
        # leaves an eigenvalue of 0, whose negative power is inf. Exact arithmetic never clamps here.
        vals.clamp_min_(eps)
        torch.where(ok[:, None], vals, eigvals, out=eigvals)
        # the eigenvectors are stored in their state's dtype (basis_dtype), rounded once here
        torch.where(ok[:, None, None], vecs.to(eigvecs.dtype), eigvecs, out=eigvecs)

    (run or _now)(finish)


def _now(fn) -> None:
    fn()


def newton_iterations(d: int, p: int, eps: float) -> int:
    """Coupled Newton iterations that take every eigenvalue of a damped factor (in [eps, d + eps])
    to fp32 convergence, from that bound alone, so that no iterate is read back to test convergence.

    With M_0 = z A, z = (p + 1) / (2 ||A||_F), the eigenvalues of M_0 lie in [mu_lo, (p + 1) / 2],
    mu_lo = (p + 1) eps / (2 (d + eps)). Each iteration maps every eigenvalue by
    g(mu) = mu ((p + 1 - mu) / p)^p, which rises on (0, 1] and falls on [1, p + 1] towards g's fixed
    point 1, so the two ends of the interval are the slowest to arrive: count theirs (in float64)."""
    def steps(mu: float) -> int:
        n = 0
        while abs(mu - 1) > 2.0**-24:
            mu, n = mu * ((p + 1 - mu) / p) ** p, n + 1
        return n

    return max(steps((p + 1) * eps / (2 * (d + eps))), steps((p + 1) / 2)) + 1


def newton_plan(d: int, alpha: float, eps: float) -> tuple[int, int, int]:
    """(p, iterations, matrix products) of refresh="newton" on a d x d factor damped by eps: p = 1 / alpha;
    the iterated matrix's smallest eigenvalue is 2 eps (see :func:`refresh_root`); each iteration
    takes floor(log2 p) + popcount(p) - 1 products for T^p (:func:`_matrix_power`), then T^p M and X T."""
    p = round(1 / alpha)
    iterations = newton_iterations(d, p, 2 * eps)
    return p, iterations, iterations * (p.bit_length() + p.bit_count())


def _matrix_power(x: torch.Tensor, p: int) -> torch.Tensor:
    """x^p for a stack, by repeated squaring (floor(log2 p) + popcount(p) - 1 products)."""
    result = None
    while True:
        if p & 1:
            result = x if result is None else result @ x
        p >>= 1
        if not p:
            return result
        x = x @ x


def inverse_root_newton(a: torch.Tensor, p: int, iterations: int) -> torch.Tensor:
    """A^(-1/p) for a stack of symmetric positive definite A, by the coupled Newton iteration
    (Guo & Higham 2006, as in Shampoo implementations), matmuls only:

        T_k = ((p + 1) I - M_k) / p,   X_{k+1} = X_k T_k,   M_{k+1} = T_k^p M_k,

    from X_0 = z^(1/p) I, M_0 = z A, so that M_k = X_k^p A -> I and X_k -> A^(-1/p). Every iterate is
    a polynomial in A, so they commute and stay symmetric up to rounding (symmetrised at the end)."""
    z = (p + 1) / (2 * torch.linalg.matrix_norm(a))  # ||A||_F >= the largest eigenvalue
    eye = torch.eye(a.size(-1), dtype=a.dtype, device=a.device)
    m = a * z[:, None, None]
    x = eye * z.pow(1.0 / p)[:, None, None]
    for _ in range(iterations):
        t = (eye * (p + 1) - m) / p
        x = x @ t
        m = _matrix_power(t, p) @ m
    return (x + x.mT) / 2


def refresh_root(
    factor: torch.Tensor,
    root: torch.Tensor,
    *,
    alpha: float,
    bias_correction: float,
    eps: float,
    stats: EighStats,
    apply: torch.Tensor | None = None,
    run=None,
    blocks: int = 1,
) -> None:
    """``refresh="newton"``: recompute (in place) root = (F_n + 2 eps I)^-alpha of each normalised
    factor F_n (as :func:`refresh_eigenbasis` normalises it) by :func:`inverse_root_newton`, with
    alpha = 1/p for an integer p. This is the preconditioner Q diag(lambda)^-alpha Q^T of the eigh
    refresh, whose cleaned eigenvalues are those of F_n + eps I shifted by max(0, -min) + eps: +2 eps
    for a positive semi-definite F_n (the max(0, -min) part is rounding only). ``run`` as in
    :func:`refresh_eigenbasis`."""
    f, valid = _damped(factor, bias_correction=bias_correction, eps=eps, stats=stats, apply=apply,
                       blocks=blocks)
    f.diagonal(dim1=-2, dim2=-1).add_(eps)
    # a block's eigenvalues are bounded by its whole factor's trace (d), not by its own size
    p, iterations, _ = newton_plan(f.size(-1) * blocks, alpha, eps)
    stats.refreshed += f.size(0)

    def finish() -> None:
        new = inverse_root_newton(f, p, iterations)
        torch.where(valid[:, None, None], new.to(root.dtype), root, out=root)

    (run or _now)(finish)


class BackgroundRefresh:
    """Runs refresh computations beside the training step (``refresh_delay`` > 0): one worker thread
    takes them in order; on CUDA each runs on a side stream that first waits for the main stream's
    work up to the submission (the damped factor is ready), so the main stream never waits for a
    refresh unless it asks for the result (:meth:`wait`). The thread is there because ``eigh``
    synchronises the host on CUDA: it blocks the worker, not the step.

    Results never depend on timing: a task writes only into its own target tensors, which the
    optimizer reads only after :meth:`wait`."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._tasks: dict[object, tuple] = {}  # key -> (future, the task's inputs, kept alive until waited)

    def submit(self, key, fn, device: torch.device, keep=()) -> None:
        """Run ``fn()`` in the background as task ``key`` (one task per key at a time)."""
        self.wait(key)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_mousse-refresh")
        if device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()  # on the current (main) stream
            stream = self._streams.setdefault(device, torch.cuda.Stream(device))

            def task():
                with torch.cuda.device(device), torch.cuda.stream(stream):
                    stream.wait_event(ready)
                    fn()
                    done = torch.cuda.Event()
                    done.record(stream)
                return done
        else:
            task = fn
        # ``keep`` and ``fn`` stay referenced here until wait(): a tensor the side stream reads is only
        # freed (and its memory reused by the main stream) after the main stream has waited for it.
        self._tasks[key] = (self._pool.submit(task), device, fn, keep)

    def wait(self, key) -> None:
        """Make task ``key``'s results visible to the current stream (nothing if there is none): a host
        wait until the worker has run it (CPU) or queued it (CUDA), then, on CUDA, a stream wait."""
        entry = self._tasks.pop(key, None)
        if entry is None:
            return
        future, device = entry[0], entry[1]
        done = future.result()  # re-raises what the task raised
        if done is not None:
            torch.cuda.current_stream(device).wait_event(done)

    def wait_all(self) -> None:
        for key in list(self._tasks):
            self.wait(key)

    def pending(self) -> int:
        return len(self._tasks)


def precondition(
    direction: torch.Tensor,
    left: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None,
    right: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None,
    alpha: float,
    orthogonalize,
    graft: bool,
    matmul_dtype: torch.dtype = torch.float32,
    blocks: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """U = Q_L D_L^-a NS(D_L^-a Q_L^T M Q_R D_R^-a) D_R^-a Q_R^T, grafted to ||NS(...)||_F.

    ``direction`` is the stack (B, m, n) being orthogonalised (momentum or Nesterov mix), already
    rounded to the NS dtype by the caller as the authors' code does. ``left``/``right`` are
    (eigvals, eigvecs) stacks, inverse-root stacks (B, d, d) (refresh="newton"), or None for a side
    that is not preconditioned. ``orthogonalize`` maps an
    fp32 stack to its NS output (any dtype). The four rotations are products in ``matmul_dtype``
    (:func:`matmul`). ``blocks`` (left, right): a side's stacks hold that many diagonal blocks per
    matrix (:func:`split_side`), so Q and D are block-diagonal. Returns fp32.

    Rotating, whitening, orthogonalising and mapping back equals L^-a NS(L^-a M R^-a) R^-a for the
    damped factors L = Q_L D_L Q_L^T, R = Q_R D_R Q_R^T, because NS commutes with orthogonal
    rotations: NS(Q X P^T) = Q NS(X) P^T.
    """
    def rotation(side):  # (the matrix the side multiplies by, D^-alpha or None), cast once
        if side is None:
            return None, None
        if isinstance(side, torch.Tensor):  # refresh="newton": the inverse root itself
            return side.to(matmul_dtype), None
        return side[1].to(matmul_dtype), side[0].pow(-alpha)

    (q_l, d_l), (q_r, d_r) = rotation(left), rotation(right)
    nb_l, nb_r = blocks

    def rotate(x, q, side, nb):  # Q x (left) or x Q (right), block by block
        parts = split_side(x, side, nb)
        return join_side(matmul(q, parts, matmul_dtype) if side == "left" else matmul(parts, q, matmul_dtype),
                         side, nb)

    x = direction.float()
    b = x.size(0)
    # D^-alpha per side as row / column multipliers: (B, m, 1) and (B, 1, n), never an (m, n) tensor.
    whiten = []
    if q_l is not None:
        x = rotate(x, q_l if d_l is None else q_l.mT, "left", nb_l)
    if d_l is not None:
        whiten.append(d_l.reshape(b, -1)[:, :, None])
    if q_r is not None:
        x = rotate(x, q_r, "right", nb_r)
    if d_r is not None:
        whiten.append(d_r.reshape(b, -1)[:, None, :])
    for w in whiten:  # in place: x is a fresh product whenever a side has an eigenbasis
        x.mul_(w)
    o = orthogonalize(x).float()
    if graft:
        target = torch.linalg.vector_norm(o, dim=(-2, -1), keepdim=True)
    u = o
    for w in whiten:  # the same negative power again (author blog, official code)
        u = u * w if u is o else u.mul_(w)
    if q_l is not None:
        u = rotate(u, q_l, "left", nb_l)
    if q_r is not None:
        u = rotate(u, q_r if d_r is None else q_r.mT, "right", nb_r)
    if graft:
        norm = torch.linalg.vector_norm(u, dim=(-2, -1), keepdim=True)
        u = u * (target / norm.clamp_min(torch.finfo(u.dtype).tiny))
    return u
