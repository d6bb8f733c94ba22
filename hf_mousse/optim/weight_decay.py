"""Decoupled and corrected decoupled weight decay (ALGORITHMS.md §a.4 and §d).

Both return the multiplicative shrink applied to the weights before the update, W <- W * shrink.
"""

from __future__ import annotations

SCHEDULES = ("decoupled", "corrected")


def peak_lr(group: dict) -> float:
    """The group's peak LR: what LR schedulers record (``max_lr`` for OneCycleLR, else
    ``initial_lr``), or the current LR when no scheduler is attached."""
    return float(group.get("max_lr", group.get("initial_lr", group["lr"])))


def decay_shrink(group: dict) -> float:
    """``1 - lr * wd_t`` for the group, with wd_t = wd ("decoupled") or wd * lr / peak_lr
    ("corrected", Chou 2025: keeps the steady-state weight norm fixed as the LR is scheduled)."""
    lr = float(group["lr"])
    wd = float(group["weight_decay"])
    if wd == 0.0 or lr == 0.0:
        return 1.0
    if group["weight_decay_schedule"] == "corrected":
        peak = peak_lr(group)
        wd = wd * lr / peak if peak > 0 else 0.0
    return 1.0 - lr * wd
