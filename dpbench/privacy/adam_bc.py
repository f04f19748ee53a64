"""DP-AdamBC (Tang, Shpilevskiy, Lécuyer, AAAI 2024, arXiv 2312.14334): Adam whose second moment has
the DP noise's variance removed.

Under DP each coordinate of the released gradient carries Gaussian noise of known variance
Φ² = (σC/B)² (per group under an allocation). Plain DP-Adam's v̂ then estimates g² + Φ², so where the
noise dominates every coordinate moves by about lr per step in a random direction. Here

    m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ),  θ ← θ − lr · ( m̂ / √max(v̂ − Φ², γ) + λθ ),

γ floors the corrected variance (a coordinate with no estimated signal then takes SGD-like steps of
lr/√γ · m̂). Φ² is a public function of (σ, C, B), so this is post-processing of the releases.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer


class AdamBC(Optimizer):
    """Adam with the noise variance ``noise_var()`` (one value per parameter, in gradient units)
    subtracted from its bias-corrected second moment and floored at ``gamma``."""

    def __init__(self, params: Iterable[Tensor], noise_var: Callable[[], list[float]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), gamma: float = 1e-8, weight_decay: float = 0.0) -> None:
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0 (got {gamma})")
        super().__init__(params, dict(lr=lr, betas=betas, gamma=gamma, weight_decay=weight_decay))
        self.noise_var = noise_var

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = closure() if closure is not None else None
        variances = iter(self.noise_var())
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                phi2 = next(variances)
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                state["step"] += 1
                t, m, v = state["step"], state["m"], state["v"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v / (1 - b2 ** t)).sub_(phi2).clamp_min_(group["gamma"]).sqrt_()
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - b1 ** t))
        return loss
