"""Mousse: Muon in the eigenbasis of Kronecker factors of the gradient covariance
(arXiv 2603.09697; ALGORITHMS.md §b). Defaults are the paper's training configuration."""

from __future__ import annotations

from itertools import accumulate

import torch

from .base import Bucket, _check, lr_ratio
from .kronecker import gram, precondition, refresh_eigenbasis
from .muon import Muon
from .roles import matrix_dims

SIDES = ("both", "left", "right")


class Mousse(Muon):
    """Mousse for matrices, AdamW (or Lion) for everything else, in one optimizer.

    Per matrix W (m x n, "left" = output side), with gradient G and heavy-ball momentum M:

        L <- beta L + (1 - beta) G G^T;   R <- beta R + (1 - beta) G^T G      (fp32, every step)
        every ``refresh_every`` steps: eigendecompose the bias-corrected, trace-normalised factors
        (+ eps I), shifting eigenvalues to be >= eps
        U = L^-alpha NS(L^-alpha M R^-alpha) R^-alpha, rescaled to ||NS(...)||_F (grafting)
        W <- W (1 - lr wd) - lr sqrt(m / n) U

    Args (beyond :class:`Muon`'s):
        alpha: whitening exponent (0 gives Muon).
        beta: EMA coefficient of the Kronecker factors.
        refresh_every: steps between eigendecompositions (refresh at t = 1, T + 1, 2T + 1, ...).
        eps: damping added before eigh, relative to mean eigenvalue 1.
        bias_correction: divide factors by 1 - beta^t at refresh.
        grafting: rescale the update to the Frobenius norm of the NS output.
        sides: "both", "left" (output side only) or "right" (input side only).
    """

    momentum_form = "heavy_ball"

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
        eps: float = 1e-5,
        bias_correction: bool = True,
        grafting: bool = True,
        sides: str = "both",
        ns="dion",
        ns_steps: int | None = 5,
        ns_eps: float = 1e-8,
        adjust_lr: str | None = "spectral_norm",
        **kwargs,
    ):
        self._algorithm_defaults = dict(alpha=alpha, beta=beta, refresh_every=refresh_every, eps=eps,
                                     bias_correction=bias_correction, grafting=grafting, sides=sides)
        super().__init__(params, lr, momentum, nesterov, weight_decay, ns=ns, ns_steps=ns_steps,
                         ns_eps=ns_eps, adjust_lr=adjust_lr, **kwargs)

    def _validate_algorithm(self, g: dict) -> None:
        _check(g["alpha"] >= 0, "alpha", g["alpha"], "a float >= 0")
        _check(0 <= g["beta"] < 1, "beta", g["beta"], "a float in [0, 1)")
        t = g["refresh_every"]
        _check(isinstance(t, int) and t >= 1, "refresh_every", t, "an int >= 1")
        _check(g["eps"] > 0, "eps", g["eps"], "a float > 0")
        _check(isinstance(g["bias_correction"], bool), "bias_correction", g["bias_correction"], "a bool")
        _check(isinstance(g["grafting"], bool), "grafting", g["grafting"], "a bool")
        _check(g["sides"] in SIDES, "sides", g["sides"], f"one of {SIDES}")

    @staticmethod
    def _sides(group: dict) -> list[str]:
        return {"both": ["left", "right"], "left": ["left"], "right": ["right"]}[group["sides"]]

    def _algorithm_diagnostics(self) -> dict[str, torch.Tensor]:
        """Largest condition number of the (damped) Kronecker factors at their last refresh, per side."""
        out = {}
        for side in ("left", "right"):
            conds = [(v.amax(-1) / v.amin(-1)).amax() for st in self.state.values()
                     if (v := st.get(f"kron_{side}_eigvals")) is not None]
            if conds:
                out[f"optim/kron_{side}_cond_max"] = torch.stack(conds).amax()
        return out

    def _init_matrix_state(self, state: dict, p: torch.Tensor, group: dict) -> None:
        k, m, n = matrix_dims(p.shape, group["layout"], group["split"])
        for side in self._sides(group):
            d = m if side == "left" else n
            eye = torch.eye(d, device=p.device).expand(k, d, d)
            state[f"kron_{side}"] = torch.zeros((k, d, d), device=p.device)
            # The official code starts from eigenvalues 0; 1 only differs if the first refresh
            # sees a zero gradient, where 0 ** -alpha would be inf.
            state[f"kron_{side}_eigvals"] = torch.ones((k, d), device=p.device)
            state[f"kron_{side}_eigvecs"] = eye.clone()

    def _bucket_update(self, bucket: Bucket):
        group = bucket.group
        beta, period = group["beta"], group["refresh_every"]
        g = bucket.stack(bucket.grads)  # raw gradient, fp32, logical layout
        due = [i for i, s in enumerate(bucket.states) if period == 1 or s["step"] % period == 1]
        eig = {}
        for side in self._sides(group):
            key = f"kron_{side}"
            gg = gram(g, side)
            factors = [s[key] for s in bucket.states]
            torch._foreach_lerp_(factors, [gg[o : o + k] for o, k in zip(bucket.offsets, bucket.counts)],
                                 1 - beta)
            vals, vecs = bucket.cat_state(f"{key}_eigvals"), bucket.cat_state(f"{key}_eigvecs")
            for t in sorted({bucket.states[i]["step"] for i in due}):
                members = [i for i in due if bucket.states[i]["step"] == t]
                rows = bucket.rows(members)
                v, q = vals[rows], vecs[rows]
                refresh_eigenbasis(
                    torch.cat([factors[i] for i in members]), v, q,
                    bias_correction=(1 - beta**t) if group["bias_correction"] else 1.0,
                    eps=group["eps"], stats=self.eigh_stats,
                )
                vals[rows], vecs[rows] = v, q
                offsets = accumulate([0, *(bucket.counts[i] for i in members)])
                for i, o in zip(members, offsets):
                    k = bucket.counts[i]
                    bucket.states[i][f"{key}_eigvals"].copy_(v[o : o + k])
                    bucket.states[i][f"{key}_eigvecs"].copy_(q[o : o + k])
            eig[side] = (vals, vecs)
        update = precondition(
            bucket.x, eig.get("left"), eig.get("right"), group["alpha"],
            lambda y: self.orthogonalize(group, y), group["grafting"],
        )
        _, m, n = bucket.x.shape
        return update.to(bucket.x.dtype), lr_ratio(group["adjust_lr"], m, n)
