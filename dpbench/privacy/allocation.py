"""ANADP's adaptive noise allocation (Li et al., Findings of EMNLP 2024), with its privacy argument.

The trainable parameters are split into K groups (one layer or one PEFT module each). Every example's
gradient is clipped *per group*: its part in group k is scaled to norm ≤ Cₖ, with Σₖ Cₖ² = C². Group k's
clipped sum gets Gaussian noise N(0, σₖ²Cₖ²·I).

Privacy. Rescale group k's release by 1/(σₖCₖ): it becomes Sₖ/(σₖCₖ) + N(0, I), and one example moves
Sₖ/(σₖCₖ) by at most 1/σₖ. Together, the rescaled release is one Gaussian mechanism with unit noise and
L2 sensitivity (Σₖ σₖ⁻²)^½. So the whole step is a Gaussian mechanism with noise multiplier
σ_eff = (Σₖ σₖ⁻²)^(-1/2). The rescaling is invertible and public. Under Poisson sampling with rate q,
the step is the subsampled Gaussian mechanism with σ_eff, which is what the accountant is fed.

The allocation keeps Σₖ σₖ⁻² = σ⁻² at every step: σₖ = σ/√wₖ, with weights wₖ > 0 and Σₖ wₖ = 1.
Here σ is the multiplier calibrated for the target ε. So σ_eff = σ always, and ANADP spends exactly the
privacy of uniform DP-SGD with the same σ, q and steps. More important groups get a larger wₖ and
therefore less noise. Both the weights and the bounds Cₖ are computed only from released quantities:
the privatised gradients g̃, the parameters (earlier releases) and, with adaptive bounds, the
privatised counts below. That makes them post-processing.

Bounds Cₖ. Fixed at the start (equal, C/√K, or ∝ √(group size)), or adaptive (``clip_quantile`` γ,
Andrew et al. 2021 per group): each step also releases, per group, the number bₖ of examples whose
part in group k was not clipped, with noise N(0, σ_b²). One example changes every bₖ by at most 1,
so after rescaling by 1/σ_b the counts add K·σ_b⁻² to the squared sensitivity. The step is then one
Gaussian mechanism with σ_eff = (Σₖ σₖ⁻² + K·σ_b⁻²)^(-1/2), and the allocation keeps it equal to σ by
giving the gradients σ_g = (σ⁻² − K·σ_b⁻²)^(-1/2) (σₖ = σ_g/√wₖ) with σ_b = σ·√(K/s) for a share s of
σ⁻² spent on the counts. The bounds follow Cₖ ← Cₖ·exp(−η(b̃ₖ/B − γ)) (B the expected batch size),
so each tends to the γ-quantile of its group's per-sample norms. The rescaling argument holds for any
Cₖ fixed before the step, so no constraint on Σ Cₖ² is needed once the bounds adapt.

(With one global clip C and unequal σₖ, an example could put all its gradient norm into the
least-noised group. The guarantee would then be only that group's σ, which is why clipping is per
group.)

Importance, as in AdaLoRA/ANADP: the sensitivity I = |θ ⊙ g̃| elementwise. Keep exponential moving
averages Ī ← β₁Ī + (1−β₁)I and Ū ← β₂Ū + (1−β₂)|I − Ī|. Group k's score sₖ is the mean over the group
of Ī ⊙ Ū. The weights are w = (1 − ρ)·s^(1/τ)/Σ s^(1/τ) + ρ/K, with temperature τ and uniform share ρ,
after ``warmup_steps`` steps of uniform w = 1/K.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from dpbench.choices import CLIP_SPLITS, GRANULARITIES

_LORA_TAIL = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B)\.[^.]+$")
_BLOCK = re.compile(r"^(.*?\.(?:layer|layers|h|block)\.\d+)\.")


def group_names(param_names: Sequence[str], granularity: str = "module") -> tuple[list[int], list[str]]:
    """Group index of each parameter and the groups' names. ``module``: the layer owning it (a PEFT
    LoRA module's A and B matrices are one group); ``block``: the transformer block (other
    parameters by module)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    keys = []
    for name in param_names:
        owner = _LORA_TAIL.sub("", name.rsplit(".", 1)[0])
        block = _BLOCK.match(name) if granularity == "block" else None
        keys.append(block.group(1) if block else owner)
    names = list(dict.fromkeys(keys))
    index = {k: i for i, k in enumerate(names)}
    return [index[k] for k in keys], names


