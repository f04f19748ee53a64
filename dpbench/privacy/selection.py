"""Private hyper-parameter selection: the privacy of running a random number of trials and releasing the best.

Papernot & Steinke (ICLR 2022, "Hyperparameter Tuning with Renyi Differential Privacy"): let every trial Q
(draw a configuration, train it with DP-SGD, score it with a DP score) be (λ, ε_Q(λ))-RDP. Run Q K times
with K drawn from a distribution independent of the data, and release only the best-scoring trial. Then:

* **truncated negative binomial** K ~ D(η, γ), η > −1, γ ∈ (0, 1) (η = 1: geometric; η = 0: logarithmic),
  their Theorem 2: for every λ > 1 and every λ̂ ≥ 1,
  ε'(λ) = ε_Q(λ) + (1 + η)(1 − 1/λ̂) ε_Q(λ̂) + (1 + η) log(1/γ) / λ̂ + log E[K] / (λ − 1);
* **Poisson** K ~ Poisson(μ) (K = 0 releases nothing), their Theorem 6: if Q is (ε̂, δ̂)-DP with
  e^ε̂ ≤ 1 + 1/(λ − 1), then ε'(λ) = ε_Q(λ) + μ δ̂ + log μ / (λ − 1).

The guarantee needs K kept secret: with K known the release is a best-of-k, whose privacy is up to k
times a trial's. So K, the other trials and every trial's seed are never released, and the K trials are
independent runs (each its own secret seed).
ε_Q is the pointwise maximum over the trial mechanisms the search space can produce (here: one, as
``dpbench-tune`` refuses search keys that change the mechanism) of its DP-SGD stages' RDP (Poisson-
subsampled Gaussian, Mironov et al. 2019, via opacus' analysis) plus the score's: a count of correct
held-out predictions (sensitivity 1) with N(0, s²) noise, λ / (2 s²). Training and score are composed
(summed), not treated as parallel, so the split's rule need not be argued. (ε, δ) follows from the RDP
curve by the conversion of Canonne, Kamath & Steinke (2020), as in opacus; ε is minimised over λ on a
grid, and the λ̂ term over a grid then refined with a bounded scalar search (any λ̂ gives a valid bound).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from dpbench.errors import PrivacyError
from dpbench.privacy.accounting import RDP_ORDERS, Stage

DISTRIBUTIONS = ("truncated_negative_binomial", "poisson")
ORDERS = np.array(sorted({*RDP_ORDERS, *range(64, 257, 8)}), dtype=float)  # λ > 1
_HAT_MAX = 1024.0


@dataclass(frozen=True)
class TrialCount:
    """The distribution of the number of trials K: ``truncated_negative_binomial`` (``eta``, ``gamma``)
    or ``poisson`` (``mu``)."""

    distribution: str
    eta: float | None = None
    gamma: float | None = None
    mu: float | None = None

    def __post_init__(self) -> None:
        if self.distribution == "truncated_negative_binomial":
            if self.eta is None or self.gamma is None or not (self.eta > -1 and 0 < self.gamma < 1):
                raise PrivacyError(f"a truncated negative binomial needs eta > -1 and 0 < gamma < 1 "
                                   f"(got eta={self.eta}, gamma={self.gamma})")
        elif self.distribution == "poisson":
            if self.mu is None or not self.mu > 0:
                raise PrivacyError(f"a Poisson number of trials needs mu > 0 (got mu={self.mu})")
        else:
            raise PrivacyError(f"unknown trial-count distribution '{self.distribution}'; "
                               f"choose one of: {', '.join(DISTRIBUTIONS)}")

    @classmethod
    def with_mean(cls, distribution: str, mean: float, eta: float = 0.0) -> TrialCount:
        """The distribution with E[K] = ``mean`` (for the truncated negative binomial, at shape ``eta``)."""
        if distribution == "poisson":
            return cls("poisson", mu=float(mean))
        if distribution != "truncated_negative_binomial":
            return cls(distribution)  # refused with its reason
        if not mean > 1 or not eta > -1:
            raise PrivacyError(f"a truncated negative binomial needs a mean > 1 and eta > -1 (got {mean}, {eta})")
        f = lambda t: _tnb_mean(eta, math.exp(t)) - mean  # noqa: E731 - decreasing in t = log γ
        lo, hi = -700.0, -1e-9
        if not f(lo) > 0 > f(hi):
            raise PrivacyError(f"no truncated negative binomial with eta={eta} has mean {mean}; raise eta")
        return cls(distribution, eta=float(eta), gamma=math.exp(brentq(f, lo, hi, xtol=1e-14, rtol=1e-14)))

    @property
    def mean(self) -> float:
        """E[K]."""
        return self.mu if self.distribution == "poisson" else _tnb_mean(self.eta, self.gamma)

    def sample(self, rng: np.random.Generator) -> int:
        """One draw of K (inverse CDF for the truncated negative binomial)."""
        if self.distribution == "poisson":
            return int(rng.poisson(self.mu))
        u, k, p = rng.random(), 1, _tnb_p1(self.eta, self.gamma)
        total = p
        while total < u and k < 10**7:
            p *= (1 - self.gamma) * (k + self.eta) / (k + 1)
            k += 1
            total += p
        return k

    def pmf(self, k: int) -> float:
        """P[K = k]."""
        if self.distribution == "poisson":
            return math.exp(k * math.log(self.mu) - self.mu - math.lgamma(k + 1))
        if k < 1:
            return 0.0
        p = _tnb_p1(self.eta, self.gamma)
        for j in range(1, k):
            p *= (1 - self.gamma) * (j + self.eta) / (j + 1)
        return p

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None} | {"mean_trials": self.mean}


def _tnb_mean(eta: float, gamma: float) -> float:
    if eta == 0:
        return (1 / gamma - 1) / math.log(1 / gamma)
    return eta * (1 - gamma) / (gamma * -math.expm1(eta * math.log(gamma)))


def _tnb_p1(eta: float, gamma: float) -> float:
    """P[K = 1]; P[K = k+1] = P[K = k]·(1 − γ)(k + η)/(k + 1)."""
    if eta == 0:
        return (1 - gamma) / math.log(1 / gamma)
    return eta * (1 - gamma) / math.expm1(-eta * math.log(gamma))


@dataclass(frozen=True)
class TrialMechanism:
    """What one trial releases: its DP-SGD stages and a noisy count (std ``score_noise``) of correct held-out
    predictions. ``score_noise = None``: the score is not private (then no selection bound holds)."""

    stages: tuple[Stage, ...]
    score_noise: float | None

    def rdp(self, orders: np.ndarray) -> np.ndarray:
        """ε_Q(λ) at ``orders`` (> 1)."""
        from opacus.accountants.analysis.rdp import compute_rdp  # lazy: opacus imports torch

        orders = np.atleast_1d(np.asarray(orders, dtype=float))
        out = np.zeros_like(orders)
        for s in self.stages:
            if s.active:
                out = out + np.asarray(compute_rdp(q=s.sample_rate, noise_multiplier=s.noise_multiplier,
                                                   steps=s.steps, orders=list(orders)), dtype=float)
        if self.score_noise is None:
            return np.full_like(orders, np.inf)
        return out + orders / (2 * self.score_noise**2)

    def to_dict(self) -> dict:
        return {"stages": [s.to_dict() for s in self.stages], "score_noise": self.score_noise}

    @classmethod
    def from_dict(cls, d: dict) -> TrialMechanism:
        return cls(tuple(Stage.from_dict(s) for s in d["stages"]),
                   None if d.get("score_noise") is None else float(d["score_noise"]))


def _worst(mechanisms: Sequence[TrialMechanism]):
    if not mechanisms:
        raise PrivacyError("private selection needs at least one trial mechanism")
    return lambda orders: np.max([m.rdp(orders) for m in mechanisms], axis=0)


def _rdp_to_delta(rdp: np.ndarray, orders: np.ndarray, eps: float) -> float:
    """δ at ε from an RDP curve (the inverse of the conversion in :func:`rdp_to_epsilon`)."""
    log_delta = (orders - 1) * (rdp - eps + np.log1p(-1 / orders)) - np.log(orders)
    return float(min(1.0, np.exp(np.nanmin(log_delta))))


def rdp_to_epsilon(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """(ε, δ) from an RDP curve: min over λ of ε(λ) + log(1 − 1/λ) − (log δ + log λ)/(λ − 1)."""
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1) (got {delta})")
    return float(np.nanmin(rdp + np.log1p(-1 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)))


def selection_rdp(count: TrialCount, mechanisms: Sequence[TrialMechanism],
                  orders: np.ndarray = ORDERS) -> np.ndarray:
    """ε'(λ) of releasing the best of K trials, at ``orders`` (Papernot & Steinke, Theorems 2 and 6)."""
    worst = _worst(mechanisms)
    orders = np.asarray(orders, dtype=float)
    base = worst(orders)
    if count.distribution == "poisson":
        hat = np.array([_rdp_to_delta(base, orders, math.log1p(1 / (lam - 1))) for lam in orders])
        return base + count.mu * hat + math.log(count.mu) / (orders - 1)
    eta, log_inv_gamma = count.eta, math.log(1 / count.gamma)

    def cost(lam_hat: float) -> float:  # the λ̂ term; λ̂ = 1 leaves (1 + η) log(1/γ)
        r = 0.0 if lam_hat <= 1 else float(worst(np.array([lam_hat]))[0])
        return (1 + eta) * (1 - 1 / lam_hat) * r + (1 + eta) * log_inv_gamma / lam_hat

    grid = np.concatenate([[1.0], orders])
    costs = list((1 + eta) * (1 - 1 / grid) * np.concatenate([[0.0], base]) + (1 + eta) * log_inv_gamma / grid)
    grid, costs = np.append(grid, _HAT_MAX), [*costs, cost(_HAT_MAX)]
    i = int(np.argmin(costs))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    refined = minimize_scalar(cost, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6}) if hi > lo else None
    hat_term = min(costs[i], refined.fun if refined is not None and refined.success else math.inf)
    return base + hat_term + math.log(count.mean) / (orders - 1)


