"""Splitting the matrix work over the ranks of a process group (DDP and FSDP2).

Under DDP every rank holds the same weights and, after the gradient all-reduce, the same gradients;
under FSDP2 each rank holds a dim-0 shard of every parameter (a DTensor). Either way a matrix's
update needs the whole matrix, and computing it on every rank would repeat the expensive part
(factor updates, eigendecompositions, Newton–Schulz) world-size times. So each matrix parameter has
one *owner* rank (:func:`assign_owners`) that keeps its optimizer state and computes its update;
the updates of one same-shape bucket are then shared with one ``all_gather`` (:func:`all_gather_blocks`),
and every rank applies every update to its own copy (DDP) or shard (FSDP2) of the weights.

Only torch.distributed collectives on the default process group are used: no launcher, no transport.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import UnsupportedParameterError

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - torch builds without distributed support
    DTensor = Replicate = None


def process_group_size(requested: bool | None) -> int | None:
    """The world size the optimizer splits its work over, or None for single-process behaviour.

    ``requested=None`` (the default) splits when torch.distributed is initialised with more than one
    rank; True requires it to be initialised (one rank runs the distributed code on its own);
    False never splits (every rank computes every update, as a single process would)."""
    ready = dist.is_available() and dist.is_initialized()
    if requested is False:
        return None
    if requested and not ready:
        raise RuntimeError("distributed=True needs torch.distributed to be initialised first (torchrun "
                           "and accelerate launch do it; else call torch.distributed.init_process_group)")
    if not ready:
        return None
    size = dist.get_world_size()
    return size if requested or size > 1 else None


def is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores: a DTensor's local shard (same storage), else the tensor itself."""
    return t._local_tensor if is_dtensor(t) else t


def check_placement(p: torch.Tensor, name: str | None) -> None:
    """A DTensor parameter must be sharded (or replicated) over all ranks of the default group, as
    FSDP2's ``fully_shard`` does on a 1-D mesh; HSDP's 2-D meshes and tensor parallelism are refused."""
    if not is_dtensor(p):
        return
    mesh = p.device_mesh
    if mesh.ndim != 1 or mesh.size() != dist.get_world_size():
        what = f"parameter {name!r}" if name else f"a parameter of shape {tuple(p.shape)}"
        raise UnsupportedParameterError(
            f"{what} is a DTensor on a {mesh.ndim}-D device mesh of {mesh.size()} ranks; the optimizer "
            f"splits its work over all {dist.get_world_size()} ranks and supports FSDP2 on a 1-D mesh "
            "(fully_shard over every rank) and DDP. HSDP and tensor parallelism are not supported"
        )


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank: a DTensor is all-gathered (a collective: every rank must call
    it for the same tensors in the same order); a plain tensor is returned as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(whole: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``whole`` (a tensor of ``p``'s global shape) in ``p``'s layout: the local
    shard for a DTensor ``p`` (a slice, no communication; empty where the shard is), else ``whole``."""
    if not is_dtensor(p):
        return whole
    mesh = p.device_mesh
    replicated = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, p.placements).to_local()


def gather_shards(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which ``t`` is this rank's shard, laid out as DTensor ``p`` (a collective)."""
    if not is_dtensor(p):
        return t
    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride()).full_tensor()


def assign_owners(items: list[tuple[object, int, float]], world: int) -> list[int]:
    """An owner rank per item ``(bucket key, blocks, cost per block)``, the same on every rank.

    Buckets (same-shape matrices, shared with one all-gather padded to the largest contribution) are
    dealt largest total cost first; within a bucket, the items with most blocks first, each to the
    rank holding the fewest of the bucket's blocks so far (so little padding is sent), ties broken by
    the least total cost so far (so ranks do about the same work: an eigendecomposition of a
    3072 x 3072 factor costs 64 times one of a 768 x 768 factor)."""
    load = [0.0] * world
    owners = [0] * len(items)
    buckets: dict[object, list[int]] = {}
    for i, (key, _, _) in enumerate(items):
        buckets.setdefault(key, []).append(i)
    total = {key: sum(items[i][1] * items[i][2] for i in idx) for key, idx in buckets.items()}
    for key in sorted(buckets, key=lambda k: -total[k]):
        held = [0] * world
        for i in sorted(buckets[key], key=lambda i: -items[i][1]):
            rank = min(range(world), key=lambda r: (held[r], load[r]))
            owners[i] = rank
            held[rank] += items[i][1]
            load[rank] += items[i][1] * items[i][2]
    return owners


def all_gather_blocks(owned: torch.Tensor, blocks_per_rank: list[int]) -> list[torch.Tensor]:
    """Every rank's stack of updates (rank r's has ``blocks_per_rank[r]`` blocks), from this rank's
    ``owned`` stack: one all-gather, each contribution padded to the largest."""
    most = max(blocks_per_rank)
    send = owned
    if owned.shape[0] < most:
        send = torch.cat([owned, owned.new_zeros((most - owned.shape[0], *owned.shape[1:]))])
    received = [torch.empty_like(send) for _ in blocks_per_rank]
    dist.all_gather(received, send.contiguous())
    return [r[:k] for r, k in zip(received, blocks_per_rank)]


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def broadcast_(t: torch.Tensor, src: int) -> torch.Tensor:
    dist.broadcast(t, src)
    return t


def all_gather_objects(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank() -> int:
    return dist.get_rank()
