"""Unstructured magnitude pruning with ``torch.nn.utils.prune`` masks, and sparsity measurements.

Prunable weights are the transformer's Linear/Conv1D weights (attention and feed-forward); the
embeddings, norms, pooler and task head stay dense. Masks are computed on the effective weights
(weight_orig ⊙ mask), so pruning again only adds zeros, and are applied with
``prune.custom_from_mask``: the model then trains ``weight_orig`` and the mask holds at every step.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import prune
from transformers.pytorch_utils import Conv1D

from dpbench.choices import PRUNE_SCOPES
from dpbench.methods.finetune import is_head

SCOPES = PRUNE_SCOPES


def prunable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear/Conv1D outside the task head and the pooler."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and not is_head(n) and "pooler" not in n.split(".")]


def _prune_lowest(scores: Tensor, k: int) -> Tensor:
    """A 0/1 mask (flat) that zeroes exactly the k lowest scores (ties broken by position)."""
    mask = torch.ones_like(scores)
    if k > 0:
        mask[torch.topk(scores, k, largest=False, sorted=False).indices] = 0
    return mask


def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "global") -> None:
    """Zero the smallest-magnitude prunable weights until ``ceil(sparsity · count)`` are pruned —
    over all prunable weights together (``global``) or in each module (``layer``). Cumulative."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in SCOPES:
        raise ValueError(f"unknown pruning scope {scope!r}; choose one of: {', '.join(SCOPES)}")
    modules = [m for _, m in prunable_modules(model)]
    if not modules:
        raise ValueError("the model has no prunable Linear/Conv1D weights")
    with torch.no_grad():
        weights = [m.weight.detach().abs().flatten() for m in modules]  # effective weights (masked)
        if scope == "global":
            flat = torch.cat(weights)
            masks = _prune_lowest(flat, math.ceil(sparsity * flat.numel() - 1e-9)).split([w.numel() for w in weights])
        else:
            masks = [_prune_lowest(w, math.ceil(sparsity * w.numel() - 1e-9)) for w in weights]
    for m, mask in zip(modules, masks):
        prune.custom_from_mask(m, "weight", mask.view_as(m.weight))


def make_permanent(model: nn.Module) -> None:
    """Fold every mask into its weight (``prune.remove``): plain, sparse Linear weights remain."""
    for _, m in prunable_modules(model):
        if prune.is_pruned(m) and hasattr(m, "weight_orig"):
            prune.remove(m, "weight")


def measure_sparsity(model: nn.Module) -> dict[str, float | int]:
    """Zeros among the prunable weights and among all parameters (effective, masked values)."""
    prunable = [m.weight.detach() for _, m in prunable_modules(model)]
    p_total = sum(w.numel() for w in prunable)
    p_zero = sum(int((w == 0).sum()) for w in prunable)
    seen: set[int] = set()
    a_total = a_zero = 0
    for m in model.modules():
        for pname, p in m.named_parameters(recurse=False):
            t = getattr(m, "weight") if pname == "weight_orig" else p  # the masked value
            if id(p) in seen:
                continue
            seen.add(id(p))
            a_total += t.numel()
            a_zero += int((t.detach() == 0).sum())
    return {"sparsity": p_zero / max(p_total, 1), "prunable_params": p_total, "prunable_zeros": p_zero,
            "sparsity_all": a_zero / max(a_total, 1), "params_total": a_total, "params_nonzero": a_total - a_zero}


def sparsity_schedule(target: float, iterations: int) -> list[float]:
    """Cumulative sparsities of iterative pruning: each round removes the same fraction of what
    remains, ending exactly at ``target`` — sᵢ = 1 − (1 − target)^(i/k)."""
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    return [1 - (1 - target) ** (i / iterations) for i in range(1, iterations)] + [target]
