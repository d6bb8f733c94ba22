"""A bucket: same-shape matrix blocks of one param group on one device, stacked for batched kernels."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

import torch

from .roles import to_blocks


@dataclass
class Bucket:
    """Same-shape (m x n) matrix blocks of one param group on one device, stacked for batched kernels."""

    group: dict
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    states: list[dict]
    counts: list[int]  # blocks per parameter
    block_shape: tuple[int, int]  # (m, n): rows (fan-out) x columns (fan-in)
    device: torch.device
    x: torch.Tensor = field(init=False)  # (blocks, m, n) stacked momentum (or Nesterov mix)
    offsets: list[int] = field(init=False)

    def __post_init__(self):
        self.offsets = [0, *accumulate(self.counts)][:-1]

    def stack(self, tensors: list[torch.Tensor], dtype=torch.float32) -> torch.Tensor:
        """Stack per-parameter tensors (storage layout) into logical (blocks, m, n) form."""
        layout, split = self.group["layout"], self.group["split"]
        out = torch.empty((sum(self.counts), *self.block_shape), dtype=dtype, device=self.device)
        for t, o, k in zip(tensors, self.offsets, self.counts):
            out[o : o + k].copy_(to_blocks(t, layout, split))
        return out

    def rows(self, indices: list[int]) -> torch.Tensor:
        """Block indices (into the stack) of the given parameters."""
        return torch.cat([torch.arange(self.offsets[i], self.offsets[i] + self.counts[i], device=self.device)
                          for i in indices])
