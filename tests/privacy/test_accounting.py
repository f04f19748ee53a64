"""Accounting: known values, composition, calibration (never overshoots, tight), validation."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant
from scipy.optimize import brentq
from scipy.stats import norm

from dpbench.errors import PrivacyError
from dpbench.privacy.accounting import (
    EpsilonReport,
    Stage,
    calibrate_noise,
    compute_epsilon,
    default_delta,
    epsilon_upper,
    rdp_epsilon,
)

SST2_N = 67349
SST2_Q = 1000 / SST2_N


def test_known_value_prv_and_rdp():
    report = compute_epsilon([Stage("dpsgd", 1.5, 0.04, 2250)], delta=1e-5)
    assert 6.74 <= report.estimate <= 6.80
    assert report.lower <= report.estimate <= report.upper
    assert report.lower == pytest.approx(6.758, abs=2e-3) and report.upper == pytest.approx(6.779, abs=2e-3)
    assert 7.2 <= report.rdp <= 7.45
    assert epsilon_upper([Stage("dpsgd", 1.5, 0.04, 2250)], 1e-5) == report.upper


def test_matches_plain_prv_accountant():
    """Our faster evaluation (domain from vectorised RDP, CDF on the support only) gives the library's numbers."""
    sigma, q, steps, delta = 1.0, 0.01, 300, 1e-5
    plain = PRVAccountant([PoissonSubsampledGaussianMechanism(q, sigma)], max_self_compositions=[steps],
                          eps_error=0.01, delta_error=delta / 1000).compute_epsilon(delta, [steps])
    ours = compute_epsilon([Stage("s", sigma, q, steps)], delta)
    assert (ours.lower, ours.estimate, ours.upper) == pytest.approx(plain, abs=1e-5)


