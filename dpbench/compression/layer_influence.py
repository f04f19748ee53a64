"""Which teacher layers a shallower student keeps: ShortGPT's Block Influence (Men et al., 2024).

A layer's influence is 1 − the mean cosine similarity of the hidden state entering and leaving it, over the
tokens of some calibration text: a layer that barely turns the residual stream is the cheapest to remove.
Keeping the ``k`` most influential layers (in model order) gives a far better start than every other layer:
on SmolLM2-135M, 15 of 30 layers kept by influence score perplexity 493 on public MNLI text before any
training, every other layer 693,579 (docs/distildp.md). Hugging Face's last hidden state comes after the
final norm, so the last layer always scores high and is kept; removing it is catastrophic anyway.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def block_influence(model: nn.Module, input_ids: Tensor) -> list[float]:
    """Each transformer layer's Block Influence on ``input_ids`` (B, T), in model order."""
    was_training = model.training
    model.eval()
    try:
        hidden = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    finally:
        model.train(was_training)
    return [float(1 - F.cosine_similarity(a, b, dim=-1).mean()) for a, b in zip(hidden[:-1], hidden[1:])]


def most_influential(influence: Sequence[float], k: int) -> list[int]:
    """The indices of the ``k`` largest influences, in model order (ties: the earlier layer)."""
    if not 1 <= k <= len(influence):
        raise ValueError(f"cannot keep {k} of {len(influence)} layers; choose 1..{len(influence)}")
    ranked = sorted(range(len(influence)), key=lambda i: (-influence[i], i))
    return sorted(ranked[:k])