def selection_epsilon(count: TrialCount, mechanisms: Sequence[TrialMechanism], delta: float) -> float:
    """ε at ``delta`` of the whole tuning: K trials drawn from ``count``, the best one released."""
    if any(m.score_noise is None for m in mechanisms):
        raise PrivacyError("the trials' score is not private (no score noise): no selection bound holds")
    return rdp_to_epsilon(selection_rdp(count, mechanisms), ORDERS, delta)


def trial_epsilon(mechanism: TrialMechanism, delta: float) -> float:
    """ε at ``delta`` of one trial alone by the same RDP route (what one run of the tuning costs)."""
    return rdp_to_epsilon(mechanism.rdp(ORDERS), ORDERS, delta)


def calibrate_trial_noise(count: TrialCount, target_epsilon: float, delta: float, *, sample_rate: float,
                          steps: int, score_noise: float, name: str = "train") -> float:
    """The smallest DP-SGD noise multiplier σ (to 0.1%) at which the whole tuning's ε is ≤ ``target_epsilon``."""
    def eps(sigma: float) -> float:
        return selection_epsilon(count, [TrialMechanism((Stage(name, sigma, sample_rate, steps),), score_noise)],
                                 delta)

    lo, hi = 0.05, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise PrivacyError(f"no noise multiplier reaches a tuning ε ≤ {target_epsilon} (the selection's own "
                               "cost exceeds it): raise the target, lower the mean number of trials or raise the "
                               "score noise")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi
