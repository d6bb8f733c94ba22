"""MiMuon: Muon when the momentum's singular values are well separated, momentum SGD otherwise
(arXiv 2605.19619). The paper publishes no code or hyperparameters; the realisation here is ours
and every choice is an option (ALGORITHMS.md §c.3, README "MiMuon").

Gap statistic, per matrix block, every ``gap_every`` steps, on the direction D (momentum or
Nesterov mix) in fp32: the eigenvalues mu_1 >= mu_2 >= ... of the short-side Gram D D^T give
sigma_i = sqrt(mu_i). Singular values are kept where mu_i > mu_1 * r * eps_fp32 (below that the
Gram cannot resolve them; r = short side); with k kept values and adjacent gaps
delta_i = sigma_i - sigma_{i+1}:

    gap_rule="relative":  kappa = min_i delta_i / sigma_1               (the paper's fixed threshold)
    gap_rule="scaled":    kappa = (k - 1) min_i delta_i / sigma_1

(inf if fewer than two are kept). kappa >= gap_threshold selects the Muon branch (update
adjust_lr * NS(D)), otherwise the SGD branch (update sgd_lr_ratio * D, or D rescaled to Frobenius norm
sqrt(min(m, n)) with sgd_scale="match").

The relative gap of a dense spectrum shrinks with the matrix size (k values spread over [0, sigma_1]
are sigma_1 / (k - 1) apart on average), so one fixed threshold sends every large matrix, even a
random Gaussian one, to the SGD branch. The scaled rule measures the tightest gap in units of that
mean spacing, which makes one threshold mean the same for every size; it stays ~0 for a degenerate
spectrum (equal singular values), where the relative ratio of two rounding errors would not.

The branch is cached as a tensor between tests and also on the host, read once per test (a device
sync every ``gap_every`` steps, none in between), so that only the Muon-branch blocks pay for
Newton–Schulz.
"""

from __future__ import annotations

import math

import torch

from . import state_keys as keys
from .base import SpectralOptimizer, is_due, lr_ratio
from .bucket import Bucket
from .checks import _check, _is_int, _is_real
from .hyperparameters import args_doc
from .roles import matrix_dims

SGD_SCALES = ("paper", "match")
GAP_RULES = ("scaled", "relative")


