"""Data-parallel DP-SGD: every rank clips its share of the logical batch; the sums are all-reduced and the
noise is drawn once.

- **Sampling.** Every rank draws the same Poisson logical batch over the *whole* dataset, at the accountant's
  q: batch k depends only on (seed, k). Each rank then takes its slice ``batch[rank::world]``.
- **Per-sample clipping.** Each rank clips its own examples, so every example is clipped exactly once.
- **Noise.** N(0, σ²C²) is drawn on rank 0 only. The clipped sums, noise included, are then summed over the
  ranks. The released sum is therefore exactly the single-process one: Σᵢ clip(gᵢ) + N(0, σ²C²), with noise
  once per logical step, not once per rank.
- **Lightning.** :class:`PrivateDDPStrategy` is Lightning's DDP without the ``DistributedDataParallel``
  wrapper. The engine makes the gradients and the private optimizer reduces them, so nothing is reduced twice.
"""
from __future__ import annotations

from typing import Sequence

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensors: Sequence[Tensor]) -> None:
    """Sum ``tensors`` over the ranks, in place, in one flattened message (no-op for one process)."""
    import torch.distributed as dist

    if rank_world()[1] == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast(tensor: Tensor, src: int = 0) -> None:
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.broadcast(tensor, src)


class PrivateDDPStrategy(DDPStrategy):
    """Lightning's DDP with the model left unwrapped (see the module docstring)."""

    def _setup_model(self, model: nn.Module) -> nn.Module:  # the private optimizer all-reduces the sums itself
        return model

    def _register_ddp_hooks(self) -> None:
        return None
