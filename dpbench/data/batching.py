"""Physical micro-batches cut from a logical batch by length, and evaluation batches by length.

A logical batch arrives right-padded to its longest sequence. :func:`microbatches` orders its
examples by length (longest first) and cuts micro-batches of at most ``max_examples`` examples and,
optionally, at most ``max_tokens`` padded tokens, each trimmed to its own longest sequence. On
SST-2 that computes ~1.1× the real tokens instead of ~4.3× (a Poisson batch of ~1000 nearly always
holds one sentence near the length cut).

Privacy: the cut changes which micro-batch an example is processed in and how many padding
columns it carries, nothing else. Padding is masked (attention mask, labels of -100), so every
example's loss, per-sample gradient and clipped gradient are unchanged, and the engine's clipped sum
over the logical batch is the same sum (added in another order). The logical batch itself, what the
accountant sees (Poisson, rate q), is untouched, and the optimizer still adds the noise once to its
clipped sum. ``tests/data/test_batching.py`` checks the sum against the unsorted path in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from dpbench.errors import ConfigError, DataError
from dpbench.privacy.sampling import microbatch_slices


@dataclass(frozen=True)
class MicroBatching:
    """How a logical batch is cut: ``max_examples`` per micro-batch, optionally ``max_tokens`` padded
    tokens per micro-batch, and ``by_length`` (False: consecutive slices of the logical batch padded
    to its longest, the old behaviour, kept for comparisons)."""

    max_examples: int
    max_tokens: int | None = None
    by_length: bool = True

    def __post_init__(self) -> None:
        if self.max_examples < 1:
            raise ConfigError(f"privacy.physical_batch_size must be >= 1 (got {self.max_examples})")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"privacy.physical_batch_tokens must be >= 1 or null (got {self.max_tokens})")


def lengths(batch: dict[str, Tensor]) -> Tensor:
    """Real (unpadded) length of each row, from the attention mask, shape (B,)."""
    return batch["attention_mask"].sum(1)


def _rows(batch: dict[str, Tensor], index: Tensor | slice, width: int | None) -> dict[str, Tensor]:
    """Rows ``index`` of every tensor; (B, T, ...) tensors also cut to their first ``width`` columns."""
    t = batch["attention_mask"].shape[1]
    out = {}
    for k, v in batch.items():
        v = v[index]
        if width is not None and v.dim() >= 2 and v.shape[1] == t:
            v = v[:, :width]
        out[k] = v
    return out


def group_by_length(lens: Sequence[int], max_examples: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices ordered by length (longest first, ties in index order), cut into groups of at most
    ``max_examples`` whose padded size (count × longest) stays within ``max_tokens``; an example
    longer than ``max_tokens`` is a group of its own."""
    order = sorted(range(len(lens)), key=lambda i: -int(lens[i]))
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if (g is None or len(g) >= max_examples
                or (max_tokens is not None and (len(g) + 1) * int(lens[g[0]]) > max_tokens)):
            groups.append([i])
        else:
            g.append(i)
    return groups


def microbatches(batch: dict[str, Tensor], cut: MicroBatching) -> list[dict[str, Tensor]]:
    """The physical micro-batches of one right-padded logical batch (``[]`` for an empty one)."""
    n = batch["attention_mask"].shape[0]
    if n == 0:
        return []
    if not cut.by_length:
        return [_rows(batch, sl, None) for sl in microbatch_slices(n, cut.max_examples)]
    lens = lengths(batch)
    out = []
    for group in group_by_length(lens.tolist(), cut.max_examples, cut.max_tokens):
        index = torch.tensor(group, dtype=torch.long, device=lens.device)
        width = max(int(lens[group[0]]), 1)
        if bool(batch["attention_mask"][index, width:].any()):
            raise DataError("a batch is not right-padded (attention mask has ones after its padding); "
                            "pad on the right (tokenizer.padding_side='right')")
        out.append(_rows(batch, index, width))
    return out


def eval_batches(lens: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches of ``batch_size`` indices grouped by length (each padded to its own longest);
    every index appears exactly once, so order-free metrics (accuracy, F1, MCC, perplexity) are unchanged."""
    if batch_size < 1:
        raise ConfigError(f"trainer.eval_batch_size must be >= 1 (got {batch_size})")
    return group_by_length(lens, batch_size)
