"""Names of the per-parameter optimizer state entries: one home, used by the optimizers and by
checkpointing (``integration/checkpoint.py``) alike."""

from __future__ import annotations

STEP = "step"  # int: steps this parameter has taken (per parameter, not per group)
MOMENTUM = "momentum"  # matrix path: EMA (Muon, MiMuon) or heavy-ball (Mousse) momentum
EXP_AVG = "exp_avg"  # scalar path: first moment (AdamW) or momentum (Lion)
EXP_AVG_SQ = "exp_avg_sq"  # scalar path, AdamW only: second moment
REFRESH_PHASE = "refresh_phase"  # Mousse, refresh_schedule="staggered": int in [0, refresh_every)
MUON_BRANCH = "muon_branch"  # MiMuon: bool per block, the branch chosen at the last gap test
MUON_BRANCH_STEPS = "muon_branch_steps"  # MiMuon: per block, steps taken on the Muon branch

# Entries with the parameter's own shape (the others are per block or per factor).
PARAM_SHAPED = (MOMENTUM, EXP_AVG, EXP_AVG_SQ)


def kron(side: str) -> str:
    """Mousse: the Kronecker factor EMA of ``side`` ("left" = output side, "right" = input side)."""
    return f"kron_{side}"


def kron_eigvals(side: str) -> str:
    """Mousse: the cleaned eigenvalues of the factor at its last refresh."""
    return f"kron_{side}_eigvals"


def kron_eigvecs(side: str) -> str:
    """Mousse: the eigenvectors (eigenbasis) of the factor at its last refresh."""
    return f"kron_{side}_eigvecs"


def kron_root(side: str) -> str:
    """Mousse, refresh="newton": the factor's inverse root (F + eps I)^-alpha at its last refresh."""
    return f"kron_{side}_root"


def pending(key: str) -> str:
    """Mousse, refresh_delay > 0: the refresh result computed in the background, installed into ``key``
    (an eigenbasis entry or a root) ``refresh_delay`` steps after the refresh that computed it."""
    return f"{key}_pending"
