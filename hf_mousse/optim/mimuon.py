"""MiMuon: Muon when the momentum's singular values are well separated, momentum SGD otherwise
(arXiv 2605.19619). The paper publishes no code or hyperparameters; the realisation here is ours
and every choice is an option (ALGORITHMS.md §c.3, README "MiMuon").

Gap statistic, per matrix block, every ``gap_every`` steps, on the direction D (momentum or
Nesterov mix) in fp32: the eigenvalues mu_1 >= mu_2 >= ... of the short-side Gram D D^T give
sigma_i = sqrt(mu_i). Singular values are kept where mu_i > mu_1 * r * eps_fp32 (below that the
Gram cannot resolve them; r = short side), and

    kappa = min_i (sigma_i - sigma_{i+1}) / sigma_1   over adjacent kept values (inf if < 2 kept).

kappa >= gap_threshold selects the Muon branch (update adjust_lr * NS(D)), otherwise the SGD branch
(update sgd_lr_ratio * D, or D rescaled to Frobenius norm sqrt(r) with sgd_scale="match"). The choice
is cached as a tensor until the next test, so step() never waits on the device.
"""

from __future__ import annotations

import math

import torch

from .base import Bucket, _check, lr_ratio
from .muon import Muon
from .roles import matrix_dims

SGD_SCALES = ("paper", "match")


def relative_gap(d: torch.Tensor) -> torch.Tensor:
    """kappa per matrix of a stack (B, m, n); +inf where fewer than two singular values are kept."""
    g = d @ d.mT if d.size(-2) <= d.size(-1) else d.mT @ d
    mu = torch.linalg.eigvalsh(g).flip(-1).clamp_min(0)  # descending
    r = mu.size(-1)
    top = mu[..., :1]
    kept = mu > top * (r * torch.finfo(mu.dtype).eps)
    sigma = mu.sqrt()
    gaps = (sigma[..., :-1] - sigma[..., 1:]) / sigma[..., :1].clamp_min(torch.finfo(mu.dtype).tiny)
    gaps = torch.where(kept[..., 1:], gaps, torch.full_like(gaps, math.inf))
    return gaps.amin(dim=-1) if r > 1 else torch.full(mu.shape[:-1], math.inf, device=d.device)


class MiMuon(Muon):
    """Mixed Muon / momentum SGD per matrix, chosen by the singular-value gap.

    Args (beyond :class:`Muon`'s; momentum is the EMA form, so the paper's beta is 1 - momentum):
        gap_threshold: relative gap kappa at or above which a matrix takes the Muon branch.
        gap_every: steps between gap tests (tested at t = 1, K + 1, 2K + 1, ...).
        sgd_scale: "paper" (plain momentum) or "match" (momentum rescaled to NS-output size).
        sgd_lr_ratio: LR multiplier of the SGD branch.
    """

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
        gap_threshold: float = 1e-3,
        gap_every: int = 10,
        sgd_scale: str = "paper",
        sgd_lr_ratio: float = 1.0,
        **kwargs,
    ):
        self._algorithm_defaults = dict(gap_threshold=gap_threshold, gap_every=gap_every,
                                        sgd_scale=sgd_scale, sgd_lr_ratio=sgd_lr_ratio)
        super().__init__(params, lr, momentum, nesterov, weight_decay, **kwargs)

    def _validate_algorithm(self, g: dict) -> None:
        _check(g["gap_threshold"] >= 0, "gap_threshold", g["gap_threshold"], "a float >= 0")
        k = g["gap_every"]
        _check(isinstance(k, int) and k >= 1, "gap_every", k, "an int >= 1")
        _check(g["sgd_scale"] in SGD_SCALES, "sgd_scale", g["sgd_scale"], f"one of {SGD_SCALES}")
        _check(g["sgd_lr_ratio"] >= 0, "sgd_lr_ratio", g["sgd_lr_ratio"], "a float >= 0")

    def _init_matrix_state(self, state: dict, p: torch.Tensor, group: dict) -> None:
        k = matrix_dims(p.shape, group["layout"], group["split"])[0]
        state["muon_branch"] = torch.ones(k, dtype=torch.bool, device=p.device)
        state["muon_branch_steps"] = torch.zeros(k, device=p.device)

    def _bucket_update(self, bucket: Bucket):
        group = bucket.group
        d = bucket.x  # fp32
        period = group["gap_every"]
        due = [i for i, st in enumerate(bucket.states) if period == 1 or st["step"] % period == 1]
        if due:  # one batched eigvalsh for every matrix tested this step
            passed = (relative_gap(d[bucket.rows(due)]) >= group["gap_threshold"]).split(
                [bucket.counts[i] for i in due])
            for i, ok in zip(due, passed):
                bucket.states[i]["muon_branch"].copy_(ok)
        for st in bucket.states:
            st["muon_branch_steps"].add_(st["muon_branch"])
        branch = bucket.cat_state("muon_branch")[:, None, None]
        _, m, n = d.shape
        muon = self.orthogonalize(group, d).float() * lr_ratio(group["adjust_lr"], m, n)
        sgd = d * group["sgd_lr_ratio"]
        if group["sgd_scale"] == "match":
            norm = torch.linalg.vector_norm(d, dim=(-2, -1), keepdim=True)
            sgd = sgd * (math.sqrt(min(m, n)) / norm.clamp_min(torch.finfo(d.dtype).tiny))
        return torch.where(branch, muon, sgd), 1.0

    def _algorithm_diagnostics(self) -> dict[str, torch.Tensor]:
        """Share of matrix blocks currently on the Muon branch."""
        branches = [st["muon_branch"] for st in self.state.values() if "muon_branch" in st]
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
                if "muon_branch_steps" in st and st["step"]:
                    out[name] = (st["muon_branch_steps"].mean() / st["step"]).item()
        return out
