"""The one interface for per-sample gradient engines.

An engine turns the per-sample losses of a physical micro-batch into the running sum
``Σᵢ clip(∇ℓᵢ)`` over the trainable parameters. It never adds noise and never touches the
optimizer: :class:`dpbench.privacy.optimizer.PrivateOptimizer` releases the sum once per
logical batch. Engines differ only in how they get the per-sample norms and the clipped sum.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

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
        self._buffers: list[Tensor] | None = None
        self._sums: list[Tensor] | None = None
        self.num_examples = 0
        self.start_sums: Callable[[list[Tensor]], None] = _zero
        """Fills the sum buffers when a logical batch opens (zeros; the private optimizer draws its noise
        there, so the noise is added once per logical batch with no extra pass or temporary)."""

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
            self._sums = self._open_sums()
        norms = self._add_clipped(per_sample_losses, self._sums)
        self.num_examples += per_sample_losses.shape[0]
        return norms

    def release(self) -> list[Tensor]:
        """Return the accumulated sums (just ``start_sums``' fill for an empty logical batch) and reset.

        The tensors are the engine's persistent buffers: valid until the next logical batch opens."""
        sums = self._sums if self._sums is not None else self._open_sums()
        self._sums, self.num_examples = None, 0
        return sums

    def _open_sums(self) -> list[Tensor]:
        if self._buffers is None:  # allocated once: no page faults for fresh memory on every step
            self._buffers = [torch.empty_like(p) for p in self.params]
        self.start_sums(self._buffers)
        return self._buffers

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


def _zero(sums: list[Tensor]) -> None:
    for s in sums:
        s.zero_()


def add_weighted(out: Tensor, per_sample: Tensor, factors: Tensor) -> None:
    """out += Σᵢ factorsᵢ · per_sampleᵢ over the leading (batch) dimension, in place: one matrix-vector
    product, with no batch-sized temporary (``out`` contiguous, shaped like one per-sample slice)."""
    out.view(-1).addmv_(per_sample.reshape(per_sample.shape[0], -1).T, factors.to(per_sample.dtype))


def squared_norms(per_sample: Tensor) -> Tensor:
    """‖per_sampleᵢ‖² for each i of the leading (batch) dimension, with no batch-sized temporary."""
    return torch.linalg.vector_norm(per_sample.reshape(per_sample.shape[0], -1), dim=1).square()