def _kept_singular_values(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma descending, kept mask) per matrix of a stack (B, m, n), from the short-side Gram."""
    g = d @ d.mT if d.size(-2) <= d.size(-1) else d.mT @ d
    mu = torch.linalg.eigvalsh(g).flip(-1).clamp_min(0)  # descending
    kept = mu > mu[..., :1] * (mu.size(-1) * torch.finfo(mu.dtype).eps)
    return mu.sqrt(), kept


def gap_statistic(d: torch.Tensor, rule: str) -> torch.Tensor:
    """kappa per matrix of a stack (B, m, n) under ``rule``; +inf where fewer than two values are kept."""
    sigma, kept = _kept_singular_values(d)
    if sigma.size(-1) < 2:
        return torch.full(sigma.shape[:-1], math.inf, device=d.device)
    tiny = torch.finfo(sigma.dtype).tiny
    gaps = sigma[..., :-1] - sigma[..., 1:]
    min_gap = torch.where(kept[..., 1:], gaps, torch.full_like(gaps, math.inf)).amin(dim=-1)
    relative = min_gap / sigma[..., 0].clamp_min(tiny)
    if rule == "relative":
        return relative
    return relative * (kept.sum(dim=-1) - 1).clamp_min(1)  # inf stays inf where < 2 are kept


class MiMuon(SpectralOptimizer):
    momentum_form = "ema"
    stack_in_ns_dtype = False  # the SGD branch and the gap test need the fp32 momentum

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        *,
        gap_rule: str = "scaled",
        gap_threshold: float = 1e-3,
        gap_every: int = 10,
        sgd_scale: str = "paper",
        sgd_lr_ratio: float = 1.0,
        ns="keller_jordan",
        ns_steps: int | None = 5,
        ns_eps: float = 1e-7,
        adjust_lr: str | None = "original",
        **shared,
    ):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        gap_rule=gap_rule, gap_threshold=gap_threshold, gap_every=gap_every,
                        sgd_scale=sgd_scale, sgd_lr_ratio=sgd_lr_ratio, ns=ns, ns_steps=ns_steps,
                        ns_eps=ns_eps, adjust_lr=adjust_lr)
        # Host copy of each parameter's branches: id(state tensor) -> (that tensor, its values). A
        # tensor loaded from a checkpoint is a new object, so its copy is read afresh.
        self._branch_on_host: dict[int, tuple[torch.Tensor, list[bool]]] = {}
        self._rows_on_device: dict[frozenset, tuple[list[int], torch.Tensor]] = {}  # see _rows_index
        super().__init__(params, defaults, **shared)

    def _validate_algorithm(self, g: dict) -> None:
        _check(g["gap_rule"] in GAP_RULES, "gap_rule", g["gap_rule"], f"one of {GAP_RULES}")
        _check(_is_real(g["gap_threshold"]) and g["gap_threshold"] >= 0, "gap_threshold", g["gap_threshold"],
               "a finite float >= 0")
        k = g["gap_every"]
        _check(_is_int(k) and k >= 1, "gap_every", k, "an int >= 1")
        _check(g["sgd_scale"] in SGD_SCALES, "sgd_scale", g["sgd_scale"], f"one of {SGD_SCALES}")
        _check(_is_real(g["sgd_lr_ratio"]) and g["sgd_lr_ratio"] >= 0, "sgd_lr_ratio", g["sgd_lr_ratio"],
               "a finite float >= 0")

    def _init_matrix_state(self, state: dict, p: torch.Tensor, group: dict) -> None:
        k = matrix_dims(p.shape, group["layout"], group["split"])[0]
        state[keys.MUON_BRANCH] = torch.ones(k, dtype=torch.bool, device=p.device)
        state[keys.MUON_BRANCH_STEPS] = torch.zeros(k, device=p.device)

    def _bucket_update(self, bucket: Bucket):
        group = bucket.group
        d = bucket.x  # fp32
        self._test_gaps(bucket)
        on_muon = [b for st in bucket.states for b in self._host_branch(st)]
        for st in bucket.states:
            st[keys.MUON_BRANCH_STEPS].add_(self._gate.select(st[keys.MUON_BRANCH], False))
        _, m, n = d.shape
        ratio = lr_ratio(group["adjust_lr"], m, n)
        if all(on_muon):
            return self.orthogonalize(group, d), ratio
        update = self._sgd_update(group, d)
        rows = [i for i, b in enumerate(on_muon) if b]
        if rows:  # Newton–Schulz only for the blocks on the Muon branch
            idx = self._rows_index(bucket, rows)
            update[idx] = self.orthogonalize(group, d[idx]).float() * ratio
        return update, 1.0

    def _test_gaps(self, bucket: Bucket) -> None:
        """Re-choose the branch of the blocks whose gap test is due: one batched eigvalsh."""
        group = bucket.group
        due = [i for i, st in enumerate(bucket.states) if is_due(st[keys.STEP], group["gap_every"])]
        if not due:
            return
        kappa = gap_statistic(bucket.x[bucket.rows(due)], group["gap_rule"])
        passed = (kappa >= group["gap_threshold"]).split([bucket.counts[i] for i in due])
        for i, ok in zip(due, passed):
            branch = bucket.states[i][keys.MUON_BRANCH]
            branch.copy_(self._gate.select(ok, branch))  # unchanged on a non-finite step
            self._branch_on_host[id(branch)] = (branch, branch.tolist())  # the one sync, at test steps only

    def _rows_index(self, bucket: Bucket, rows: list[int]) -> torch.Tensor:
        """``rows`` as an index tensor on the bucket's device, made once per change of the branches
        (a host-to-device copy synchronises on CUDA, so it must not happen at every step)."""
        key = frozenset(map(id, bucket.params))
        cached = self._rows_on_device.get(key)
        if cached is None or cached[0] != rows:
            cached = self._rows_on_device[key] = (rows, torch.tensor(rows, device=bucket.device))
        return cached[1]

    def _host_branch(self, state: dict) -> list[bool]:
        branch = state[keys.MUON_BRANCH]
        cached = self._branch_on_host.get(id(branch))
        if cached is None or cached[0] is not branch:
            cached = self._branch_on_host[id(branch)] = (branch, branch.tolist())
        return cached[1]

    @staticmethod
    def _sgd_update(group: dict, d: torch.Tensor) -> torch.Tensor:
        sgd = d * group["sgd_lr_ratio"]
        if group["sgd_scale"] == "match":  # Frobenius norm sqrt(min(m, n)), that of an NS output
            norm = torch.linalg.vector_norm(d, dim=(-2, -1), keepdim=True)
            sgd = sgd * (math.sqrt(min(d.shape[-2:])) / norm.clamp_min(torch.finfo(d.dtype).tiny))
        return sgd

    def _algorithm_diagnostics(self) -> dict[str, torch.Tensor]:
        """Share of matrix blocks currently on the Muon branch."""
        branches = [st[keys.MUON_BRANCH] for st in self.state.values() if keys.MUON_BRANCH in st]
        if not branches:
            return {}
        return {"optim/muon_branch_share": torch.cat(branches).float().mean()}

    def muon_branch_fraction(self) -> dict[str, float]:
        """Fraction of steps each matrix (by name, or index) took the Muon branch. Syncs."""
        out = {}
        for g in self.param_groups:
            names = g.get("param_names") or [f"{len(out)}:{i}" for i in range(len(g["params"]))]
            for name, p in zip(names, g["params"]):
                st = self.state.get(p, {})
                if keys.MUON_BRANCH_STEPS in st and st[keys.STEP]:
                    out[name] = (st[keys.MUON_BRANCH_STEPS].mean() / st[keys.STEP]).item()
        return out


MiMuon.__doc__ = f"""Muon or momentum SGD per matrix, chosen by the singular-value gap (module docstring).

Momentum is the EMA form, so the paper's beta is 1 - momentum.

{args_doc(MiMuon)}
"""
