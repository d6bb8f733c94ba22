"""The optimizer's state_dict and load_state_dict: the state of a split run gathered into the
one-process format, checks of saved state against the parameters, and the resume rule for changed
settings. A mixin of :class:`~hf_mousse.optim.base.SpectralOptimizer`, which owns the state it reads
(``_fresh_state``, ``_counters``, ``_validate_group``, ``stats``, the owner map of the split)."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch

from ..errors import CheckpointError, InvalidHyperparameterError, UnsupportedParameterError
from . import distributed
from .checks import _is_int
from .kronecker import EighStats

logger = logging.getLogger(__name__)  # resume warnings (hf_mousse.optim.checkpoint_state)


def _group_label(group: dict) -> str:
    name = group.get("group_name")
    return f"group {name!r}" if name else f"role={group.get('role')!r}"


_ABSENT = object()  # a key missing from a param group


def _plain(v):
    """``v`` with tuples as lists (a value read back from JSON compares equal to the one written)."""
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


def _shown(v) -> str:
    return "(absent)" if v is _ABSENT else repr(v)


def _log_changes(changes: list[tuple[tuple, str]]) -> None:
    """One warning per changed setting: saved and requested value, the groups, what applies."""
    by_change: dict[tuple, list[str]] = defaultdict(list)
    for (key, old, new, applies), label in changes:
        by_change[(key, _shown(old), _shown(new), applies)].append(label)
    for (key, old, new, applies), labels in by_change.items():
        logger.warning("resuming with a changed setting: %s was %s when saved and is %s now (%s); %s",
                       key, old, new, ", ".join(labels), applies)


STATS = ("eigh_refreshes", "eigh_fp64_retries", "eigh_failures", "eigh_nonfinite_factors", "nonfinite_skips",
         "nonfinite_updates")


def _checked_stats(stats) -> dict[str, int] | None:
    """The saved :meth:`SpectralOptimizer.stats` (None when absent), each counter an int >= 0; counters
    an earlier version did not keep are 0."""
    if stats is None:
        return None
    if not isinstance(stats, dict) or not set(stats) <= set(STATS) or not all(
        _is_int(v) and v >= 0 for v in stats.values()
    ):
        raise CheckpointError(f"the saved optimizer counters {stats!r} are not {list(STATS)} as ints >= 0")
    return {k: stats.get(k, 0) for k in STATS}


class CheckpointState:
    """state_dict / load_state_dict of a :class:`SpectralOptimizer` (see the module docstring)."""

    def state_dict(self):
        """torch's state dict plus :meth:`stats`. Raises :class:`NonFiniteGradientError` first if a step
        since the last check had a non-finite gradient (see :meth:`check_finite`), so a checkpoint is
        never written over an unreported one."""
        self.check_finite()
        sd = super().state_dict()
        stats = {k: v for k, v in self.stats().items() if k in STATS}  # matrix_updates: since construction
        world = self._world()
        if world is not None:
            sd["state"], stats = self._gathered_state(sd["state"], stats, world)
        sd["hf_mousse_stats"] = stats
        sd["hf_mousse_optimizer"] = type(self).__name__
        return sd

    def _indexed_params(self):
        """(index in the state dict, parameter, its group), numbered as torch's state_dict numbers them."""
        index = 0
        for g in self.param_groups:
            for p in g["params"]:
                yield index, p, g
                index += 1

    def _gathered_state(self, state: dict, stats: dict, world: int) -> tuple[dict, dict]:
        """The state one process would hold, on every rank (collectives: every rank calls this): each
        matrix's state broadcast from its owner, sharded scalar state all-gathered, all on the CPU; the
        eigh counters summed over the ranks (the others are the same on every rank). So the checkpoint
        holds everything once, in the single-process format, and resumes at any world size."""
        owners, me = self._owner_map(world), distributed.rank()
        whole, counters = {}, {}
        for i, p, g in self._indexed_params():
            st = state.get(i)
            if g["role"] == "scalar" and st:
                whole[i] = {k: distributed.gather_shards(v, p).cpu() if isinstance(v, torch.Tensor) else v
                            for k, v in st.items()}
            elif g["role"] == "matrix" and st and owners[id(p)] == me:
                counters[i] = {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
        gathered = distributed.all_gather_objects((counters, stats))
        source = {i: r for r, (held, _) in enumerate(gathered) for i in held}
        for i, p, g in self._indexed_params():
            if i not in source:
                continue
            src = source[i]
            whole[i] = dict(gathered[src][0][i])
            meta = torch.empty(p.shape, dtype=p.dtype, device="meta")
            template = {k: t for k, t in self._fresh_state(meta, g).items() if isinstance(t, torch.Tensor)}
            for k in sorted(template):  # the same order on every rank
                t = template[k]
                buf = (state[i][k].contiguous() if src == me
                       else torch.empty(t.shape, dtype=t.dtype, device=distributed.local(p).device))
                whole[i][k] = distributed.broadcast_(buf, src).cpu()
        totals = {k: sum(s[k] for _, s in gathered) if k.startswith("eigh_") else v for k, v in stats.items()}
        return whole, totals

    def load_state_dict(self, state_dict: dict) -> None:
        """Like torch's, but checked first and exact: nothing changes when a check fails.

        The saved param groups must match this optimizer's (count, sizes, parameter names where both
        have them) and pass the same validation as constructed groups; changed settings follow the
        resume rule of :meth:`_resumed_group` (each change is logged as a warning); every parameter's
        state must have exactly the entries a fresh state would have, each tensor with the shape and
        dtype of a fresh one (:meth:`_check_state`). Raises :class:`~hf_mousse.errors.CheckpointError`. State
        tensors keep their saved dtype (torch would cast fp32 factors and moments of a bf16 parameter
        to bf16) and are copied, not aliased."""
        state_dict = dict(state_dict)
        saved_cls = state_dict.pop("hf_mousse_optimizer", type(self).__name__)
        if saved_cls != type(self).__name__:
            raise CheckpointError(f"the state was saved by {saved_cls!r} but the optimizer is "
                                  f"{type(self).__name__}; resume with the optimizer that wrote it")
        saved_state = state_dict.pop("state")
        stats = _checked_stats(state_dict.pop("hf_mousse_stats", None))
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            raise CheckpointError(
                f"the saved state has param groups of sizes {[len(g['params']) for g in saved_groups]} but "
                f"this optimizer has {[len(g['params']) for g in self.param_groups]}: it was saved for "
                "other parameters or another grouping"
            )
        resumed = [self._resumed_group(s, g) for s, g in zip(saved_groups, self.param_groups)]
        groups = [g for g, _ in resumed]
        owners = {}  # saved parameter index -> (parameter, its resumed group, its name)
        for s, g in zip(saved_groups, groups):
            names = g.get("param_names") or [None] * len(g["params"])
            owners.update(zip(s["params"], zip(g["params"], [g] * len(names), names)))
        for pid, st in saved_state.items():
            if pid not in owners:
                raise CheckpointError(
                    f"the saved state refers to parameter index {pid!r}, which the param groups do not have"
                )
            self._check_state(*owners[pid], st)
        _log_changes([(change, _group_label(g)) for g, changes in resumed for change in changes])
        saved_ids = [{**g, "params": s["params"]} for s, g in zip(saved_groups, groups)]
        super().load_state_dict({**state_dict, "param_groups": saved_ids, "state": {}})
        world = self._world()
        owner = self._owner_map(world) if world else {}
        me = distributed.rank() if world else 0
        for pid, st in saved_state.items():
            p, g = owners[pid][0], owners[pid][1]
            if owner.get(id(p), me) != me:
                continue  # another rank's matrix: its owner keeps the state
            self.state[p] = {k: self._placed(v, p, g) if isinstance(v, torch.Tensor) else v
                             for k, v in st.items()}
        if stats is not None:
            if me != 0:  # the saved eigh counters are totals over the ranks: rank 0 carries them on
                stats.update({k: 0 for k in stats if k.startswith("eigh_")})
            self.eigh_stats = EighStats(stats["eigh_refreshes"], stats["eigh_fp64_retries"],
                                        stats["eigh_failures"], stats["eigh_nonfinite_factors"])
            self.nonfinite_skips = stats["nonfinite_skips"]
            self.nonfinite_updates = stats["nonfinite_updates"]

    @staticmethod
    def _placed(v: torch.Tensor, p: torch.Tensor, group: dict) -> torch.Tensor:
        """A saved (whole) state tensor as this rank keeps it: on ``p``'s device, a copy (never an alias
        of the loaded file); for the scalar path of a sharded parameter, this rank's shard."""
        v = v.to(device=distributed.local(p).device, copy=True)
        if group["role"] == "scalar" and distributed.is_dtensor(p):
            v = distributed.shard_like(v, p).clone()
        return v

    def _resumed_group(self, saved: dict, current: dict) -> tuple[dict, list[tuple]]:
        """(the param group a resume continues with, its changed settings as (key, saved, requested,
        what applies)) under the resume rule (README "Checkpoints"):

        * the optimizer's hyperparameters (constructor keywords, ``group_name``): the requested value,
          i.e. this optimizer's, applies; a change is returned for the log;
        * keys that define the saved state's entries or shapes (:attr:`state_keys_of_group`): a
          change is refused, because the saved state would not fit;
        * the learning rate and keys an LR scheduler adds (``initial_lr``, ...): the saved value
          (torch's rule; the schedule resumes from its own saved state). A changed peak learning
          rate (``initial_lr``) is refused, since the resumed schedule would not apply it; a changed
          ``lr`` without a recorded peak is kept as saved and returned for the log.

        The saved values, as written, pass the same validation as a constructed group, and so does the
        result. Raises :class:`CheckpointError`."""
        names, saved_names = current.get("param_names"), saved.get("param_names")
        if names is not None and saved_names is not None and list(names) != list(saved_names):
            raise CheckpointError(
                f"the saved param group holds {list(saved_names)[:5]} but this optimizer's holds "
                f"{list(names)[:5]}: the state was saved for other parameters"
            )
        members = {"params": current["params"], **({"param_names": names} if names is not None else {})}
        saved = {**self.keys_added_later, **saved}
        values = {k: v for k, v in saved.items() if k not in members}
        label = _group_label({**current, **values})
        self._validated({**current, **values, **members}, f"the saved param group ({label})")
        ours = self.defaults.keys() | {"role", "layout", "split", "group_name", "low_rank_side"}
        group, changes = dict(members), []
        for key in sorted((values.keys() | current.keys()) - members.keys()):
            old, new = values.get(key, _ABSENT), current.get(key, _ABSENT)
            if _plain(old) == _plain(new):
                group[key] = new
            elif key in self.state_keys_of_group and old is _ABSENT:
                raise CheckpointError(f"cannot resume {label}: the saved group has no {key} (this "
                                      f"optimizer's is {new!r}): the state was saved by another optimizer")
            elif key in self.state_keys_of_group:
                raise CheckpointError(
                    f"cannot resume {label} with {key}={_shown(new)}: the state was saved with "
                    f"{key}={_shown(old)} and only fits that (its entries or shapes depend on it). Resume "
                    f"with {key}={_shown(old)}, or start this optimizer afresh without the saved state"
                )
            elif key == "lr" or key not in ours:  # the LR schedule's
                if key == "initial_lr" and new is not _ABSENT and old is not _ABSENT:
                    raise CheckpointError(
                        f"cannot resume {label} with peak learning rate {new!r}: the state was saved with "
                        f"{old!r}, and the LR schedule resumes from its saved state, which keeps {old!r}. "
                        f"Resume with learning rate {old!r}, or start optimizer and scheduler afresh"
                    )
                group[key] = old if old is not _ABSENT else new
                if key == "lr" and "initial_lr" not in values and "initial_lr" not in current:
                    changes.append((key, old, new, "the saved value applies (lr is schedule state)"))
            else:
                if new is not _ABSENT:
                    group[key] = new
                changes.append((key, old, new, "the requested value applies"))
        self._validated(group, f"the resumed param group ({label})")
        return group, changes

    def _validated(self, group: dict, what: str) -> None:
        try:
            self._validate_group(group)
        except (InvalidHyperparameterError, UnsupportedParameterError) as e:
            raise CheckpointError(f"{what} is not valid: {e}") from None

    def _check_state(self, p: torch.Tensor, group: dict, name: str | None, st: dict) -> None:
        """Raise :class:`CheckpointError` unless ``st`` is empty or has exactly the entries of a fresh
        state of ``p`` in ``group``, tensors of the same shapes and dtypes, counters in range."""
        if not st:
            return
        what = f"the saved state of {name!r}" if name else f"the saved state of a {tuple(p.shape)} parameter"
        meta = torch.empty(p.shape, dtype=p.dtype, device="meta")  # (a DTensor's global shape)
        expected = {k: v for k, v in self._fresh_state(meta, group).items() if isinstance(v, torch.Tensor)}
        counters = self._counters(group)
        keys = expected.keys() | counters.keys()
        if st.keys() != keys:
            raise CheckpointError(
                f"{what} has entries {sorted(st)} but {type(self).__name__} with this group's settings "
                f"({_group_label(group)}) keeps {sorted(keys)} (missing: {sorted(keys - st.keys())}, "
                f"unexpected: {sorted(st.keys() - keys)}): it was saved by another optimizer or with "
                "other settings"
            )
        for key, fresh in expected.items():
            v = st[key]
            if not isinstance(v, torch.Tensor) or v.shape != fresh.shape or v.dtype != fresh.dtype:
                found = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else repr(v)
                raise CheckpointError(
                    f"{what}: {key} is {found} but the parameter (shape {tuple(p.shape)}, {p.dtype}) needs "
                    f"{tuple(fresh.shape)} {fresh.dtype}: it was saved for a different model or dtype"
                )
        for key, bound in counters.items():
            v = st[key]
            if not _is_int(v) or v < 0 or (bound is not None and v >= bound):
                raise CheckpointError(f"{what}: {key}={v!r} is not an int in [0, {bound or 'inf'})")
