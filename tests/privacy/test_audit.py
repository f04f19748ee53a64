"""The one-run audit: its bound is sound on the correct mechanism and catches broken ones."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import dpbench.privacy.engine.bookkeeping as bookkeeping
from dpbench.leaderboard.verify import verify_record
from dpbench.privacy.accounting import calibrate_noise, epsilon_upper, Stage
from dpbench.privacy.audit import (audit_dp_step, audit_privacy, epsilon_lower_bound, max_auditable_epsilon,
                                   p_value, settings_for)

Q, STEPS, DELTA, EPS = 0.05, 200, 1e-5, 2.0


@pytest.fixture(scope="module")
def sigma() -> float:
    return calibrate_noise(EPS, Q, STEPS, DELTA)


def test_p_value_is_the_binomial_tail_without_delta() -> None:
    p = 1 / (1 + math.exp(-1.0))
    assert p_value(100, 50, 40, 1.0, 0.0) == pytest.approx(float(stats.binom.sf(39, 50, p)), rel=1e-12)
    assert p_value(100, 50, 40, 1.0, 1e-3) > p_value(100, 50, 40, 1.0, 0.0)  # δ only adds


def test_lower_bound_rejects_exactly_below_it() -> None:
    eps = epsilon_lower_bound(1000, 200, 190, 1e-5, 0.95)
    assert eps > 0
    assert p_value(1000, 200, 190, eps - 1e-3, 1e-5) < 0.05 <= p_value(1000, 200, 190, eps + 1e-3, 1e-5)
    assert epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0  # chance-level guessing proves nothing


def test_correct_mechanism_stays_below_its_claim(sigma: float) -> None:
    claimed = epsilon_upper([Stage("train", sigma, Q, STEPS)], DELTA)
    for seed in range(2):
        result = audit_dp_step(sigma, Q, STEPS, 1.0, DELTA, seed=seed)
        assert result.epsilon_lower_bound < claimed <= EPS


def test_noise_off_is_caught(sigma: float) -> None:
    """The record claims σ; the optimizer adds no noise."""
    result = audit_dp_step(0.0, Q, STEPS, 1.0, DELTA)
    assert result.correct == result.guesses and result.epsilon_lower_bound > EPS


def test_clipping_off_is_caught(sigma: float, monkeypatch) -> None:
    """Noise for C, but per-sample gradients (norm 100·C) left unclipped."""
    monkeypatch.setattr(bookkeeping, "clip_factors", lambda norms, clip, mode="flat": torch.ones_like(norms))
    result = audit_dp_step(sigma, Q, STEPS, 1.0, DELTA)
    assert result.epsilon_lower_bound > EPS


def test_record_audit_and_leaderboard_rejection(sigma: float) -> None:
    stage = {"name": "train", "noise_multiplier": sigma, "sample_rate": Q, "steps": STEPS}
    privacy = {"epsilon": EPS, "target_epsilon": EPS, "delta": DELTA, "accountant": "prv", "clip_norm": 1.0,
               "stages": [stage]}
    audit = audit_privacy(privacy, guesses=100, canaries=500)
    assert audit["consistent"] and 0 <= audit["epsilon_lower_bound"] < EPS and len(audit["stages"]) == 1
    record = {"status": "ok", "task": "sst2", "model": "m", "method": "dp_full", "seed": 0,
              "config": {"method": {"private": True}}, "metrics": {"accuracy": 0.5}, "privacy": privacy,
              "params": {"trainable": 1, "total": 1}, "timing": {"train_s": 1.0, "steps": STEPS},
              "memory": {"peak_rss_mb": 1.0}, "audit": {**audit, "epsilon_lower_bound": 5.0}}
    assert any("audit" in r for r in verify_record(record).reasons)


def test_quarter_noise_is_caught_at_the_default_settings(sigma: float) -> None:
    """σ/4 where σ was calibrated for ε = 2: the default audit (1,000 canaries, 200 guesses) contradicts ε = 2."""
    result = audit_dp_step(sigma / 4, Q, STEPS, 1.0, DELTA)
    assert result.epsilon_lower_bound > EPS, result


def test_audit_knows_its_power() -> None:
    """A perfect audit at the defaults bounds ε ≥ 4.17: claims at or above it are marked uninformative, and
    ``settings_for`` gives the smallest settings (of its grid) that could contradict ε = 8."""
    ceiling = max_auditable_epsilon(1000, 200, DELTA)
    assert ceiling == pytest.approx(4.17, abs=0.01) and ceiling == epsilon_lower_bound(1000, 200, 200, DELTA)
    assert settings_for(2.0, 1 / 128) is None  # a large δ caps every audit below 2 (tiny datasets)
    m, r = settings_for(8.0, DELTA)
    assert max_auditable_epsilon(m, r, DELTA) > 8.0 >= max_auditable_epsilon(int(m / 1.25), int(0.8 * m / 1.25), DELTA)
    stage = {"name": "train", "noise_multiplier": 1.0, "sample_rate": Q, "steps": 10}
    for claimed, informative in [(2.0, True), (8.0, False)]:
        privacy = {"epsilon": claimed, "delta": DELTA, "clip_norm": 1.0, "stages": [stage]}
        audit = audit_privacy(privacy, guesses=200, canaries=1000)
        assert audit["informative"] is informative and audit["max_auditable_epsilon"] == pytest.approx(ceiling)
