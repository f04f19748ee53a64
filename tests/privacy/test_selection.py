"""Private selection's accounting (Papernot & Steinke 2022) against its closed form, and its invariants."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dpbench.data.examples import TextClassificationData
from dpbench.errors import PrivacyError
from dpbench.privacy.accounting import Stage, epsilon_upper
from dpbench.privacy.selection import (ORDERS, TrialCount, TrialMechanism, calibrate_trial_noise, selection_epsilon,
                                       selection_rdp, trial_epsilon)


def _gaussian(rho_train: float, score_noise: float) -> tuple[TrialMechanism, float]:
    """A trial whose RDP is exactly λρ: one full-batch Gaussian step (ρ = 1/(2σ²)) plus the score's 1/(2s²)."""
    sigma = 1 / math.sqrt(2 * rho_train)
    return TrialMechanism((Stage("train", sigma, 1.0, 1),), score_noise), rho_train + 1 / (2 * score_noise**2)


@pytest.mark.parametrize("eta", [-0.5, 0.0, 1.0, 3.0])
@pytest.mark.parametrize("rho", [0.02, 0.3, 4.0])
def test_truncated_negative_binomial_bound_is_the_theorems_closed_form(eta: float, rho: float) -> None:
    """Theorem 2 with ε_Q(λ) = λρ: ε'(λ) = λρ + (1+η)·min_{λ̂≥1} [(λ̂−1)ρ + log(1/γ)/λ̂] + log E[K]/(λ−1), and the
    minimum is 2√(ρ log(1/γ)) − ρ at λ̂ = √(log(1/γ)/ρ) when that is ≥ 1, else log(1/γ) at λ̂ = 1."""
    count = TrialCount.with_mean("truncated_negative_binomial", 10.0, eta)
    mechanism, rho_q = _gaussian(rho, score_noise=7.0)
    c = math.log(1 / count.gamma)
    hat = 2 * math.sqrt(rho_q * c) - rho_q if math.sqrt(c / rho_q) >= 1 else c
    closed = ORDERS * rho_q + (1 + eta) * hat + math.log(count.mean) / (ORDERS - 1)
    np.testing.assert_allclose(selection_rdp(count, [mechanism]), closed, rtol=1e-7)


def test_geometric_number_of_trials_is_eta_one_with_mean_one_over_gamma() -> None:
    count = TrialCount.with_mean("truncated_negative_binomial", 5.0, eta=1.0)
    assert count.gamma == pytest.approx(0.2, rel=1e-9)
    assert [count.pmf(k) for k in (1, 2, 3)] == pytest.approx([0.2, 0.2 * 0.8, 0.2 * 0.8**2], rel=1e-9)


@pytest.mark.parametrize("eta", [-0.5, 0.0, 1.0, 2.5])
def test_trial_count_distribution_has_the_asked_mean(eta: float) -> None:
    count = TrialCount.with_mean("truncated_negative_binomial", 8.0, eta)
    ks = np.arange(1, 20_000)
    p = np.array([count.pmf(int(k)) for k in ks[:4000]])
    assert p.sum() == pytest.approx(1.0, abs=1e-6) and (ks[:4000] * p).sum() == pytest.approx(8.0, rel=1e-4)
    draws = [count.sample(np.random.default_rng(s)) for s in range(4000)]
    assert min(draws) >= 1 and np.mean(draws) == pytest.approx(8.0, rel=0.1)


@pytest.mark.parametrize("distribution", ["truncated_negative_binomial", "poisson"])
@pytest.mark.parametrize("sigma,q,steps", [(0.7, 0.015, 100), (1.5, 0.04, 1000), (0.5, 0.1, 20)])
def test_tuning_never_costs_less_than_one_run(distribution: str, sigma: float, q: float, steps: int) -> None:
    stage = Stage("train", sigma, q, steps)
    mechanism = TrialMechanism((stage,), score_noise=10.0)
    total = selection_epsilon(TrialCount.with_mean(distribution, 8.0), [mechanism], 1e-5)
    assert total > trial_epsilon(mechanism, 1e-5) >= epsilon_upper([stage], 1e-5)


def test_more_trials_cost_more_and_the_worst_mechanism_counts() -> None:
    weak, strong = (TrialMechanism((Stage("train", s, 0.02, 100),), 10.0) for s in (0.8, 1.6))
    by_mean = [selection_epsilon(TrialCount.with_mean("truncated_negative_binomial", m), [strong], 1e-5)
               for m in (2, 8, 32)]
    assert by_mean == sorted(by_mean) and by_mean[0] < by_mean[-1]
    count = TrialCount.with_mean("truncated_negative_binomial", 8)
    assert selection_epsilon(count, [weak, strong], 1e-5) == selection_epsilon(count, [weak], 1e-5)


