"""The in-memory dataset type shared by all loaders."""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from dpbench.errors import ConfigError, DataError


@dataclass
class TextClassificationData:
    """Parallel lists of texts and integer labels; ``text_b`` is None for single-sentence tasks."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list[int]

    def __post_init__(self) -> None:
        n = len(self.labels)
        if len(self.text_a) != n or (self.text_b is not None and len(self.text_b) != n):
            raise DataError(
                f"text_a/text_b/labels have different lengths ({len(self.text_a)}, "
                f"{None if self.text_b is None else len(self.text_b)}, {n}); "
                "build TextClassificationData from parallel lists"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None, seed: int) -> TextClassificationData:
        """A random subset of ``n`` examples drawn without replacement (kept in original order).

        ``n`` None or >= len(self) returns ``self`` unchanged.
        """
        idx = subset_indices(len(self), n, seed)
        return self if idx is None else self._take(idx)


    def split_off(self, n: int, seed: int) -> tuple[TextClassificationData, TextClassificationData]:
        """(the rest, a seeded random ``n`` held out): a tuning split carved from the training set."""
        if not 0 < n < len(self):
            raise ConfigError(f"task.holdout_examples must be in [1, {len(self) - 1}] (got {n})")
        held = set(subset_indices(len(self), n, seed) or [])
        keep = [i for i in range(len(self)) if i not in held]
        return self._take(keep), self._take(sorted(held))

    def split_by_hash(self, fraction: float, seed: int) -> tuple[TextClassificationData, TextClassificationData]:
        """(the rest, about ``fraction`` of the examples held out): each example's side is fixed by a seeded hash
        of the example itself against a cut that depends on ``fraction`` only.

        Adding or removing one example moves no other between the two sides, so a mechanism on the rest
        and one on the held-out part compose example by example (what private tuning's score needs;
        :meth:`split_off`'s exact-size split reshuffles every example when the set's size changes)."""
        if not 0 < fraction < 1:
            raise ConfigError(f"tuning.holdout_fraction must be in (0, 1) (got {fraction})")
        cut = fraction * 2**64
        held = [i for i in range(len(self)) if _example_hash(self, i, seed) < cut]
        keep = sorted(set(range(len(self))) - set(held))
        return self._take(keep), self._take(held)

    def _take(self, idx: list[int]) -> TextClassificationData:
        return TextClassificationData(
            text_a=[self.text_a[i] for i in idx],
            text_b=None if self.text_b is None else [self.text_b[i] for i in idx],
            labels=[self.labels[i] for i in idx],
        )


def subset_indices(size: int, n: int | None, seed: int) -> list[int] | None:
    """Sorted indices of a seeded random subset of ``n`` of ``size`` items; None when ``n`` is None or
    covers everything (the caller keeps the whole set)."""
    if n is None or n >= size:
        return None
    if n < 1:
        raise ConfigError(f"subset size must be >= 1 (got {n}); use null for the full dataset")
    return sorted(random.Random(seed).sample(range(size), n))


def _example_hash(data: TextClassificationData, i: int, seed: int) -> int:
    b = "" if data.text_b is None else data.text_b[i]
    key = f"{seed}\x1f{data.text_a[i]}\x1f{b}\x1f{data.labels[i]}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
