"""The shared optimizer: param groups with roles, lazy state, same-shape batching, scalar path.

Subclasses (Muon, Mousse, MiMuon) only say how a stack of momentum matrices becomes a stack of
updates (:meth:`SpectralOptimizer._bucket_update`) and what extra state a matrix needs. The state's
save and load (``checkpoint_state.py``) and the step split over ranks (``split.py``) are mixins of
their own modules.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..errors import (
    InvalidHyperparameterError,
    NonFiniteGradientError,
    NonFiniteUpdateError,
    UnsupportedParameterError,
)
from . import distributed
from . import scalar as scalar_path
from .bucket import Bucket
from .checkpoint_state import CheckpointState
from .checks import MIN_FLOOR, _check, _is_int, _is_real
from .gate import NO_GATE, StepGate
from .kronecker import EighStats
from .orthogonalize import newton_schulz, norm_safety_for, resolve_schedule
from .roles import LAYOUTS, default_layout, from_blocks, matrix_dims, param_groups
from .split import SplitStep
from .state_keys import EXP_AVG, MOMENTUM, STEP
from .weight_decay import SCHEDULES, decay_shrink

ADJUST_LR = ("original", "match_rms_adamw", "spectral_norm", None)
NS_DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
NONFINITE = ("raise", "skip", "ignore")


def is_due(step: int, period: int) -> bool:
    """Whether a periodic computation (Mousse's refresh, MiMuon's gap test) runs at ``step``:
    at t = 1, period + 1, 2 period + 1, ..., so the first step always has fresh statistics."""
    return period == 1 or step % period == 1


def lr_ratio(adjust_lr: str | None, m: int, n: int) -> float:
    """Per-shape LR multiplier for an m (fan-out) x n (fan-in) matrix (ALGORITHMS.md §a.3)."""
    if adjust_lr == "original":
        return math.sqrt(max(1.0, m / n))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if adjust_lr == "spectral_norm":
        return math.sqrt(m / n)
    return 1.0


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """Optimizer state is at least fp32, so bf16 parameters keep full-precision statistics."""
    return torch.promote_types(p.dtype, torch.float32)


class SpectralOptimizer(SplitStep, CheckpointState, torch.optim.Optimizer):
    """Base class: one optimizer for a whole model, matrices and scalars in their own groups.

    A param group without a ``role`` is split on construction: parameters of rank >= 2 (both
    sides >= 2) go to a ``role="matrix"`` group, the rest to a ``role="scalar"`` group whose lr is
    ``scalar_lr`` (default: the group's lr) and weight decay ``scalar_weight_decay``.
    """

    momentum_form = "ema"  # "ema": B <- mu B + (1-mu) G ; "heavy_ball": M <- mu M + G
    # Cast the stacked momentum to the NS dtype before _bucket_update. For Mousse this is the
    # authors' rounding: they cast the momentum to bf16 before rotating it (ALGORITHMS.md b.3,
    # steps 3 and 6); for Muon it is the cast NS would do anyway, done once while stacking.
    stack_in_ns_dtype = True
    # Group keys that define which state entries a parameter has, or their shapes: a resume may not
    # change them (load_state_dict refuses). Subclasses add their own.
    state_keys_of_group: tuple[str, ...] = ("role", "layout", "split", "scalar_optimizer")
    # Group keys a later version added, with the value every checkpoint saved before then implies.
    keys_added_later: dict[str, object] = {}

    def __init__(
        self,
        params,
        defaults: dict,
        *,
        ns_dtype: str = "auto",
        weight_decay_schedule: str = "decoupled",
        scalar_optimizer: str = "adamw",
        scalar_lr: float | None = None,
        scalar_weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        scalar_eps: float = 1e-8,
        nonfinite: str = "raise",
        distributed: bool | None = None,
    ):
        """``defaults`` holds the algorithm's own hyperparameters (lr, momentum, NS settings, ...);
        the keyword arguments here are the options every algorithm shares with the same default.
        ``distributed`` (not a hyperparameter: a checkpoint moves between world sizes) says whether the
        matrix work is split over the ranks of torch.distributed's default group (see
        :func:`.distributed.process_group_size`; None: when it has several ranks)."""
        _check(nonfinite in NONFINITE, "nonfinite", nonfinite, f"one of {NONFINITE}")
        _check(distributed in (None, True, False), "distributed", distributed, "None, True or False")
        self.nonfinite = nonfinite
        self.distributed = distributed
        self.matrix_updates = 0  # matrix blocks whose update this rank computed (stats())
        self._owners: tuple = ((), {})  # (signature of the matrix parameters, id(p) -> owner rank)
        self.eigh_stats = EighStats()
        self.nonfinite_skips = 0
        self.nonfinite_updates = 0
        # nonfinite="raise": per parameter, a device counter of its non-finite steps not yet reported,
        # and per device a counter of such steps; read by check_finite(), never by step().
        self._nonfinite_params: dict[torch.Tensor, torch.Tensor] = {}
        self._nonfinite_steps: dict[torch.device, torch.Tensor] = {}
        # ... and for non-finite updates (from finite gradients): per bucket, the owner of each block
        # and a device counter per block; per device a counter of steps with any; this step's flags.
        self._update_rows: dict[tuple[int, ...], tuple[list[torch.Tensor], torch.Tensor]] = {}
        self._update_steps: dict[torch.device, torch.Tensor] = {}
        self._step_update_flags: list[torch.Tensor] = []
        self._nonfinite_unchecked = False  # a gated step ran since the last check_finite()
        self._gate = NO_GATE  # the running step's finite flag (see gate.py)
        self.diagnostics_enabled = False  # see diagnostics(); off costs nothing
        self._update_sq: dict[str, torch.Tensor] = {}  # role -> sum of squared applied updates
        self._update_numel: dict[str, int] = defaultdict(int)
        # state key -> {ids of a bucket's parameters: (stack, the views of it held in their states)}
        self._stacks: dict[str, dict[frozenset, tuple[torch.Tensor, list[torch.Tensor]]]] = defaultdict(dict)
        shared = dict(ns_dtype=ns_dtype, weight_decay_schedule=weight_decay_schedule,
                      scalar_optimizer=scalar_optimizer, scalar_lr=scalar_lr,
                      scalar_weight_decay=scalar_weight_decay, scalar_eps=scalar_eps,
                      betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas)  # else refused
        super().__init__(params, {**shared, **defaults})

    @classmethod
    def for_model(cls, model, *, split_fused: bool = True, embedding_lr=None, head_lr=None, **kwargs):
        """``cls(param_groups(model, ...), **kwargs)``: roles and layouts read from the model."""
        groups = param_groups(model, split_fused=split_fused, embedding_lr=embedding_lr, head_lr=head_lr)
        return cls(groups, **kwargs)

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: dict) -> None:
        if "role" in param_group:
            return self._add_group(param_group)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        names = param_group.get("param_names")
        if params and isinstance(params[0], tuple):  # named parameters
            names, params = [n for n, _ in params], [p for _, p in params]
        rest = {k: v for k, v in param_group.items() if k not in ("params", "param_names")}
        split: dict[str, list] = {"matrix": [], "scalar": []}
        for i, p in enumerate(params):
            layout = default_layout(p)
            split["matrix" if layout else "scalar"].append((i, p, layout))
        for layout in LAYOUTS:
            members = [(i, p) for i, p, lay in split["matrix"] if lay == layout]
            if members:
                g = {**rest, "role": "matrix", "layout": layout, "split": 1}
                self._add_group(self._with_params(g, members, names))
        if split["scalar"] or not params:
            g = {k: v for k, v in rest.items() if k not in ("lr", "weight_decay")}
            g["lr"], g["weight_decay"] = self._scalar_settings(rest)
            members = [(i, p) for i, p, _ in split["scalar"]]
            self._add_group(self._with_params({**g, "role": "scalar"}, members, names))

    def _scalar_settings(self, group: dict) -> tuple[float, float]:
        """(lr, weight decay) of the scalar path for ``group``: its ``scalar_lr`` (else the
        optimizer's; None means the matrix lr) and its ``scalar_weight_decay``."""
        lr = group.get("scalar_lr", self.defaults["scalar_lr"])
        if lr is None:
            lr = group.get("lr", self.defaults["lr"])
        return lr, group.get("scalar_weight_decay", self.defaults["scalar_weight_decay"])

    @staticmethod
    def _with_params(group: dict, members: list, names) -> dict:
        group["params"] = [p for _, p in members]
        if names is not None:
            group["param_names"] = [names[i] for i, _ in members]
        return group

    def _add_group(self, group: dict) -> None:
        if group["role"] == "scalar":
            lr, weight_decay = self._scalar_settings(group)
            group.setdefault("lr", lr)
            group.setdefault("weight_decay", weight_decay)
        else:
            group.setdefault("layout", "linear")
            group.setdefault("split", 1)
        super().add_param_group(group)
        self._validate_group(self.param_groups[-1])

    def _validate_group(self, g: dict) -> None:
        _check(g["role"] in ("matrix", "scalar"), "role", g["role"], "'matrix' or 'scalar'")
        for key in ("lr", "weight_decay", "scalar_weight_decay"):
            v = g[key]
            _check(_is_real(v) and v >= 0, key, v, "a finite float >= 0")
        v = g["scalar_lr"]
        _check(v is None or (_is_real(v) and v >= 0), "scalar_lr", v, "None or a finite float >= 0")
        for key in ("scalar_eps", "ns_eps"):
            v = g[key]
            _check(_is_real(v) and v >= MIN_FLOOR, key, v, f"a finite float >= {MIN_FLOOR:.3g} (float32's "
                   "smallest normal number: a smaller one is 0 in float32, and 0 / 0 follows)")
        m = g["momentum"]
        _check(_is_real(m) and 0 <= m < 1, "momentum", m, "a float in [0, 1)")
        _check(isinstance(g["nesterov"], bool), "nesterov", g["nesterov"], "True or False")
        b = g["betas"]
        _check(
            isinstance(b, (tuple, list)) and len(b) == 2 and all(_is_real(x) and 0 <= x < 1 for x in b),
            "betas", b, "two floats in [0, 1), e.g. (0.9, 0.95)",
        )
        _check(g["scalar_optimizer"] in scalar_path.SCALAR_OPTIMIZERS, "scalar_optimizer",
               g["scalar_optimizer"], f"one of {scalar_path.SCALAR_OPTIMIZERS}")
        _check(g["weight_decay_schedule"] in SCHEDULES, "weight_decay_schedule",
               g["weight_decay_schedule"], f"one of {SCHEDULES}")
        _check(g["adjust_lr"] in ADJUST_LR, "adjust_lr", g["adjust_lr"], f"one of {ADJUST_LR}")
        _check(g["ns_dtype"] in NS_DTYPES, "ns_dtype", g["ns_dtype"], f"one of {NS_DTYPES}")
        steps = g["ns_steps"]
        _check(steps is None or (_is_int(steps) and steps >= 1), "ns_steps", steps, "None or an int >= 1")
        try:
            resolve_schedule(g["ns"], steps)
        except ValueError as e:
            raise InvalidHyperparameterError(str(e)) from None
        if g["role"] == "matrix":
            _check(g["layout"] in LAYOUTS, "layout", g["layout"], f"one of {LAYOUTS}")
            split = g["split"]
            _check(_is_int(split) and split >= 1, "split", split, "an int >= 1")
            names = g.get("param_names") or [None] * len(g["params"])
            for name, p in zip(names, g["params"]):
                what = f"parameter {name!r}" if name else f"a parameter of shape {tuple(p.shape)}"
                if p.ndim < 2:
                    raise UnsupportedParameterError(
                        f"{what} has {p.ndim} dims and cannot take the matrix path with layout="
                        f"{g['layout']!r}; put it in a role='scalar' group (hf_mousse.param_groups does this)"
                    )
                rows = matrix_dims(p.shape, g["layout"])[1]
                if rows % split:
                    raise UnsupportedParameterError(
                        f"{what}: split={split} does not divide its {rows} output rows"
                    )
        self._validate_algorithm(g)

    def _validate_algorithm(self, g: dict) -> None:
        """Subclass hook: check the algorithm's own group keys."""

    # ------------------------------------------------------------------ state
    def _init_matrix_state(self, state: dict, p: torch.Tensor, group: dict) -> None:
        """Subclass hook: add algorithm state for a new matrix parameter."""

    def _bucket_update(self, bucket: Bucket) -> tuple[torch.Tensor, float]:
        """Subclass hook: (update stack (blocks, m, n), LR multiplier) for one bucket."""
        raise NotImplementedError

    def _fresh_state(self, p: torch.Tensor, group: dict) -> dict:
        """A new parameter's state (step 0, initial tensors), without the counters dealt at the first
        step; on ``p``'s device (a meta tensor gives the shapes and dtypes that loading checks)."""
        st: dict = {STEP: 0}
        if group["role"] == "scalar":
            scalar_path.init_state(st, distributed.local(p), group["scalar_optimizer"], state_dtype(p))
        else:  # whole matrices, also for a sharded (DTensor) parameter: its owner keeps its state
            st[MOMENTUM] = torch.zeros(p.shape, dtype=state_dtype(p), device=distributed.local(p).device)
            self._init_matrix_state(st, p, group)
        return st

    def _counters(self, group: dict) -> dict[str, int | None]:
        """The non-tensor state entries of a parameter in ``group``: name -> exclusive upper bound
        (None: unbounded). Every entry is an int >= 0, present in every non-empty state."""
        return {STEP: None}

    def stats(self) -> dict[str, int]:
        """Counters: eigenbasis refreshes, failures and refreshes of non-finite factors (Mousse),
        skipped non-finite steps, withheld non-finite updates; ``matrix_updates``: the matrix blocks
        (a fused projection split in k counts k) whose update this rank computed since construction
        (summed over the ranks of a split run, matrices x steps). Under a split run the eigh counters
        are this rank's too. ``state_bytes`` (and its ``_matrix`` / ``_scalar`` parts): see
        :meth:`state_bytes`. Calls :meth:`check_finite` first (one device read if a step ran since
        the last check)."""
        self.check_finite()
        self.eigh_stats.settle()
        size = self.state_bytes()
        return {
            "state_bytes": size["matrix"] + size["scalar"],
            "state_bytes_matrix": size["matrix"],
            "state_bytes_scalar": size["scalar"],
            "eigh_refreshes": self.eigh_stats.refreshed,
            "eigh_fp64_retries": self.eigh_stats.fp64_retries,
            "eigh_failures": self.eigh_stats.failures,
            "eigh_nonfinite_factors": self.eigh_stats.nonfinite_factors,
            "nonfinite_skips": self.nonfinite_skips,
            "nonfinite_updates": self.nonfinite_updates,
            "matrix_updates": self.matrix_updates,
        }

    def state_bytes(self, world: int | None = None, rank: int = 0) -> dict[str, int]:
        """Bytes of optimizer state this rank keeps once every parameter has stepped, per path
        ("matrix", "scalar"), computed by the code that allocates the state (:meth:`_fresh_state`, on
        the meta device: nothing is allocated, so it also sizes a model built on "meta"). Under the
        split over ranks a rank keeps only the matrices it owns, and the scalar path's shards.
        ``world`` (with ``rank``) sizes rank ``rank`` of a DDP split over ``world`` ranks instead."""
        if world is None:
            world = self._world()
            rank = distributed.rank() if world else 0
        owners, me = (self._owner_map(world), rank) if world else ({}, 0)
        out = {"matrix": 0, "scalar": 0}
        for g in self.param_groups:
            for p in g["params"]:
                if g["role"] == "matrix" and owners.get(id(p), me) != me:
                    continue
                like = p if g["role"] == "matrix" else distributed.local(p)  # (a DTensor's global shape)
                meta = torch.empty(like.shape, dtype=like.dtype, device="meta")
                fresh = [t for t in self._fresh_state(meta, g).values() if isinstance(t, torch.Tensor)]
                out[g["role"]] += sum(t.numel() * t.element_size() for t in fresh)
        return out

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteGradientError` if a step since the last check had a non-finite
        gradient, naming the parameters; those steps were counted in ``stats()["nonfinite_skips"]``
        and changed no parameter and no optimizer tensor. Else raise :class:`NonFiniteUpdateError` if
        a step computed a non-finite update from finite gradients (a numerical failure): the weights
        of the matrices concerned were not changed (``stats()["nonfinite_updates"]`` counts such steps).

        With ``nonfinite="raise"`` (the default) ``step()`` never reads the device: it keeps the
        flags there, and this method reads them (one device-to-host copy, only if a step ran since
        the last check). :meth:`stats`, :meth:`diagnostics` and :meth:`state_dict` call it, and so
        does the Trainer integration at every log and before every checkpoint; a plain PyTorch loop
        calls it wherever it already synchronises (logging the loss, say)."""
        if not self._nonfinite_unchecked:
            return
        self._nonfinite_unchecked = False
        grad_params = list(self._nonfinite_params)
        rows = list(self._update_rows.values())
        parts = ([self._nonfinite_params[p] for p in grad_params], list(self._nonfinite_steps.values()),
                 [c for _, c in rows], list(self._update_steps.values()))
        counters = [c for part in parts for c in part]
        dev = counters[0].device
        flat = torch.cat([c.reshape(-1) if c.device == dev else c.reshape(-1).to(dev) for c in counters])
        values = iter(flat.tolist())  # the read
        bad_grads = {id(p) for p in grad_params if next(values)}
        grad_steps = int(sum(next(values) for _ in parts[1]))
        bad_updates = set()
        for owners, _ in rows:
            bad_updates.update(id(p) for p in owners if next(values))  # each block of each parameter
        update_steps = int(sum(next(values) for _ in parts[3]))
        if not (grad_steps or update_steps):
            return
        torch._foreach_zero_(counters)
        self.nonfinite_skips += grad_steps
        self.nonfinite_updates += update_steps
        message = []
        if grad_steps:
            message.append(
                f"non-finite gradient (inf or NaN) in {self._names(bad_grads)} ({grad_steps} step(s) "
                "since the last check); those steps updated no parameter and no optimizer state (they "
                "are counted in stats()['nonfinite_skips']). Lower the learning rate, enable gradient "
                "clipping or loss scaling, or pass nonfinite='skip' to skip such steps without raising."
            )
        if update_steps:
            message.append(
                f"non-finite update (inf or NaN) in {self._names(bad_updates)} ({update_steps} step(s) "
                "since the last check), computed from finite gradients: a numerical failure of the "
                "optimizer, not of the data. Those steps left the weights of these matrices (and of the "
                "matrices of the same shape and group, updated with them) unchanged; the optimizer state "
                "advanced (counted in stats()['nonfinite_updates']). Check the settings that shape the "
                "update: explicit ns coefficients, ns_dtype, and for Mousse alpha and eps."
            )
        raise (NonFiniteGradientError if grad_steps else NonFiniteUpdateError)(" ".join(message))

    def _names(self, ids: set[int]) -> str:
        """The names (else shapes) of the parameters with these ids, in param-group order."""
        return ", ".join(
            name or f"<parameter of shape {tuple(p.shape)}>"
            for g in self.param_groups
            for p, name in zip(g["params"], g.get("param_names") or [None] * len(g["params"]))
            if id(p) in ids
        )

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse or p.is_complex():
                    raise UnsupportedParameterError(
                        f"{type(self).__name__} does not support sparse gradients or complex parameters"
                    )
            if params:
                work.append((group, params))
        if self.nonfinite == "skip" and not self._grads_finite(work):
            self.nonfinite_skips += 1  # a host read every step: the price of exact skip counts
            return loss
        if self.nonfinite == "raise" and work:
            self._gate = StepGate(self._finite_flag(work))
            self._gate.zero_grads_([distributed.local(p.grad) for _, params in work for p in params])
        try:
            for group, params in work:
                if group["role"] == "scalar":
                    self._scalar_step(group, params)
                else:
                    self._matrix_step(group, params)
            if self._step_update_flags:  # count the step if any bucket's update was withheld
                flags = self._step_update_flags
                dev = flags[0].device
                bad = torch.stack([f if f.device == dev else f.to(dev) for f in flags]).any()
                if dev not in self._update_steps:
                    self._update_steps[dev] = torch.zeros((), device=dev)
                self._update_steps[dev].add_(bad)
        finally:
            self._gate = NO_GATE
            self._step_update_flags = []
        return loss

    @staticmethod
    def _finite_by_group(work):
        """Per (device, dtype) of the gradients: (parameters, 1-D bool tensor "gradient is finite").
        The largest magnitude (infinity norm, NaN-propagating) cannot overflow the way a sum of
        squares would: an fp16 gradient of norm 1e5 is finite. Empty gradients are finite."""
        groups = defaultdict(list)
        for _, params in work:
            for p in params:
                if p.grad.numel():  # a DTensor's global size: an empty shard still takes part below
                    groups[(p.grad.device, p.grad.dtype)].append(p)
        for ps in groups.values():
            grads = [distributed.local(p.grad) for p in ps]
            filled = [i for i, g in enumerate(grads) if g.numel()]  # an empty shard has no inf-norm
            if len(filled) == len(grads):
                norms = torch.stack(torch._foreach_norm(grads, math.inf))
            else:
                norms = torch.zeros(len(grads), device=grads[0].device, dtype=grads[0].dtype)
                if filled:
                    norms[filled] = torch.stack(torch._foreach_norm([grads[i] for i in filled], math.inf))
            finite = torch.isfinite(norms)
            if any(distributed.is_dtensor(p.grad) for p in ps):
                # Each rank sees its shards only: the flags must be the whole gradient's, the same on
                # every rank, so that all skip (or take) the same step. A collective, not a host read.
                finite = distributed.all_reduce_sum_(finite.logical_not().float()) == 0
            yield ps, finite

    def _grads_finite(self, work) -> bool:
        """Whether every gradient is finite: one host read (nonfinite="skip")."""
        flags = [finite.all() for _, finite in self._finite_by_group(work)]
        return not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all())

    def _finite_flag(self, work) -> torch.Tensor:
        """The step's 0-d device flag "every gradient is finite", without a host read; counts, on the
        device, each parameter's non-finite steps and the steps themselves for :meth:`check_finite`."""
        oks = []
        for ps, finite in self._finite_by_group(work):
            counters = []
            for p in ps:
                c = self._nonfinite_params.get(p)
                if c is None:
                    c = self._nonfinite_params[p] = torch.zeros((), device=finite.device)
                counters.append(c)
            torch._foreach_add_(counters, finite.logical_not().float().unbind(0))
            oks.append(finite.all())
        if not oks:  # only empty gradients
            oks.append(torch.ones((), dtype=torch.bool, device=work[0][1][0].grad.device))
        dev = oks[0].device
        ok = oks[0] if len(oks) == 1 else torch.stack([o if o.device == dev else o.to(dev)
                                                       for o in oks]).all()
        steps = self._nonfinite_steps.get(dev)
        if steps is None:
            steps = self._nonfinite_steps[dev] = torch.zeros((), device=dev)
        steps.add_(ok.logical_not())
        self._nonfinite_unchecked = True
        return ok

    def _scalar_step(self, group: dict, params: list[torch.Tensor]) -> None:
        kind = group["scalar_optimizer"]
        states = []
        for p in params:
            st = self.state[p]
            if not st:
                st.update(self._fresh_state(p, group))
            st[STEP] += 1
            states.append(st)
        grads = [distributed.local(p.grad) for p in params]
        grads = [g if g.dtype == s[EXP_AVG].dtype else g.to(s[EXP_AVG].dtype) for g, s in zip(grads, states)]
        params = [distributed.local(p) for p in params]  # elementwise: a shard is updated on its own
        shrink = decay_shrink(group)
        if kind == "adamw":
            updates = scalar_path.adamw(params, grads, states, lr=group["lr"], betas=group["betas"],
                                        eps=group["scalar_eps"], shrink=shrink, gate=self._gate)
        else:
            updates = scalar_path.lion(params, grads, states, lr=group["lr"], betas=group["betas"],
                                       shrink=shrink, gate=self._gate)
        if self.diagnostics_enabled:
            self._record_update("scalar", updates, group["lr"] if kind == "lion" else 1.0)

    def _ns_dtype(self, group: dict, device: torch.device) -> torch.dtype:
        name = group["ns_dtype"]
        if name == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, name)

    def orthogonalize(self, group: dict, x: torch.Tensor) -> torch.Tensor:
        """Newton–Schulz with the group's coefficients, in the group's NS dtype."""
        return newton_schulz(
            x,
            resolve_schedule(group["ns"], group["ns_steps"]),
            group["ns_eps"],
            self._ns_dtype(group, x.device),
            norm_safety_for(group["ns"]),
        )

    def _matrix_step(self, group: dict, params: list[torch.Tensor]) -> None:
        world = self._world()
        if world is not None:
            return self._split_matrix_step(group, params, world)
        states = [self._matrix_state(group, p) for p in params]
        bufs = [s[MOMENTUM] for s in states]
        grads = [p.grad if p.grad.dtype == b.dtype else p.grad.to(b.dtype) for p, b in zip(params, bufs)]
        directions = self._update_momentum(group, bufs, grads)
        shrink = decay_shrink(group)
        for bucket in self._buckets(group, params, grads, states, directions):
            update, ratio = self._bucket_update(bucket)
            self.matrix_updates += sum(bucket.counts)
            self._apply_update(bucket, update, group["lr"] * ratio, shrink)

    def _matrix_state(self, group: dict, p: torch.Tensor) -> dict:
        """The parameter's state, created on its first step (lazily: FSDP2 swaps parameters after
        the optimizer is built), with its step counter advanced."""
        if p.ndim < 2:
            raise UnsupportedParameterError(
                f"a matrix-path parameter arrived with shape {tuple(p.shape)}: something flattened it "
                "after the optimizer was built (DeepSpeed ZeRO or FSDP1). Use FSDP2 or DDP"
            )
        st = self.state[p]
        if not st:
            if distributed.is_dtensor(p) and self._world() is None:
                raise UnsupportedParameterError(
                    f"a sharded (DTensor) matrix of shape {tuple(p.shape)} with distributed=False: its "
                    "update needs the whole matrix, which only the split over ranks gathers. Leave "
                    "distributed at None (the default) under FSDP2"
                )
            st.update(self._fresh_state(p, group))
        st[STEP] += 1
        return st

    def _update_momentum(self, group: dict, bufs: list[torch.Tensor], grads: list[torch.Tensor]):
        """Advance the momentum buffers in place; return what is orthogonalised (buffer or Nesterov mix)."""
        mu = group["momentum"]
        if self.momentum_form == "ema":
            self._gate.lerp_(bufs, grads, 1 - mu)
            return torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
        self._gate.mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)  # zero on a non-finite step (StepGate.zero_grads_)
        return torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs

    def _buckets(self, group, params, grads, states, directions):
        """One :class:`Bucket` per (block shape, device): the directions stacked as (blocks, m, n)."""
        layout, split = group["layout"], group["split"]
        members: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            _, m, n = matrix_dims(p.shape, layout, split)
            members[(m, n, p.device)].append(i)
        for (m, n, device), idx in members.items():
            counts = [matrix_dims(params[i].shape, layout, split)[0] for i in idx]
            bucket = Bucket(group, [params[i] for i in idx], [grads[i] for i in idx],
                            [states[i] for i in idx], counts, (m, n), device)
            dtype = self._ns_dtype(group, device) if self.stack_in_ns_dtype else torch.float32
            bucket.x = bucket.stack([directions[i] for i in idx], dtype)
            yield bucket

    def _stacked_state(self, bucket: Bucket, key: str) -> torch.Tensor:
        """The bucket's per-parameter ``key`` entries as one (blocks, ...) tensor, without a copy per
        step: the first call stacks them and makes each parameter's entry a view of its slice, so
        in-place updates of the entries update the stack. Rebuilt (one copy) when the entries change:
        another set of parameters in the bucket, or state loaded from a checkpoint."""
        members = frozenset(map(id, bucket.params))
        cached = self._stacks[key].get(members)
        if cached is not None and all(s[key] is v for s, v in zip(bucket.states, cached[1])):
            return cached[0]
        entries = [s[key] for s in bucket.states]
        stack = torch.cat(entries)
        views = list(stack.split([e.size(0) for e in entries]))  # a block's entries may hold several rows
        for s, v in zip(bucket.states, views):
            s[key] = v
        stale = [other for other in self._stacks[key] if other & members]  # their views were replaced
        for other in stale:
            del self._stacks[key][other]
        self._stacks[key][members] = (stack, views)
        return stack

    def _apply_update(self, bucket: Bucket, update: torch.Tensor, lr: float, shrink: float) -> None:
        """W <- W * shrink - lr * update, each parameter's blocks mapped back to its storage layout;
        with nothing written on a non-finite step or when the update is not finite."""
        ps = [distributed.local(p) for p in bucket.params]  # FSDP2: this rank's shard
        gate = self._update_gate(bucket, update)
        gate.decay_(ps, shrink)
        gate.mask_(update)  # zero on a gated step (the update is ours: a fresh stack)
        layout = bucket.group["layout"]
        updates = [distributed.shard_like(from_blocks(update[o : o + k], layout, p.shape), p)
                   for p, o, k in zip(bucket.params, bucket.offsets, bucket.counts)]
        torch._foreach_add_(ps, updates, alpha=-lr)
        if self.diagnostics_enabled:
            self._record_update("matrix", [update], lr)

    def _update_gate(self, bucket: Bucket, update: torch.Tensor) -> StepGate:
        """The gate of the bucket's weight writes: the step's finite flag and "every block's update is
        finite" (no host read). A non-finite update from finite gradients (a numerical failure) leaves
        the bucket's weights as they were; it is counted per block, on the device, for
        :meth:`check_finite`. The scalar path is not gated: Lion's updates are signs, and AdamW's
        m / (sqrt(v) + eps) is at most |m| / scalar_eps in size, finite for finite moments."""
        if not self._gate.active:
            return self._gate
        finite = torch.isfinite(torch.linalg.vector_norm(update, math.inf, dim=(-2, -1)))  # per block
        ok = self._gate.flags(update.device)[0]
        key = tuple(map(id, bucket.params))
        if key not in self._update_rows:
            owners = [p for p, k in zip(bucket.params, bucket.counts) for _ in range(k)]
            self._update_rows[key] = (owners, torch.zeros(len(owners), device=update.device))
        self._update_rows[key][1].add_(finite.logical_not() & ok)
        all_finite = finite.all()
        self._step_update_flags.append(all_finite.logical_not() & ok)
        return StepGate(ok & all_finite)

    # ------------------------------------------------------------------ diagnostics
    def _record_update(self, role: str, updates: list[torch.Tensor], scale: float) -> None:
        """Accumulate the squared norm of ``scale * updates`` (no sync, no copy of the updates)."""
        sq = torch.stack(torch._foreach_norm(updates)).float().square().sum() * scale**2
        self._update_sq[role] = self._update_sq[role] + sq if role in self._update_sq else sq
        self._update_numel[role] += sum(u.numel() for u in updates)

    def _algorithm_diagnostics(self) -> dict[str, torch.Tensor]:
        """Subclass hook: extra diagnostics as 0-d tensors (read on the host by diagnostics())."""
        return {}

    def diagnostics(self) -> dict[str, float]:
        """RMS of the applied updates per role since the last call, counters and algorithm
        statistics, keyed for loggers (``optim/...``). Reads the device once; collects nothing
        unless ``diagnostics_enabled`` is set. Raises first what :meth:`check_finite` raises."""
        self.check_finite()
        out = {f"optim/update_rms/{role}": (sq / self._update_numel[role]).sqrt()
               for role, sq in self._update_sq.items()}
        out.update(self._algorithm_diagnostics())
        self._update_sq.clear()
        self._update_numel.clear()
        values = []
        if out:  # one device-to-host copy for all values
            dev = next(iter(out.values())).device
            values = torch.stack([v.float().to(dev) for v in out.values()]).tolist()
        result = dict(zip(out, values))
        result.update({f"optim/{k}": v for k, v in self.stats().items()})
        return result
