"""Mousse: Muon in the eigenbasis of Kronecker factors of the gradient covariance
(arXiv 2603.09697; ALGORITHMS.md §b). The algorithm's defaults (alpha, beta, T, eps, momentum,
Dion coefficients, spectral_norm scaling, weight decay) are the authors'; the learning rate (0.01,
their class default; their runs used 0.06) and the scalar path (AdamW; theirs: Lion) are not."""

from __future__ import annotations

import math

import torch

from . import state_keys as keys
from .base import SpectralOptimizer, is_due, lr_ratio
from .bucket import Bucket
from .checks import MIN_FLOOR, _check, _is_int, _is_real
from .hyperparameters import args_doc
from .kronecker import (
    BackgroundRefresh,
    gram,
    newton_plan,
    precondition,
    refresh_eigenbasis,
    refresh_root,
    split_side,
)
from .roles import matrix_dims

SIDES = ("both", "left", "right", "small")
REFRESH_SCHEDULES = ("together", "staggered")
REFRESH_METHODS = ("eigh", "newton")
MATMUL_DTYPES = ("float32", "bfloat16")
BASIS_DTYPES = ("float32", "bfloat16")
_SIDES = {"both": ("left", "right"), "left": ("left",), "right": ("right",)}


def whitened_sides(sides: str, m: int, n: int) -> tuple[str, ...]:
    """The sides of an m x n (fan-out x fan-in) block that ``sides`` whitens: "small" is the smaller
    factor's side (left when m <= n), the one that is cheap to store and to refresh."""
    if sides == "small":
        return ("left",) if m <= n else ("right",)
    return _SIDES[sides]


