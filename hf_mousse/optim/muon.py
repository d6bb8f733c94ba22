"""Muon: momentum, then Newton–Schulz orthogonalisation (ALGORITHMS.md §a).

Defaults and momentum form match ``torch.optim.Muon`` (EMA momentum, Nesterov, Keller Jordan's
coefficients, lr 1e-3, weight decay 0.1, ``adjust_lr="original"``).
"""

from __future__ import annotations

from .base import COMMON_DEFAULTS, Bucket, SpectralOptimizer, lr_ratio
from .roles import param_groups


class Muon(SpectralOptimizer):
    """Muon for matrices, AdamW (or Lion) for everything else, in one optimizer.

    Args:
        params: parameters or param groups (see :func:`hf_mousse.param_groups`).
        lr: learning rate of the matrix path.
        momentum: EMA coefficient, B <- momentum * B + (1 - momentum) * G.
        nesterov: orthogonalise (1 - momentum) * G + momentum * B instead of B.
        ns: coefficient set, "keller_jordan" | "dion" | "polar_express" | "cubic", or (a, b, c) triples.
        ns_steps: Newton–Schulz iterations (None: the set's default).
        ns_eps: added to the Frobenius norm before normalising.
        ns_dtype: "auto" (bf16 on CUDA, fp32 elsewhere), or a dtype name.
        adjust_lr: "original" | "match_rms_adamw" | "spectral_norm" | None.
        weight_decay: decoupled decay, W <- W * (1 - lr * weight_decay).
        weight_decay_schedule: "decoupled" or "corrected" (decay proportional to lr / peak lr).
        scalar_optimizer, scalar_lr, scalar_weight_decay, betas, scalar_eps: the scalar path.
        nonfinite: "raise" | "skip" | "ignore" for inf/NaN gradients.
    """

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
        ns_dtype: str = "auto",
        adjust_lr: str | None = "original",
        weight_decay_schedule: str = "decoupled",
        scalar_optimizer: str = "adamw",
        scalar_lr: float | None = None,
        scalar_weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        scalar_eps: float = 1e-8,
        nonfinite: str = "raise",
    ):
        defaults = {
            **COMMON_DEFAULTS,
            **dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns=ns,
                   ns_steps=ns_steps, ns_eps=ns_eps, ns_dtype=ns_dtype, adjust_lr=adjust_lr,
                   weight_decay_schedule=weight_decay_schedule, scalar_optimizer=scalar_optimizer,
                   scalar_lr=scalar_lr, scalar_weight_decay=scalar_weight_decay, betas=tuple(betas),
                   scalar_eps=scalar_eps),
            **getattr(self, "_algorithm_defaults", {}),  # set by subclasses before this call
        }
        super().__init__(params, defaults, nonfinite=nonfinite)

    @classmethod
    def for_model(cls, model, *, split_fused: bool = True, embedding_lr=None, head_lr=None, **kwargs):
        """``cls(param_groups(model, ...), **kwargs)``: roles and layouts read from the model."""
        groups = param_groups(model, split_fused=split_fused, embedding_lr=embedding_lr, head_lr=head_lr)
        return cls(groups, **kwargs)

    def _bucket_update(self, bucket: Bucket):
        _, m, n = bucket.x.shape
        return self.orthogonalize(bucket.group, bucket.x), lr_ratio(bucket.group["adjust_lr"], m, n)
