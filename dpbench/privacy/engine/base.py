"""The one interface for per-sample gradient engines.

An engine turns the per-sample losses of a physical micro-batch into the running sum
``Σᵢ clip(∇ℓᵢ)`` over the trainable parameters. It never adds noise and never touches the
optimizer: :class:`dpbench.privacy.optimizer.PrivateOptimizer` releases the sum once per
logical batch. Engines differ only in how they get the per-sample norms and the clipped sum.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


def clip_factors(norms: Tensor, clip_norm: float, mode: str = "flat") -> Tensor:
    """Per-sample scale cᵢ so that ‖cᵢ gᵢ‖ ≤ C.

    ``flat``: Abadi et al., cᵢ = min(1, C/‖gᵢ‖). ``automatic``: Bu et al. 2023, cᵢ = C/(‖gᵢ‖ + 0.01),
    which normalises every per-sample gradient (sensitivity is still C).
    """
    if mode == "flat":
        return (clip_norm / (norms + 1e-6)).clamp(max=1.0)
    if mode == "automatic":
        return clip_norm / (norms + 0.01)
    raise ValueError(f"unknown clipping mode {mode!r}; use 'flat' or 'automatic'")


class GradientEngine(ABC):
    """Accumulates a (clipped) gradient sum over micro-batches for ``model``'s trainable params."""

    name: str = "base"

    def __init__(self, model: nn.Module, clip_norm: float | None, clipping: str = "flat") -> None:
        self.model = model
        self.clip_norm = clip_norm
        self.clipping = clipping
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named_params:
            raise ValueError("the model has no trainable parameters")
        self.params = [p for _, p in self.named_params]
        self._sums: list[Tensor] | None = None
        self.num_examples = 0

    @property
    def module(self) -> nn.Module:
        """The module whose forward must be called (an engine may wrap the model)."""
        return self.model

    def accumulate(self, per_sample_losses: Tensor) -> Tensor:
        """Backward one micro-batch; add its clipped per-sample gradients to the sum.

        Returns the per-sample gradient norms before clipping (for logging), shape (B,).
        """
        if per_sample_losses.ndim != 1:
            raise ValueError("accumulate() expects one loss per example, shape (B,)")
        if self._sums is None:  # once per logical batch
            self._sums = [torch.zeros_like(p) for p in self.params]
        norms = self._add_clipped(per_sample_losses, self._sums)
        self.num_examples += per_sample_losses.shape[0]
        return norms

    def release(self) -> list[Tensor]:
        """Return the accumulated sums (zeros for an empty logical batch) and reset."""
        sums = self._sums if self._sums is not None else [torch.zeros_like(p) for p in self.params]
        self._sums, self.num_examples = None, 0
        return sums

    @abstractmethod
    def _add_clipped(self, per_sample_losses: Tensor, sums: list[Tensor]) -> Tensor:
        """Add Σᵢ cᵢ gᵢ of one micro-batch into ``sums`` (one per trainable param, in place);
        return the per-sample norms ‖gᵢ‖."""

    def close(self) -> None:
        """Remove hooks or wrappers, if any."""


class SumEngine(GradientEngine):
    """Non-private: the plain gradient sum (no clipping); the baseline's engine."""

    name = "none"

    def _add_clipped(self, per_sample_losses: Tensor, sums: list[Tensor]) -> Tensor:
        grads = torch.autograd.grad(per_sample_losses.sum(), self.params, allow_unused=True)
        for s, g in zip(sums, grads):
            if g is not None:
                s.add_(g)
        return torch.full((per_sample_losses.shape[0],), float("nan"))


def weighted_sum(per_sample: Tensor, factors: Tensor) -> Tensor:
    """Σᵢ factorsᵢ · per_sampleᵢ over the leading (batch) dimension."""
    return torch.einsum("b,b...->...", factors.to(per_sample.dtype), per_sample)
