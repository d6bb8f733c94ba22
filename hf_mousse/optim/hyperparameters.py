"""What each hyperparameter means: the one source for the optimizers' docstrings, the Trainer
config fields (``integration/config.py``, as dataclass field metadata) and the model card's table."""

from __future__ import annotations

import inspect
import textwrap
import typing

HELP: dict[str, str] = {
    # the matrix path, shared by Muon, Mousse and MiMuon
    "lr": "learning rate of the matrix path (peak, before the scheduler)",
    "momentum": "momentum coefficient mu (Muon, MiMuon: EMA B <- mu B + (1 - mu) G; Mousse: heavy-ball "
                "M <- mu M + G)",
    "nesterov": "Nesterov momentum: orthogonalise the gradient/momentum mix instead of the momentum",
    "weight_decay": "decoupled weight decay lambda of the matrix path: W <- W (1 - lr lambda) before "
                    "the update",
    "ns": "Newton–Schulz coefficient schedule: keller_jordan, dion, polar_express, cubic, or (a, b, c) "
          "triples",
    "ns_steps": "Newton–Schulz iterations (None: the schedule's own count)",
    "ns_eps": "epsilon added to the Frobenius norm before Newton–Schulz",
    "ns_dtype": "Newton–Schulz dtype: auto (bf16 on CUDA, fp32 elsewhere) or a dtype name",
    "adjust_lr": "learning-rate scale per matrix shape (m = fan-out, n = fan-in): spectral_norm sqrt(m/n), "
                 "match_rms_adamw 0.2 sqrt(max(m, n)), original sqrt(max(1, m/n)), or None",
    "weight_decay_schedule": "decoupled (shrink lr * lambda) or corrected (lambda follows lr / peak lr, "
                             "so the shrink is lr^2 lambda / peak lr)",
    # the scalar path (embeddings, head, norms, biases)
    "scalar_optimizer": "optimizer of embeddings, head, norms and biases: adamw or lion",
    "scalar_lr": "learning rate of the scalar path (None: lr)",
    "scalar_weight_decay": "weight decay of the scalar path",
    "betas": "betas of the scalar optimizer (AdamW moments, or Lion's interpolation and EMA)",
    "scalar_eps": "epsilon of the scalar AdamW",
    "nonfinite": "what a step with an inf/NaN gradient does: raise (the step changes nothing, and a "
                 "non-finite update is never applied either; the error comes at the next check_finite(), "
                 "stats() or Trainer log: step() never reads the device), skip (counted in stats(); one "
                 "device read per step) or ignore",
    "distributed": "split the matrix work over the ranks of torch.distributed's default group (each "
                   "matrix's update computed by one owner rank, shared by all-gather): None splits when "
                   "the group has several ranks (DDP, FSDP2), False never",
    # roles (param_groups)
    "split_fused": "orthogonalise fused projections (e.g. GPT-2 c_attn = Q, K, V) block by block",
    "embedding_lr": "learning rate of the token and position embeddings (None: the scalar path's)",
    "head_lr": "learning rate of the output head (None: the scalar path's)",
    # Mousse
    "alpha": "whitening exponent: the Kronecker factors' eigenvalues are raised to -alpha (0 gives Muon)",
    "beta": "EMA coefficient of the Kronecker factors L = E[G G^T], R = E[G^T G]",
    "refresh_every": "T: the factors' eigenbases are recomputed at steps 1, T + 1, 2T + 1, ...",
    "refresh_schedule": "together (all matrices refresh at the same steps, as the authors' code) or "
                        "staggered (each matrix at its own phase, cost-balanced, so each step pays ~1/T of "
                        "the eigendecompositions; all still refresh at step 1)",
    "refresh": "how a refresh computes the factors' inverse roots: eigh (eigendecomposition, the authors' "
               "method) or newton (coupled Newton iteration, matmuls only, for alpha = 1/p with an integer "
               "p; a fixed iteration count, no host read; see README Speed)",
    "refresh_delay": "d: a refresh due at step t > 1 is computed in the background (a worker thread; on "
                     "CUDA a side stream) while steps t ... t + d - 1 use the previous basis, and is used "
                     "from step t + d on; the run does not depend on when it finishes. 0 (the authors' "
                     "schedule): computed and used at step t. An int in [0, refresh_every - 1]",
    "matmul_dtype": "dtype of the factor EMAs' products (G G^T, G^T G) and of the rotations into and out of "
                    "the eigenbases: float32 (the authors') or bfloat16 (tensor cores on a GPU, fp32 "
                    "accumulation; the factors and bases stay fp32)",
    "basis_dtype": "storage dtype of the eigenvectors (refresh=newton: the inverse roots): float32 or "
                   "bfloat16 (half the memory; rounded once per refresh; the factors and eigenvalues stay "
                   "fp32)",
    "eps": "damping of the factors, relative to their mean eigenvalue 1",
    "bias_correction": "divide the factors by 1 - beta^t before each refresh (the trace normalisation "
                       "that follows cancels it; kept for fidelity with the authors' code)",
    "grafting": "rescale the update to the Frobenius norm of the Newton–Schulz output",
    "sides": "preconditioned sides: both, left (output dimension), right (input dimension) or small (the "
             "smaller of the two per matrix, left when m <= n: the cheap factor to store and refresh)",
    "max_factor_dim": "largest factor kept per side (0: no limit): a longer side is cut into the fewest "
                      "equal diagonal blocks of at most this size, each with its own factor and eigenbasis "
                      "(a block-diagonal factor, as Shampoo's max_preconditioner_dim; normalised as one "
                      "factor)",
    # MiMuon
    "gap_rule": "singular-value gap statistic kappa: scaled ((k - 1) min adjacent gap / largest singular "
                "value, over the k resolvable values: the tightest gap in units of the mean spacing) or "
                "relative (min adjacent gap / largest singular value: the paper's fixed threshold)",
    "gap_threshold": "gap statistic at or above which a matrix takes the Muon branch (else momentum SGD)",
    "gap_every": "steps between gap tests (at steps 1, K + 1, 2K + 1, ...); the branch is kept in between",
    "sgd_scale": "SGD-branch update: paper (the momentum) or match (momentum rescaled to Frobenius norm "
                 "sqrt(min(m, n)), the size of a Newton–Schulz output)",
    "sgd_lr_ratio": "learning-rate multiplier of the SGD branch",
}


def args_doc(cls) -> str:
    """An ``Args:`` docstring section for ``cls``'s hyperparameters, with their defaults."""
    lines = ["Args:", "    params: parameters, named parameters or param groups (hf_mousse.param_groups)."]
    for key, (default, _) in constructor_defaults(cls).items():
        lines += textwrap.wrap(f"{key} (default {default!r}): {HELP[key]}.", 100, initial_indent="    ",
                               subsequent_indent="        ")
    return "\n".join(lines)


def constructor_defaults(cls) -> dict[str, tuple[object, object]]:
    """``{keyword: (default, type hint or None)}`` of every hyperparameter ``cls(params, ...)`` takes,
    read from the ``__init__`` signatures along the class hierarchy (a subclass's default wins)."""
    out: dict[str, tuple[object, object]] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        hints = typing.get_type_hints(init)
        for name, p in inspect.signature(init).parameters.items():
            if name in ("self", "params", "defaults") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            out.setdefault(name, (p.default, hints.get(name)))
        if klass.__module__.startswith("torch."):
            break
    return out
