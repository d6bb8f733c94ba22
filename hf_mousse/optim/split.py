"""The matrix work split over ranks (DDP, FSDP2): each matrix's update is computed by one owner rank,
chosen by a deterministic cost-balanced assignment, and shared with every rank by one all-gather per
same-shape bucket. A mixin of :class:`~hf_mousse.optim.base.SpectralOptimizer`, whose step calls
:meth:`SplitStep._split_matrix_step` when :meth:`SplitStep.split_world` is not None."""

from __future__ import annotations

from collections import defaultdict

import torch

from . import distributed
from .bucket import Bucket
from .roles import matrix_dims
from .state_keys import MOMENTUM
from .weight_decay import decay_shrink


class SplitStep:
    """The split step and the owner map (see the module docstring)."""

    def split_world(self) -> int | None:
        """The number of ranks the matrix work is split over, or None (single-process behaviour). When
        split, :meth:`state_dict` is a collective: call it on every rank."""
        return distributed.process_group_size(self.distributed)

    _world = split_world

    def _block_cost(self, group: dict, m: int, n: int) -> float:
        """Relative cost of one m x n block's update, to balance the ranks: Newton–Schulz, ~3 matmuls
        of m x n by min(m, n) per iteration. Subclasses add their own work."""
        return 3.0 * (group["ns_steps"] or 5) * m * n * min(m, n)

    def _owner_map(self, world: int) -> dict[int, int]:
        """id(matrix parameter) -> the rank that keeps its state and computes its update; the same on
        every rank (it depends only on the param groups), recomputed when the parameters change
        (accelerate swaps them for FSDP2's DTensors after the optimizer is built)."""
        params = [(g, p) for g in self.param_groups if g["role"] == "matrix" for p in g["params"]]
        signature = (world, tuple(id(p) for _, p in params))
        if self._owners[0] != signature:
            items = []
            for g, p in params:
                distributed.check_placement(p, None)
                k, m, n = matrix_dims(p.shape, g["layout"], g["split"])
                items.append(((id(g), m, n), k, self._block_cost(g, m, n)))
            self._owners = (signature, dict(zip(signature[1], distributed.assign_owners(items, world))))
        return self._owners[1]

    def _split_matrix_step(self, group: dict, params: list[torch.Tensor], world: int) -> None:
        """The matrix step with each parameter's update computed by its owner only: the owner advances
        its momentum (and factors), computes the bucket's updates for the blocks it owns, one
        all-gather per same-shape bucket shares them, and every rank applies all of them to its
        weights (DDP: the whole matrix; FSDP2: its shard). Every rank runs the same collectives in the
        same order: the buckets and their members are the same everywhere."""
        owners, me = self._owner_map(world), distributed.rank()
        grads = [distributed.full(p.grad) for p in params]  # FSDP2: all-gathered (a collective)
        mine = [i for i, p in enumerate(params) if owners[id(p)] == me]
        states = {i: self._matrix_state(group, params[i]) for i in mine}
        directions = {}
        if mine:
            bufs = [states[i][MOMENTUM] for i in mine]
            own_grads = [grads[i] if grads[i].dtype == b.dtype else grads[i].to(b.dtype)
                         for i, b in zip(mine, bufs)]
            directions = dict(zip(mine, self._update_momentum(group, bufs, own_grads)))
        layout, split, shrink = group["layout"], group["split"], decay_shrink(group)
        members: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            _, m, n = matrix_dims(p.shape, layout, split)
            members[(m, n, distributed.local(p).device)].append(i)
        for (m, n, device), idx in members.items():
            counts = [matrix_dims(params[i].shape, layout, split)[0] for i in idx]
            per_rank = [0] * world
            for i, k in zip(idx, counts):
                per_rank[owners[id(params[i])]] += k
            dtype = self._ns_dtype(group, device) if self.stack_in_ns_dtype else torch.float32
            own = [j for j, i in enumerate(idx) if i in states]
            if own:
                bucket = Bucket(group, [params[idx[j]] for j in own], [grads[idx[j]] for j in own],
                                [states[idx[j]] for j in own], [counts[j] for j in own], (m, n), device)
                bucket.x = bucket.stack([directions[idx[j]] for j in own], dtype)
                update, ratio = self._bucket_update(bucket)
                # The LR multiplier goes with the update: MiMuon's depends on the owner's blocks.
                update = (update if ratio == 1.0 else update.float() * ratio).to(dtype)
                self.matrix_updates += sum(bucket.counts)
            else:
                update = torch.empty((0, m, n), dtype=dtype, device=device)
            parts = distributed.all_gather_blocks(update, per_rank)
            taken, pieces = [0] * world, []
            for i, k in zip(idx, counts):  # back into the bucket's order
                r = owners[id(params[i])]
                pieces.append(parts[r][taken[r] : taken[r] + k])
                taken[r] += k
            everyone = Bucket(group, [params[i] for i in idx], [grads[i] for i in idx], [{} for _ in idx],
                              counts, (m, n), device)
            self._apply_update(everyone, torch.cat(pieces), group["lr"], shrink)
