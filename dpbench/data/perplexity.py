"""Perplexity of a causal LM on held-out texts, as DistilDP evaluates it.

The texts are joined with ``"\\n\\n"`` and tokenised once (with a leading BOS only if the tokenizer
adds one, no other special tokens), then cut into windows of ``window`` tokens starting every
``stride`` tokens (the Hugging Face perplexity guide's sliding window). The first window scores
all its predictable tokens; each later window scores only the tokens not scored before (its last
``end - previous_end``; ``stride`` of them except at the end), so with ``stride < window`` every
scored token has at least ``window - stride`` tokens of context, and with ``stride == window``
the windows are disjoint and the first token of each window goes unscored (no context). The
result is exp of the mean next-token NLL over all scored tokens (a token-level mean, not a mean of
per-window means).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from dpbench.data.generation import IGNORE_INDEX, adds_bos

TEXT_JOINER = "\n\n"


def nll_per_token(model: nn.Module, input_ids: Tensor, labels: Tensor | None = None,
                  attention_mask: Tensor | None = None) -> Tensor:
    """Next-token NLL, shape (B, T-1): entry t is ``-log p(labels[:, t+1] | input_ids[:, :t+1])``,
    0 where that label is -100. ``labels`` default to ``input_ids``; ``position_ids`` are
    always passed as ``arange(T)``. Computed in at least float32; no mode or grad changes."""
    labels = input_ids if labels is None else labels
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    logits = model(input_ids=input_ids, position_ids=pos, **kw).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return nll * keep


def sliding_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, target_len) per window over ``n`` tokens: tokens ``end - target_len .. end``
    of window ``[begin, end)`` are the ones it scores (HF perplexity-guide layout)."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
               window: int = 128, stride: int = 128, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) of ``texts`` under ``model`` (see the module docstring).

    The model runs in eval mode; its previous train/eval mode is restored afterwards.
    """
    if len(texts) == 0:
        raise ValueError("perplexity needs at least one text; check the eval split")
    if window < 2 or not 1 <= stride <= window or batch_size < 1:
        raise ValueError(f"need window >= 2, 1 <= stride <= window and batch_size >= 1 "
                         f"(got window={window}, stride={stride}, batch_size={batch_size})")
    ids = tokenizer(TEXT_JOINER.join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    if adds_bos(tokenizer):
        ids = [tokenizer.bos_token_id] + list(ids)
    if len(ids) < 2:
        raise ValueError(f"the texts give {len(ids)} token(s); perplexity needs at least 2")
    device = next(model.parameters()).device
    tokens = torch.tensor(ids, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        for group in _batches(sliding_windows(len(ids), window, stride), batch_size):
            inputs = torch.stack([tokens[b:e] for b, e, _ in group])
            labels = inputs.clone()
            for row, (b, e, target_len) in enumerate(group):
                labels[row, : e - b - target_len] = IGNORE_INDEX
            total += float(nll_per_token(model, inputs, labels).sum())
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return math.exp(total / count)


def _batches(windows: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows of equal length, at most ``batch_size`` per batch (no padding needed)."""
    out: list[list[tuple[int, int, int]]] = []
    for w in windows:
        if out and len(out[-1]) < batch_size and out[-1][0][1] - out[-1][0][0] == w[1] - w[0]:
            out[-1].append(w)
        else:
            out.append([w])
    return out