def _gaussian_delta(mu: float, eps: float) -> float:
    """Exact δ(ε) of a Gaussian mechanism with sensitivity/σ = mu (Balle & Wang 2018)."""
    from scipy.stats import norm

    return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2))


def test_poisson_bound_is_theorem_6_with_a_valid_delta_hat() -> None:
    """ε'(λ) = ε_Q(λ) + μ δ̂ + log μ/(λ−1) with δ̂ ≥ the trial's exact δ at ε̂ = log(1 + 1/(λ−1)): checked against a
    Gaussian trial's exact δ (Balle & Wang), an independent computation, at every order."""
    mechanism, rho = _gaussian(0.05, score_noise=20.0)
    count = TrialCount.with_mean("poisson", 6.0)
    got = selection_rdp(count, [mechanism])
    base = ORDERS * rho
    exact = np.array([_gaussian_delta(math.sqrt(2 * rho), math.log1p(1 / (lam - 1))) for lam in ORDERS])
    floor = base + 6.0 * exact + math.log(6.0) / (ORDERS - 1)
    assert np.all(got >= floor - 1e-12)
    assert np.all(got - floor <= 6.0 * np.maximum(exact, 1e-3) * 4)  # the RDP route to δ̂ loses little


def test_calibrated_noise_is_the_smallest_meeting_the_total() -> None:
    count = TrialCount.with_mean("truncated_negative_binomial", 8.0)
    sigma = calibrate_trial_noise(count, 8.0, 1e-5, sample_rate=0.015, steps=100, score_noise=10.0)
    at = lambda s: selection_epsilon(count, [TrialMechanism((Stage("train", s, 0.015, 100),), 10.0)], 1e-5)  # noqa: E731
    assert at(sigma) <= 8.0 < at(sigma / 1.002)


def test_a_public_score_or_an_unreachable_total_is_refused() -> None:
    count = TrialCount.with_mean("truncated_negative_binomial", 8.0)
    with pytest.raises(PrivacyError, match="score is not private"):
        selection_epsilon(count, [TrialMechanism((Stage("train", 1.0, 0.01, 10),), None)], 1e-5)
    with pytest.raises(PrivacyError, match="selection's own cost"):
        calibrate_trial_noise(count, 0.05, 1e-5, sample_rate=0.01, steps=10, score_noise=10.0)
    with pytest.raises(PrivacyError, match="eta > -1"):
        TrialCount("truncated_negative_binomial", eta=-1.0, gamma=0.5)


def test_rdp_conversion_is_an_upper_bound_close_to_the_exact_gaussian_epsilon() -> None:
    """One Gaussian trial's ε by the RDP route vs its exact ε (bisection on Balle & Wang's δ(ε))."""
    from scipy.optimize import brentq

    for rho in (0.01, 0.1, 1.0):
        mechanism, rho_q = _gaussian(rho, score_noise=1e12)
        exact = brentq(lambda e: _gaussian_delta(math.sqrt(2 * rho_q), e) - 1e-5, 1e-6, 100)
        assert exact <= trial_epsilon(mechanism, 1e-5) <= exact * 1.25


@pytest.mark.parametrize("seed", range(20))
def test_hash_split_moves_no_other_example_when_one_is_added_or_removed(seed: int) -> None:
    """The trials' held-out split: each example's side depends on the example and the (public) fraction alone,
    so one added or removed example changes nothing else — the training part and the held-out score then
    compose example by example. (An exact-size split fails this: :meth:`split_off` moves many.)"""
    texts = [f"sentence number {i}" for i in range(3000)]
    data = TextClassificationData(texts, None, [i % 2 for i in range(3000)])
    more = TextClassificationData(texts[:1500] + ["an added one"] + texts[1500:], None,
                                  data.labels[:1500] + [1] + data.labels[1500:])
    fewer = TextClassificationData(texts[1:], None, data.labels[1:])
    train, held = data.split_by_hash(0.1, seed=seed)
    for other in (more, fewer):
        train2, held2 = other.split_by_hash(0.1, seed=seed)
        for a, b in ((held, held2), (train, train2)):
            assert not (set(a.text_a) ^ set(b.text_a)) - {"an added one", texts[0]}
    assert 240 < len(held) < 360 and len(train) + len(held) == 3000
    assert data.split_by_hash(0.1, seed=seed + 100)[1].text_a != held.text_a  # the seed picks another split
    moved = set(data.split_off(300, seed=seed)[1].text_a) ^ set(more.split_off(300, seed=seed)[1].text_a)
    assert len(moved) > 10  # why the exact-size split is not used for tuning