def test_full_batch_matches_analytic_gaussian():
    """q = 1 is the plain Gaussian mechanism: mu = sqrt(steps) / sigma (Balle & Wang 2018)."""
    sigma, steps, delta = 2.0, 4, 1e-5
    mu = math.sqrt(steps) / sigma

    def delta_of(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    exact = brentq(delta_of, 0, 50)
    report = compute_epsilon([Stage("full", sigma, 1.0, steps)], delta)
    assert report.lower <= exact <= report.upper


def test_large_sample_rate():
    """q >~ 0.1 is where prv-accountant's own (quad) mean of the truncated PRV fails; ours must give sane bounds."""
    stages, delta = [Stage("s", 1.0, 0.111, 100)], 1e-5
    report = compute_epsilon(stages, delta)
    fine = compute_epsilon(stages, delta, eps_error=0.002)
    assert report.lower <= fine.estimate <= report.upper
    assert fine.lower >= report.lower - 1e-9 and fine.upper <= report.upper + 1e-9
    assert report.upper < report.rdp


def test_heterogeneous_composition():
    a, b = Stage("teacher", 1.0, 0.02, 500), Stage("student", 2.0, 0.05, 300)
    delta = 1e-5
    ea, eb, eab = (compute_epsilon(s, delta).estimate for s in ([a], [b], [a, b]))
    assert eab > max(ea, eb)
    assert eab <= ea + eb
    assert rdp_epsilon([a, b], delta) > max(rdp_epsilon([a], delta), rdp_epsilon([b], delta))


@pytest.mark.parametrize("stages", [
    [Stage("teacher", 1.0, 0.02, 500), Stage("student", 2.0, 0.05, 300)],
    [Stage("finetune0", 0.9, 0.01, 120), Stage("finetune1", 1.4, 0.01, 80), Stage("finetune2", 0.7, 0.03, 40)],
])
def test_multi_stage_epsilon_matches_independent_prv_composition(stages: list[Stage]) -> None:
    """The composed ε against prv-accountant's own heterogeneous composition (one PRV per mechanism),
    built here without any of dpbench's code."""
    delta = 1e-5
    plain = PRVAccountant([PoissonSubsampledGaussianMechanism(s.sample_rate, s.noise_multiplier) for s in stages],
                          max_self_compositions=[s.steps for s in stages], eps_error=0.01, delta_error=delta / 1000)
    low, _, up = plain.compute_epsilon(delta=delta, num_self_compositions=[s.steps for s in stages])
    ours = compute_epsilon(stages, delta)
    assert low - 1e-9 <= ours.upper <= up + 0.02 and ours.upper == pytest.approx(up, rel=0.01)
    assert ours.upper > max(compute_epsilon([s], delta).upper for s in stages)


def test_same_mechanism_stages_add_steps():
    delta = 1e-5
    split = compute_epsilon([Stage("a", 1.2, 0.03, 400), Stage("b", 1.2, 0.03, 600)], delta)
    whole = compute_epsilon([Stage("ab", 1.2, 0.03, 1000)], delta)
    assert split.estimate == pytest.approx(whole.estimate, abs=1e-3)
    assert split.rdp == pytest.approx(whole.rdp, rel=1e-9)


def test_inactive_stages_are_skipped():
    delta = 1e-5
    base = [Stage("s", 1.0, 0.02, 200)]
    padded = [Stage("none", 0.5, 0.1, 0), *base, Stage("noiseless", math.inf, 0.1, 100)]
    assert compute_epsilon(padded, delta) == compute_epsilon(base, delta)
    assert compute_epsilon([], delta) == EpsilonReport(0.0, 0.0, 0.0, 0.0)
    assert epsilon_upper([Stage("none", 0.5, 0.1, 0)], delta) == 0.0


def test_stage_dict_roundtrip():
    stage = Stage("teacher", 0.8, 0.01, 1234)
    d = stage.to_dict()
    assert d == {"name": "teacher", "noise_multiplier": 0.8, "sample_rate": 0.01, "steps": 1234}
    assert Stage.from_dict(d) == stage


def test_default_delta():
    assert default_delta(SST2_N) == 1 / (2 * SST2_N)
    with pytest.raises(PrivacyError):
        default_delta(0)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(q=st.floats(1e-3, 0.2), steps=st.integers(10, 3000), target=st.floats(0.5, 10.0),
       log_delta=st.floats(math.log(1e-7), math.log(1e-4)))
def test_calibration_never_overshoots_and_is_tight(q, steps, target, log_delta):
    delta, rel_tol = math.exp(log_delta), 1e-3
    sigma = calibrate_noise(target, q, steps, delta, rel_tol=rel_tol)
    assert epsilon_upper([Stage("s", sigma, q, steps)], delta) <= target
    assert epsilon_upper([Stage("s", sigma * (1 - 2 * rel_tol), q, steps)], delta) > target


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibration_sst2_setting(target):
    steps, delta = round(3 / SST2_Q), default_delta(SST2_N)
    sigma = calibrate_noise(target, SST2_Q, steps, delta)
    assert epsilon_upper([Stage("s", sigma, SST2_Q, steps)], delta) <= target < epsilon_upper(
        [Stage("s", sigma * 0.998, SST2_Q, steps)], delta)


def test_calibration_with_prior_stages():
    delta = 1e-5
    prior = [Stage("teacher", 1.0, 0.02, 500)]
    spent = epsilon_upper(prior, delta)
    target = spent + 1.0
    alone = calibrate_noise(target, 0.02, 500, delta)
    sigma = calibrate_noise(target, 0.02, 500, delta, prior_stages=prior)
    assert sigma > alone
    assert epsilon_upper([*prior, Stage("student", sigma, 0.02, 500)], delta) <= target


def test_calibration_unreachable_target():
    prior = [Stage("teacher", 0.8, 0.05, 1000)]
    with pytest.raises(PrivacyError, match="unreachable"):
        calibrate_noise(1.0, 0.02, 500, 1e-5, prior_stages=prior)
    with pytest.raises(PrivacyError, match="unreachable"):
        calibrate_noise(0.005, 0.02, 500, 1e-5)  # below the accountant's eps_error floor


@pytest.mark.parametrize("make", [
    lambda: Stage("s", 0.0, 0.1, 10),
    lambda: Stage("s", -1.0, 0.1, 10),
    lambda: Stage("s", math.nan, 0.1, 10),
    lambda: Stage("s", 1.0, 0.0, 10),
    lambda: Stage("s", 1.0, 1.5, 10),
    lambda: Stage("s", 1.0, 0.1, -1),
    lambda: Stage("s", 1.0, 0.1, 2.5),
    lambda: compute_epsilon([Stage("s", 1.0, 0.1, 10)], 0.0),
    lambda: compute_epsilon([Stage("s", 1.0, 0.1, 10)], 1.0),
    lambda: rdp_epsilon([Stage("s", 1.0, 0.1, 10)], -1e-5),
    lambda: calibrate_noise(0.0, 0.1, 10, 1e-5),
    lambda: calibrate_noise(-1.0, 0.1, 10, 1e-5),
    lambda: calibrate_noise(1.0, 0.0, 10, 1e-5),
    lambda: calibrate_noise(1.0, 1.1, 10, 1e-5),
    lambda: calibrate_noise(1.0, 0.1, -5, 1e-5),
    lambda: calibrate_noise(1.0, 0.1, 0, 1e-5),
    lambda: calibrate_noise(1.0, 0.1, 10, 2.0),
    lambda: calibrate_noise(1.0, 1e-4, 1, 1e-3),  # delta above the chance of ever being sampled
])
def test_bad_inputs_raise_one_line_privacy_error(make):
    with pytest.raises(PrivacyError) as info:
        make()
    assert "\n" not in str(info.value)
