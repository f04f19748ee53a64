"""Batch samplers: Poisson sampling for DP-SGD, shuffled fixed-size batches for non-private baselines.

Privacy argument: the accountant (:mod:`dpbench.privacy.accounting`) analyses the Poisson-subsampled Gaussian
mechanism, i.e. every logical batch contains each example independently with probability ``sample_rate``, so batch
sizes vary and batches can be empty. :class:`PoissonBatchSampler` implements exactly that; shuffling into fixed-size
batches would *not* match the accounting and is only used for non-private runs.

Both samplers are deterministic functions of ``(seed, step)``: batch ``k`` uses a generator seeded from the pair, so
resuming needs only the number of batches already consumed (``state_dict``), also when a DataLoader prefetches.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from dpbench.errors import ConfigError


def _generator(seed: int, *key: int) -> torch.Generator:
    """A torch generator seeded from ``(seed, *key)`` via numpy's SeedSequence (independent streams per key)."""
    state = np.random.SeedSequence(seed, spawn_key=key).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class _StepSampler(Sampler[list[int]]):
    """Common part: ``steps`` batches, batch ``k`` a deterministic function of (seed, k); resumable by count."""

    def __init__(self, num_samples: int, steps: int, seed: int) -> None:
        if num_samples < 1:
            raise ConfigError(f"sampler needs num_samples >= 1 (got {num_samples}); check the training split")
        if steps < 0:
            raise ConfigError(f"sampler needs steps >= 0 (got {steps})")
        if seed < 0:
            raise ConfigError(f"sampler seed must be >= 0 (got {seed})")
        self.num_samples, self.steps, self.seed = int(num_samples), int(steps), int(seed)
        self._yielded = 0  # batches handed out by the current iteration
        self._resume_at = 0  # where the next iteration starts (set by load_state_dict)

    def _batch(self, step: int) -> list[int]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        """Batch k of the whole dataset; under data parallelism each rank yields its slice ``[rank::world]``
        of the same logical batch (the process group is read when iteration starts)."""
        from dpbench.privacy.distributed import rank_world

        rank, world = rank_world()
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        for step in range(start, self.steps):
            batch = self._batch(step)[rank::world]
            self._yielded = step + 1
            yield batch

    def __len__(self) -> int:
        return self.steps

    def state_dict(self) -> dict:
        """``{"seed", "num_batches_yielded"}``. To resume from a count of *consumed* batches instead (e.g. when a
        DataLoader prefetches), pass ``{"num_batches_yielded": global_step}`` to :meth:`load_state_dict`."""
        return {"seed": self.seed, "num_batches_yielded": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        """Make the next iteration continue after ``state["num_batches_yielded"]`` batches (then restart from 0)."""
        if state.get("seed", self.seed) != self.seed:
            raise ConfigError(f"sampler state was saved with seed {state['seed']}, not {self.seed}; resume with "
                              f"the original seed")
        k = int(state["num_batches_yielded"])
        if not 0 <= k <= self.steps:
            raise ConfigError(f"sampler state has {k} batches yielded, outside [0, {self.steps}]")
        self._yielded = self._resume_at = k


class PoissonBatchSampler(_StepSampler):
    """Each of ``steps`` logical batches includes every index independently with probability ``sample_rate`` (the q
    the accountant uses). Batches can be empty (yielded as ``[]``); indices in a batch are sorted."""

    def __init__(self, num_samples: int, sample_rate: float, steps: int, seed: int) -> None:
        if not 0 < sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1] (got {sample_rate}); use batch_size / dataset_size")
        super().__init__(num_samples, steps, seed)
        self.sample_rate = float(sample_rate)

    def _batch(self, step: int) -> list[int]:
        mask = torch.rand(self.num_samples, generator=_generator(self.seed, step)) < self.sample_rate
        return mask.nonzero().flatten().tolist()


class ShuffleBatchSampler(_StepSampler):
    """Non-private baseline: fixed-size batches from epochs reshuffled with a seeded permutation; ``steps`` batches in
    total. Without ``drop_last`` the last batch of each epoch is smaller when ``batch_size`` does not divide it."""

    def __init__(self, num_samples: int, batch_size: int, steps: int, seed: int, drop_last: bool = False) -> None:
        super().__init__(num_samples, steps, seed)
        if batch_size < 1 or (drop_last and batch_size > num_samples):
            raise ConfigError(f"batch_size must be in [1, {num_samples}] with drop_last (got {batch_size})"
                              if drop_last else f"batch_size must be >= 1 (got {batch_size})")
        self.batch_size, self.drop_last = int(batch_size), bool(drop_last)
        n, b = self.num_samples, self.batch_size
        self.batches_per_epoch = n // b if drop_last else -(-n // b)
        self._epoch: tuple[int, torch.Tensor] | None = None  # cached (epoch, permutation)

    def _batch(self, step: int) -> list[int]:
        epoch, j = divmod(step, self.batches_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, torch.randperm(self.num_samples, generator=_generator(self.seed, epoch)))
        return self._epoch[1][j * self.batch_size:(j + 1) * self.batch_size].tolist()


def microbatch_slices(n: int, physical_batch_size: int) -> list[slice]:
    """Consecutive slices covering ``range(n)``, each at most ``physical_batch_size`` long (``n == 0`` gives ``[]``).

    A logical (Poisson) batch is processed in such physical micro-batches; per-example gradients are clipped and
    summed across them before noise is added once, so splitting does not change the mechanism.
    """
    if physical_batch_size < 1:
        raise ConfigError(f"physical_batch_size must be >= 1 (got {physical_batch_size})")
    if n < 0:
        raise ConfigError(f"batch size must be >= 0 (got {n})")
    return [slice(i, min(i + physical_batch_size, n)) for i in range(0, n, physical_batch_size)]
