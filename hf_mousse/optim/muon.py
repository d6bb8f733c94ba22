"""Muon: momentum, then Newton–Schulz orthogonalisation (ALGORITHMS.md §a).

Defaults and momentum form match ``torch.optim.Muon`` (EMA momentum, Nesterov, Keller Jordan's
coefficients, lr 1e-3, weight decay 0.1, ``adjust_lr="original"``).
"""

from __future__ import annotations

from .base import SpectralOptimizer, lr_ratio
from .bucket import Bucket
from .hyperparameters import args_doc


class Muon(SpectralOptimizer):
    momentum_form = "ema"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        *,
        ns="keller_jordan",
        ns_steps: int | None = 5,
        ns_eps: float = 1e-7,
        adjust_lr: str | None = "original",
        **shared,
    ):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns=ns,
                        ns_steps=ns_steps, ns_eps=ns_eps, adjust_lr=adjust_lr)
        super().__init__(params, defaults, **shared)

    def _bucket_update(self, bucket: Bucket):
        _, m, n = bucket.x.shape
        return self.orthogonalize(bucket.group, bucket.x), lr_ratio(bucket.group["adjust_lr"], m, n)


Muon.__doc__ = f"""Muon for matrices, AdamW (or Lion) for everything else, in one optimizer.

{args_doc(Muon)}
"""
