"""The DP step: release the engine's gradient sum once per logical batch, then step.

For a logical batch L drawn by Poisson sampling with rate q (expected size B = q·n), the update
direction is ``(Σ_{i∈L} clip_C(gᵢ) + N(0, σ²C²·I)) / B``. Dividing by the *expected* size B (not
|L|) keeps the released quantity a Gaussian mechanism on the clipped sum with sensitivity C, which
is what the accountant (Poisson-subsampled Gaussian with σ, q) analyses. Noise is drawn once per
logical batch, also for an empty one.

Without a noise multiplier (non-private) the update is the plain mean over the batch.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from dpbench.privacy.engine.base import GradientEngine


class PrivateOptimizer(Optimizer):
    """Wraps ``optimizer``; works both closure-style (Lightning) and explicit.

    Explicit use: ``engine.accumulate(losses)`` for each micro-batch, then ``opt.step()``.
    Closure use: ``opt.step(closure)`` where the closure does the accumulation.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        engine: GradientEngine,
        *,
        noise_multiplier: float | None,
        expected_batch_size: float | None,
        generator: torch.Generator | None = None,
    ) -> None:
        private = noise_multiplier is not None
        if private and (expected_batch_size is None or expected_batch_size <= 0):
            raise ValueError("a private optimizer needs expected_batch_size > 0")
        self.optimizer = optimizer
        self.engine = engine
        self.noise_multiplier = noise_multiplier
        self.expected_batch_size = expected_batch_size
        self.generator = generator
        self.steps = 0
        self.last_batch_size = 0

    # -- the torch.optim.Optimizer surface, forwarded to the wrapped optimizer ----------------
    @property
    def param_groups(self):  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self):  # type: ignore[override]
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps,
                "generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = state["steps"]
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return f"PrivateOptimizer(σ={self.noise_multiplier}, B={self.expected_batch_size}, {self.optimizer!r})"

    # -- the step ------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_batch_size = self.engine.num_examples
        sums = self.engine.release()
        for p, s in zip(self.engine.params, sums):
            p.grad = self._privatize(s)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return loss

    def _privatize(self, summed: Tensor) -> Tensor:
        """In place on the engine's fresh sum: (Σ clip(gᵢ) + N(0, σ²C²)) / B, or the plain mean."""
        if self.noise_multiplier is None:
            return summed.div_(max(self.last_batch_size, 1))
        std = self.noise_multiplier * self.engine.clip_norm
        if std > 0:
            summed.add_(torch.empty_like(summed).normal_(0.0, std, generator=self.generator))
        return summed.div_(self.expected_batch_size)