def side_blocks(d: int, max_factor_dim: int) -> int:
    """Into how many equal diagonal blocks a side of size d is cut so that each is at most
    ``max_factor_dim`` (0: no limit): the fewest that divide d (equal blocks keep one batched stack)."""
    if not max_factor_dim or d <= max_factor_dim:
        return 1
    blocks = -(-d // max_factor_dim)
    while d % blocks:
        blocks += 1
    return blocks


_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAX_AMPLIFICATION = 1e12  # largest eps^(-2 alpha) accepted (see _validate_algorithm)


class Mousse(SpectralOptimizer):
    momentum_form = "heavy_ball"
    # factors per side; staggered refresh phases; eigenbases or inverse roots
    # (+ refresh_delay: whether the state holds the pending refresh results)
    state_keys_of_group = (*SpectralOptimizer.state_keys_of_group, "sides", "refresh_schedule", "refresh",
                           "refresh_delay", "basis_dtype", "max_factor_dim")
    # checkpoints from before these options all used eigh, no delay, fp32 matmuls, whole factors
    keys_added_later = {"refresh": "eigh", "refresh_delay": 0, "matmul_dtype": "float32",
                        "basis_dtype": "float32", "max_factor_dim": 0}

    def __init__(
        self,
        params,
        lr: float = 0.01,
        momentum: float = 0.95,
        nesterov: bool = False,
        weight_decay: float = 0.01,
        *,
        alpha: float = 0.125,
        beta: float = 0.95,
        refresh_every: int = 10,
        refresh_schedule: str = "together",
        refresh: str = "eigh",
        refresh_delay: int = 0,
        matmul_dtype: str = "float32",
        basis_dtype: str = "float32",
        eps: float = 1e-5,
        bias_correction: bool = True,
        grafting: bool = True,
        sides: str = "both",
        max_factor_dim: int = 0,
        ns="dion",
        ns_steps: int | None = 5,
        ns_eps: float = 1e-8,
        adjust_lr: str | None = "spectral_norm",
        **shared,
    ):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, alpha=alpha,
                        beta=beta, refresh_every=refresh_every, refresh_schedule=refresh_schedule,
                        refresh=refresh, refresh_delay=refresh_delay, matmul_dtype=matmul_dtype,
                        basis_dtype=basis_dtype, eps=eps, bias_correction=bias_correction,
                        grafting=grafting, sides=sides, max_factor_dim=max_factor_dim, ns=ns,
                        ns_steps=ns_steps, ns_eps=ns_eps, adjust_lr=adjust_lr)
        self._pending_phases: dict[torch.Tensor, int] = {}  # staggered phases dealt, not yet in state
        self._background = BackgroundRefresh()  # refreshes running beside the step (refresh_delay > 0)
        super().__init__(params, defaults, **shared)

    def add_param_group(self, param_group: dict) -> None:
        # A low-rank factor (PEFT LoRA, marked by param_groups) is whitened on its rank side only,
        # unless the group says otherwise: its other side is as large as in full fine-tuning
        # while a rank-r gradient fills little of that factor.
        if "low_rank_side" in param_group:
            param_group = {"sides": param_group["low_rank_side"], **param_group}
        super().add_param_group(param_group)

    def _validate_algorithm(self, g: dict) -> None:
        a, eps = g["alpha"], g["eps"]
        _check(_is_real(a) and 0 <= a <= 1, "alpha", a, "a float in [0, 1] (0 gives Muon; default 0.125)")
        _check(_is_real(g["beta"]) and 0 <= g["beta"] < 1, "beta", g["beta"], "a float in [0, 1)")
        t = g["refresh_every"]
        _check(_is_int(t) and t >= 1, "refresh_every", t, "an int >= 1")
        _check(g["refresh_schedule"] in REFRESH_SCHEDULES, "refresh_schedule", g["refresh_schedule"],
               f"one of {REFRESH_SCHEDULES}")
        _check(g["refresh"] in REFRESH_METHODS, "refresh", g["refresh"], f"one of {REFRESH_METHODS}")
        d = g["refresh_delay"]
        _check(_is_int(d) and 0 <= d < (t if _is_int(t) else 1), "refresh_delay", d,
               f"an int in [0, refresh_every - 1] = [0, {t - 1}]: a refresh must be installed before the "
               "next one is computed (raise refresh_every, or lower refresh_delay)")
        _check(g["matmul_dtype"] in MATMUL_DTYPES, "matmul_dtype", g["matmul_dtype"],
               f"one of {MATMUL_DTYPES}")
        _check(g["basis_dtype"] in BASIS_DTYPES, "basis_dtype", g["basis_dtype"], f"one of {BASIS_DTYPES}")
        if g["refresh"] == "newton":
            # The coupled Newton iteration computes A^(-1/p) for an integer p.
            p = 1 / a if _is_real(a) and a > 0 else math.inf
            _check(math.isfinite(p) and abs(p - round(p)) < 1e-9, "alpha", a,
                   "1/p for an integer p >= 1 with refresh='newton' (e.g. 0.125, 0.25, 0.5, 1); use "
                   "refresh='eigh' for other exponents")
        _check(_is_real(eps) and eps >= MIN_FLOOR, "eps", eps, f"a finite float >= {MIN_FLOOR:.3g} "
               "(float32's smallest normal number: the eigenvalue floor must hold in the fp32 factors)")
        # Whitening and unwhitening divide by eigenvalues >= eps raised to alpha, per side: a direction
        # grows by up to eps^(-2 alpha), and the update's squared norm (m n such entries) must stay far
        # below float32's 3.4e38.
        _check(eps ** (-2 * a) <= MAX_AMPLIFICATION, "eps", eps,
               f"eps^(-2 alpha) <= {MAX_AMPLIFICATION:.0e} with alpha={a!r} (here {eps ** (-2 * a):.1e}: "
               "whitening would amplify a direction beyond what float32 norms hold); raise eps or lower "
               "alpha")
        _check(isinstance(g["bias_correction"], bool), "bias_correction", g["bias_correction"], "a bool")
        _check(isinstance(g["grafting"], bool), "grafting", g["grafting"], "a bool")
        _check(g["sides"] in SIDES, "sides", g["sides"], f"one of {SIDES}")
        b = g["max_factor_dim"]
        _check(_is_int(b) and b >= 0, "max_factor_dim", b,
               "an int >= 0 (0: whole factors; else a longer side is cut into equal diagonal blocks of at "
               "most that size)")

    def _init_matrix_state(self, state: dict, p: torch.Tensor, group: dict) -> None:
        k, m, n = matrix_dims(p.shape, group["layout"], group["split"])
        basis = _DTYPE[group["basis_dtype"]]  # eigenvectors or roots; factors and eigenvalues stay fp32
        for side in whitened_sides(group["sides"], m, n):
            d = m if side == "left" else n
            kb = k * side_blocks(d, group["max_factor_dim"])  # diagonal blocks of size d / blocks
            d //= kb // k
            state[keys.kron(side)] = torch.zeros((kb, d, d), device=p.device)
            eye = torch.eye(d, dtype=basis, device=p.device).expand(kb, d, d).clone()
            if group["refresh"] == "newton":  # the identity until the refresh at step 1
                state[keys.kron_root(side)] = eye
                continue
            # The official code starts from eigenvalues 0; 1 only differs if the first refresh
            # sees a zero gradient, where 0 ** -alpha would be inf.
            state[keys.kron_eigvals(side)] = torch.ones((kb, d), device=p.device)
            state[keys.kron_eigvecs(side)] = eye
        if group["refresh_delay"]:
            for side in whitened_sides(group["sides"], m, n):
                for key in self._basis_keys(group, side):
                    state[keys.pending(key)] = state[key].clone()

    def _matrix_state(self, group: dict, p: torch.Tensor) -> dict:
        new = not self.state.get(p)
        st = super()._matrix_state(group, p)
        if new and group["refresh_schedule"] == "staggered":
            st[keys.REFRESH_PHASE] = self._refresh_phase(p, group["refresh_every"])
        return st

    def _counters(self, group: dict) -> dict[str, int | None]:
        counters = super()._counters(group)
        if group["role"] == "matrix" and group["refresh_schedule"] == "staggered":
            counters[keys.REFRESH_PHASE] = group["refresh_every"]  # a phase in [0, T)
        return counters

    def _bucket_update(self, bucket: Bucket):
        group = bucket.group
        g = bucket.stack(bucket.grads)  # raw gradient, fp32, logical layout
        _, m, n = bucket.x.shape
        eig = {side: self._update_side(bucket, g, side) for side in whitened_sides(group["sides"], m, n)}
        update = precondition(
            bucket.x, eig.get("left"), eig.get("right"), group["alpha"],
            lambda y: self.orthogonalize(group, y), group["grafting"], _DTYPE[group["matmul_dtype"]],
            (side_blocks(m, group["max_factor_dim"]), side_blocks(n, group["max_factor_dim"])),
        )
        return update.to(bucket.x.dtype), lr_ratio(group["adjust_lr"], m, n)

    @staticmethod
    def _basis_keys(group: dict, side: str) -> tuple[str, ...]:
        """The state entries one side's refresh writes: its inverse root, or eigenvalues and eigenvectors."""
        if group["refresh"] == "newton":
            return (keys.kron_root(side),)
        return keys.kron_eigvals(side), keys.kron_eigvecs(side)

    def _update_side(self, bucket: Bucket, g: torch.Tensor, side: str):
        """EMA of one side's factors from the gradient stack ``g``; refresh the eigenbases (or inverse
        roots) that are due. Returns the bucket's (eigenvalues, eigenvectors) stacks, or its inverse
        roots' stack, for preconditioning.

        With ``refresh_delay`` d > 0 a refresh due at step t > 1 is computed from the factor as of step
        t into the pending entries, in the background, and installed at the start of step t + d's
        preconditioning: the same run whenever it finishes. The refresh at t = 1 is installed at once
        (there is no earlier basis to keep using)."""
        group = bucket.group
        factors = [s[keys.kron(side)] for s in bucket.states]
        blocks = side_blocks(g.size(1 if side == "left" else 2), group["max_factor_dim"])
        gg = gram(split_side(g, side, blocks), side, _DTYPE[group["matmul_dtype"]])
        news = [gg[o * blocks : (o + k) * blocks] for o, k in zip(bucket.offsets, bucket.counts)]
        self._gate.lerp_(factors, news, 1 - group["beta"])
        delay, basis = group["refresh_delay"], self._basis_keys(group, side)
        for p, factor, st in zip(bucket.params, factors, bucket.states):
            task = (id(p), side)
            if self._refresh_due(st, group):
                # Step counters are per parameter (one that skipped a gradient lags behind), and so is
                # the bias correction 1 - beta^t: each parameter refreshes on its own schedule.
                targets = [st[keys.pending(k) if delay else k] for k in basis]
                background = delay and st[keys.STEP] > 1
                common = dict(
                    bias_correction=(1 - group["beta"] ** st[keys.STEP]) if group["bias_correction"] else 1.0,
                    eps=group["eps"], stats=self.eigh_stats, blocks=blocks,
                    # on a non-finite step the old basis is kept (no copy: the result is selected in place)
                    apply=self._gate.flags(factor.device)[0] if self._gate.active else None,
                    run=(lambda fn, task=task, dev=factor.device: self._background.submit(task, fn, dev))
                    if background else None,
                )
                if group["refresh"] == "newton":
                    refresh_root(factor, *targets, alpha=group["alpha"], **common)
                else:
                    refresh_eigenbasis(factor, *targets, **common)
                if background:
                    continue
            elif not (delay and self._refresh_lands(st, group)):
                continue
            if delay:  # install the pending result (a gated copy: none on a non-finite step)
                self._background.wait(task)
                for k in basis:
                    self._gate.copy_(st[k], st[keys.pending(k)])
        stacks = tuple(self._stacked_state(bucket, k) for k in basis)
        return stacks if len(stacks) > 1 else stacks[0]

    def _refresh_lands(self, state: dict, group: dict) -> bool:
        """Whether a background refresh (due at step t - refresh_delay > 1) is installed at this step t."""
        t = state[keys.STEP] - group["refresh_delay"]
        return t > 1 and is_due(t - state.get(keys.REFRESH_PHASE, 0), group["refresh_every"])

    def state_dict(self):
        """As the base class's, with every background refresh finished first: a checkpoint taken while
        one is pending holds its result in the pending entries and resumes exactly."""
        self._background.wait_all()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._background.wait_all()  # nothing may write into the state being replaced
        super().load_state_dict(state_dict)

    @staticmethod
    def _refresh_due(state: dict, group: dict) -> bool:
        """At t = 1, and then every ``refresh_every`` steps: at t = 1 + phase + j T, where the phase is 0
        (the authors' schedule: all matrices together) or the parameter's own, under "staggered"."""
        t, period = state[keys.STEP], group["refresh_every"]
        return t == 1 or is_due(t - state.get(keys.REFRESH_PHASE, 0), period)

    def _refresh_phase(self, p: torch.Tensor, period: int) -> int:
        """The staggered refresh phase of a new parameter. Phases are dealt to every staggered
        parameter of this period that has none yet, at once: largest refresh cost first (eigh costs
        ~d^3 per d x d factor), each to the phase with the least cost so far, so that each step pays
        about 1/T of a whole refresh."""
        if p not in self._pending_phases:
            load = [0.0] * period
            new = []
            for group in self.param_groups:
                if (group["role"] != "matrix" or group["refresh_schedule"] != "staggered"
                        or group["refresh_every"] != period):
                    continue
                for q in group["params"]:
                    phase = self.state.get(q, {}).get(keys.REFRESH_PHASE)
                    cost = self._refresh_cost(q, group)
                    if phase is None:
                        new.append((cost, q))
                    else:
                        load[phase] += cost
            for cost, q in sorted(new, key=lambda item: -item[0]):
                phase = min(range(period), key=load.__getitem__)
                load[phase] += cost
                self._pending_phases[q] = phase
        return self._pending_phases.pop(p)

    @staticmethod
    def _factor_blocks(group: dict, m: int, n: int) -> list[tuple[int, int]]:
        """(diagonal blocks, block size) of each whitened side's factor of an m x n matrix."""
        out = []
        for side in whitened_sides(group["sides"], m, n):
            d = m if side == "left" else n
            blocks = side_blocks(d, group["max_factor_dim"])
            out.append((blocks, d // blocks))
        return out

    @classmethod
    def _refresh_cost(cls, p: torch.Tensor, group: dict) -> float:
        k, m, n = matrix_dims(p.shape, group["layout"], group["split"])
        return k * sum(blocks * d**3 for blocks, d in cls._factor_blocks(group, m, n))

    def _block_cost(self, group: dict, m: int, n: int) -> float:
        # + the factor EMAs and the rotations in and out of the eigenbases (~3 products per side), and
        # the refresh (an eigendecomposition, ~10 d^3, or the Newton iteration's products), amortised
        # over refresh_every steps.
        t = group["refresh_every"]
        per_step = sum(3.0 * d * m * n + blocks * self._refresh_flops(group, d, blocks) / t
                       for blocks, d in self._factor_blocks(group, m, n))
        return super()._block_cost(group, m, n) + per_step

    @staticmethod
    def _refresh_flops(group: dict, d: int, blocks: int = 1) -> float:
        """One d x d factor's refresh (one of ``blocks`` diagonal blocks)."""
        if group["refresh"] == "eigh":
            return 10.0 * d**3
        return 2.0 * d**3 * newton_plan(d * blocks, group["alpha"], group["eps"])[2]

    def _algorithm_diagnostics(self) -> dict[str, torch.Tensor]:
        """Largest condition number of the (damped) Kronecker factors at their last refresh, per side
        (from the eigenvalues: refresh="newton" computes none)."""
        out = {}
        for side in ("left", "right"):
            conds = [(v.amax(-1) / v.amin(-1)).amax() for st in self.state.values()
                     if (v := st.get(keys.kron_eigvals(side))) is not None]
            if conds:
                out[f"optim/kron_{side}_cond_max"] = torch.stack(conds).amax()
        return out


Mousse.__doc__ = f"""Mousse for matrices, AdamW (or Lion) for everything else, in one optimizer.

Per matrix W (m x n, "left" = output side), with gradient G and heavy-ball momentum M:

    L <- beta L + (1 - beta) G G^T;   R <- beta R + (1 - beta) G^T G      (fp32, every step)
    every ``refresh_every`` steps: eigendecompose the bias-corrected, trace-normalised factors
    (+ eps I), shifting eigenvalues to be >= eps (refresh="newton": their inverse roots by a coupled
    Newton iteration, matmuls only)
    U = L^-alpha NS(L^-alpha M R^-alpha) R^-alpha, rescaled to ||NS(...)||_F (grafting)
    W <- W (1 - lr wd) - lr sqrt(m / n) U

{args_doc(Mousse)}
"""
