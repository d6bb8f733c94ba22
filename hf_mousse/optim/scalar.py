"""The scalar path: AdamW (default) or Lion for embeddings, the output head, norms and biases.

Multi-tensor (foreach) implementations over a group's parameters. State is fp32 at least, and
the update is applied in the parameter's dtype.
"""

from __future__ import annotations

import math

import torch

from .gate import NO_GATE, StepGate
from .state_keys import EXP_AVG, EXP_AVG_SQ, STEP

SCALAR_OPTIMIZERS = ("adamw", "lion")


def init_state(state: dict, p: torch.Tensor, kind: str, state_dtype: torch.dtype) -> None:
    state[STEP] = 0
    state[EXP_AVG] = torch.zeros_like(p, dtype=state_dtype)
    if kind == "adamw":
        state[EXP_AVG_SQ] = torch.zeros_like(p, dtype=state_dtype)


def adamw(params, grads, states, *, lr: float, betas, eps: float, shrink: float,
          gate: StepGate = NO_GATE) -> list[torch.Tensor]:
    """torch.optim.AdamW's update (decoupled decay, bias correction), with per-parameter steps.
    Returns the applied updates (for diagnostics). Every write is conditional on ``gate``, whose
    gradients are zero on a non-finite step."""
    b1, b2 = betas
    exp_avgs = [s[EXP_AVG] for s in states]
    exp_avg_sqs = [s[EXP_AVG_SQ] for s in states]
    gate.lerp_(exp_avgs, grads, 1 - b1)
    gate.mul_(exp_avg_sqs, b2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - b2)
    gate.decay_(params, shrink)
    steps = [s[STEP] for s in states]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1 - b2**t) for t in steps])
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(updates, [-lr / (1 - b1**t) for t in steps])
    gate.scale_(updates)
    torch._foreach_add_(params, updates)
    return updates


def lion(params, grads, states, *, lr: float, betas, shrink: float,
         gate: StepGate = NO_GATE) -> list[torch.Tensor]:
    """Lion: u = sign(b1*m + (1-b1)*g); m <- b2*m + (1-b2)*g; W <- W*shrink - lr*u.
    Returns u (the applied update is -lr * u; for diagnostics). Writes are conditional on ``gate``."""
    b1, b2 = betas
    exp_avgs = [s[EXP_AVG] for s in states]
    updates = torch._foreach_lerp(exp_avgs, grads, 1 - b1)
    torch._foreach_sign_(updates)
    gate.scale_(updates)
    gate.lerp_(exp_avgs, grads, 1 - b2)
    gate.decay_(params, shrink)
    torch._foreach_add_(params, updates, alpha=-lr)
    return updates
