"""Samplers: Poisson statistics, determinism, resume; shuffled baseline; micro-batch slices."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dpbench.errors import ConfigError
from dpbench.privacy.sampling import PoissonBatchSampler, ShuffleBatchSampler, microbatch_slices


def test_poisson_batch_sizes_and_inclusion_rates():
    n, q, steps = 1000, 0.05, 400
    batches = list(PoissonBatchSampler(n, q, steps, seed=0))
    sizes = np.array([len(b) for b in batches])
    # Batch size ~ Binomial(n, q): mean within 5 standard errors, variance within +-35% (5 sd of a sample variance).
    assert abs(sizes.mean() - n * q) < 5 * math.sqrt(n * q * (1 - q) / steps)
    assert 0.65 < sizes.var(ddof=1) / (n * q * (1 - q)) < 1.35
    # Per-index inclusion counts ~ Binomial(steps, q), independently across indices.
    counts = np.bincount(np.concatenate([np.asarray(b, dtype=int) for b in batches]), minlength=n)
    assert abs(counts.mean() / steps - q) < 5 * math.sqrt(q * (1 - q) / (steps * n))
    assert 0.8 < counts.var(ddof=1) / (steps * q * (1 - q)) < 1.25
    for b in batches:
        assert b == sorted(set(b)) and all(0 <= i < n for i in b)


def test_poisson_empty_batches_are_empty_lists():
    batches = list(PoissonBatchSampler(10, 0.05, 100, seed=1))  # P(empty) = 0.95**10 ~ 0.6
    empty = [b for b in batches if not b]
    assert 30 < len(empty) < 90
    assert all(b == [] and isinstance(b, list) for b in empty)


def test_poisson_full_batch():
    assert list(PoissonBatchSampler(7, 1.0, 3, seed=0)) == [list(range(7))] * 3


def test_poisson_determinism_and_len():
    a = PoissonBatchSampler(500, 0.02, 50, seed=7)
    assert len(a) == 50
    first = list(a)
    assert len(first) == 50
    assert list(a) == first  # iterating again restarts the same stream
    assert list(PoissonBatchSampler(500, 0.02, 50, seed=7)) == first
    assert list(PoissonBatchSampler(500, 0.02, 50, seed=8)) != first


@pytest.mark.parametrize("make", [
    lambda: PoissonBatchSampler(300, 0.03, 40, seed=3),
    lambda: ShuffleBatchSampler(23, 5, 40, seed=3),
    lambda: ShuffleBatchSampler(23, 5, 40, seed=3, drop_last=True),
])
@pytest.mark.parametrize("k", [0, 1, 17, 40])
def test_resume_continues_the_same_sequence(make, k):
    uninterrupted = list(make())
    interrupted = make()
    head = list(itertools.islice(iter(interrupted), k))
    state = interrupted.state_dict()
    assert state["num_batches_yielded"] == k
    resumed = make()
    resumed.load_state_dict(state)
    assert head + list(resumed) == uninterrupted
    assert list(resumed) == uninterrupted  # the resume applies to one iteration only


def test_resume_rejects_other_seed():
    sampler = PoissonBatchSampler(10, 0.5, 5, seed=1)
    with pytest.raises(ConfigError):
        sampler.load_state_dict({"seed": 2, "num_batches_yielded": 1})
    with pytest.raises(ConfigError):
        sampler.load_state_dict({"seed": 1, "num_batches_yielded": 6})


def test_shuffle_epochs_are_permutations():
    n, b = 10, 3
    batches = list(ShuffleBatchSampler(n, b, steps=8, seed=0))
    assert [len(x) for x in batches] == [3, 3, 3, 1] * 2
    epochs = [sum(batches[:4], []), sum(batches[4:], [])]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled
    dropped = list(ShuffleBatchSampler(n, b, steps=6, seed=0, drop_last=True))
    assert [len(x) for x in dropped] == [3] * 6
    assert list(ShuffleBatchSampler(n, b, steps=8, seed=0)) == batches


@pytest.mark.parametrize("make", [
    lambda: PoissonBatchSampler(10, 0.0, 5, seed=0),
    lambda: PoissonBatchSampler(10, 1.5, 5, seed=0),
    lambda: PoissonBatchSampler(0, 0.5, 5, seed=0),
    lambda: PoissonBatchSampler(10, 0.5, -1, seed=0),
    lambda: PoissonBatchSampler(10, 0.5, 5, seed=-1),
    lambda: ShuffleBatchSampler(10, 0, 5, seed=0),
    lambda: ShuffleBatchSampler(10, 11, 5, seed=0, drop_last=True),
])
def test_sampler_bad_inputs(make):
    with pytest.raises(ConfigError):
        make()


def test_microbatch_slices():
    assert microbatch_slices(0, 4) == []
    assert microbatch_slices(3, 10) == [slice(0, 3)]
    assert microbatch_slices(8, 4) == [slice(0, 4), slice(4, 8)]
    assert microbatch_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert microbatch_slices(5, 1) == [slice(i, i + 1) for i in range(5)]
    for n, p in itertools.product(range(12), range(1, 6)):
        slices = microbatch_slices(n, p)
        assert [i for s in slices for i in range(n)[s]] == list(range(n))
        assert all(0 < s.stop - s.start <= p for s in slices)
    with pytest.raises(ConfigError):
        microbatch_slices(4, 0)
    with pytest.raises(ConfigError):
        microbatch_slices(-1, 4)