@dataclass(frozen=True)
class AllocationConfig:
    warmup_steps: int = 10      # uniform allocation for the first steps
    beta1: float = 0.85         # EMA of the sensitivity |θ ⊙ g̃|
    beta2: float = 0.85         # EMA of its uncertainty |I − Ī|
    temperature: float = 1.0    # τ: w ∝ s^(1/τ); larger is closer to uniform
    uniform_share: float = 0.5  # ρ: part of the weights kept uniform, so no group is starved
    clip_split: str = "equal"   # Cₖ = C/√K (equal) or C·√(dₖ/d) (size)
    groups: str = "module"      # one group per layer / PEFT module (module) or per transformer block (block)
    clip_quantile: float | None = None  # γ: adapt each Cₖ to this quantile of its norms (None: fixed Cₖ)
    clip_lr: float = 0.2        # η: geometric step of the bound update
    count_share: float = 0.1    # s: share of σ⁻² spent on the privatised unclipped counts

    def __post_init__(self) -> None:
        if self.groups not in GRANULARITIES:
            raise ValueError(f"groups must be one of {GRANULARITIES}, got {self.groups!r}")
        if self.clip_split not in CLIP_SPLITS:
            raise ValueError(f"clip_split must be one of {CLIP_SPLITS}, got {self.clip_split!r}")
        if not (0 < self.uniform_share <= 1 and self.temperature > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("need 0 < uniform_share <= 1, temperature > 0 and betas in [0, 1)")
        if self.clip_quantile is not None and not (0 < self.clip_quantile < 1 and self.clip_lr > 0
                                                   and 0 < self.count_share < 1):
            raise ValueError("need 0 < clip_quantile < 1, clip_lr > 0 and 0 < count_share < 1")


class NoiseAllocation:
    """Per-group clipping bounds Cₖ and noise multipliers σₖ with Σₖ σₖ⁻² = σ⁻²."""

    def __init__(self, group_of: Sequence[int], sizes: Sequence[int], sigma: float, clip_norm: float,
                 cfg: AllocationConfig = AllocationConfig()) -> None:
        self.group_of = list(group_of)           # parameter index → group
        self.k = max(self.group_of) + 1
        if sorted(set(self.group_of)) != list(range(self.k)):
            raise ValueError("every group 0..K-1 must hold at least one parameter")
        self.sigma, self.clip_norm, self.cfg = float(sigma), float(clip_norm), cfg
        group_sizes = torch.zeros(self.k, dtype=torch.float64)
        for g, n in zip(self.group_of, sizes):
            group_sizes[g] += n
        share = torch.full((self.k,), 1.0 / self.k, dtype=torch.float64) if cfg.clip_split == "equal" \
            else group_sizes / group_sizes.sum()
        self.clip_norms = clip_norm * share.sqrt()          # Σₖ Cₖ² = C² (at the start; adaptive ones move)
        self.adaptive = cfg.clip_quantile is not None and self.sigma > 0
        # σ_b (counts) and σ_g (gradients, before weights) with Σₖ σₖ⁻² + K·σ_b⁻² = σ⁻²
        self.count_sigma = self.sigma * math.sqrt(self.k / cfg.count_share) if self.adaptive else math.inf
        self.grad_sigma = self.sigma / math.sqrt(1 - cfg.count_share) if self.adaptive else self.sigma
        self.weights = torch.full((self.k,), 1.0 / self.k, dtype=torch.float64)
        self.steps = 0
        self._i_bar: list[Tensor] | None = None
        self._u_bar: list[Tensor] | None = None
        self.sigma_eff_history: list[float] = []

    def noise_multipliers(self) -> Tensor:
        """σₖ of each group's gradient sum."""
        return self.grad_sigma / self.weights.sqrt()

    def effective_noise_multiplier(self) -> float:
        """(Σₖ σₖ⁻² + K·σ_b⁻²)^(-1/2): the one number the accountant needs (no count term with fixed Cₖ)."""
        if self.sigma <= 0:
            return 0.0
        counts = self.k / self.count_sigma ** 2 if self.adaptive else 0.0
        return float((self.noise_multipliers().pow(-2).sum() + counts).pow(-0.5))

    def param_noise_stds(self) -> list[float]:
        """σₖCₖ for each parameter's group: the std of the Gaussian noise on its clipped sum."""
        std = (self.noise_multipliers() * self.clip_norms).tolist()
        return [std[g] for g in self.group_of]

    def state_dict(self) -> dict:
        """What a resumed run needs to continue the same allocation (all of it from released quantities)."""
        return {"weights": self.weights, "clip_norms": self.clip_norms, "steps": self.steps, "i_bar": self._i_bar,
                "u_bar": self._u_bar, "sigma_eff_history": list(self.sigma_eff_history)}

    def load_state_dict(self, state: dict) -> None:
        self.weights, self.clip_norms, self.steps = state["weights"], state["clip_norms"], int(state["steps"])
        self._i_bar, self._u_bar = state["i_bar"], state["u_bar"]
        self.sigma_eff_history = list(state["sigma_eff_history"])
        check_invariant(self)

    @torch.no_grad()
    def observe(self, params: Sequence[Tensor], released: Sequence[Tensor],
                unclipped: Tensor | None = None, expected_batch_size: float | None = None) -> None:
        """Update the importance from the released (privatised) gradients and set the next weights;
        with adaptive bounds, move each Cₖ by its privatised unclipped count ``unclipped``."""
        if self.adaptive:
            if unclipped is None or not expected_batch_size:
                raise ValueError("adaptive clipping bounds need the privatised counts and the expected batch size")
            frac = unclipped.double().cpu() / float(expected_batch_size)
            self.clip_norms = self.clip_norms * torch.exp(-self.cfg.clip_lr * (frac - self.cfg.clip_quantile))
        sens = [(p.detach() * g).abs().to(torch.float32) for p, g in zip(params, released)]
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        if self._i_bar is None:
            self._i_bar = [s.clone() for s in sens]
            self._u_bar = [torch.zeros_like(s) for s in sens]
        else:
            for i_bar, u_bar, s in zip(self._i_bar, self._u_bar, sens):
                i_bar.mul_(b1).add_(s, alpha=1 - b1)
                u_bar.mul_(b2).add_((s - i_bar).abs(), alpha=1 - b2)
        check_invariant(self)  # the step just released was the calibrated mechanism
        self.sigma_eff_history.append(self.effective_noise_multiplier())
        self.steps += 1
        if self.steps < self.cfg.warmup_steps:
            return
        score_sum = torch.zeros(self.k, dtype=torch.float64)
        count = torch.zeros(self.k, dtype=torch.float64)
        for g, i_bar, u_bar in zip(self.group_of, self._i_bar, self._u_bar):
            score_sum[g] += float((i_bar * u_bar).sum())
            count[g] += i_bar.numel()
        self.weights = allocation_weights(score_sum / count, self.cfg.temperature, self.cfg.uniform_share)


def allocation_weights(scores: Tensor, temperature: float, uniform_share: float) -> Tensor:
    """w = (1 − ρ)·s^(1/τ)/Σ s^(1/τ) + ρ/K: positive and summing to 1 for any scores ≥ 0."""
    k = scores.numel()
    s = scores.clamp(min=0).double()
    if not torch.isfinite(s).all() or float(s.sum()) <= 0:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    logs = s.clamp(min=torch.finfo(torch.float64).tiny).log() / temperature
    w = torch.softmax(logs, 0)
    return (1 - uniform_share) * w + uniform_share / k


def check_invariant(alloc: NoiseAllocation, rel: float = 1e-9) -> None:
    """Raise if the allocation's σ_eff differs from the calibrated σ, or (fixed bounds) Σ Cₖ² from C²."""
    eff = alloc.effective_noise_multiplier()
    if not math.isclose(eff, alloc.sigma, rel_tol=rel):
        raise AssertionError(f"σ_eff={eff} differs from the calibrated σ={alloc.sigma}")
    if not bool((alloc.clip_norms > 0).all() and torch.isfinite(alloc.clip_norms).all()):
        raise AssertionError(f"clipping bounds must be positive and finite, got {alloc.clip_norms.tolist()}")
    total = float(alloc.clip_norms.pow(2).sum().sqrt())
    if not alloc.adaptive and not math.isclose(total, alloc.clip_norm, rel_tol=rel):
        raise AssertionError(f"(Σ Cₖ²)^½={total} differs from the clipping norm C={alloc.clip_norm}")
