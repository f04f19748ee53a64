"""Multi-stage privacy plans: steps split exactly, and the stages' PRV composition meets the target."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from dpbench.errors import ConfigError
from dpbench.methods.distill import kd_loss
from dpbench.pipeline import plan_stages, split_steps
from dpbench.privacy.accounting import Stage, compute_epsilon


def _cfg(epsilon: float = 4.0, max_steps: int = 40):
    return OmegaConf.create({"privacy": {"epsilon": epsilon, "delta": None, "batch_size": 50, "clip_norm": 1.0,
                                         "noise_multiplier": None, "epochs": 3},
                             "trainer": {"max_steps": max_steps}})


@pytest.mark.parametrize("total, fractions", [(10, [1, 1, 1]), (8, [1, 1, 1, 1]), (7, [3, 1]), (5, [0.01, 1, 1])])
def test_split_steps_sums_exactly(total: int, fractions: list[float]) -> None:
    steps = split_steps(total, fractions)
    assert sum(steps) == total and all(s >= 1 for s in steps) and len(steps) == len(fractions)


def test_split_steps_refuses_too_few_steps() -> None:
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        split_steps(2, [1, 1, 1])


def _eps(plans, delta: float) -> tuple[float, list[float]]:
    stages = [Stage(f"s{i}", p.noise_multiplier, p.sample_rate, p.steps) for i, p in enumerate(plans)]
    return compute_epsilon(stages, delta).upper, [compute_epsilon([s], delta).upper for s in stages]


def test_equal_noise_stages_compose_to_the_target() -> None:
    plans = plan_stages(_cfg(), 1000, [1, 1, 1, 1], private=True)
    assert len({p.noise_multiplier for p in plans}) == 1 and sum(p.steps for p in plans) == 40
    total, each = _eps(plans, plans[0].delta)
    assert 4.0 * 0.99 <= total <= 4.0 and all(e < total for e in each)


def test_budget_split_gives_the_first_stage_its_share() -> None:
    plans = plan_stages(_cfg(), 1000, [1, 1], private=True, budget_split=0.25)
    total, (first, second) = _eps(plans, plans[0].delta)
    assert first == pytest.approx(1.0, rel=2e-3) and first <= 1.0
    assert 4.0 * 0.99 <= total <= 4.0 and second > 3.0  # composition is sublinear: the second gets more than 3
    assert plans[0].noise_multiplier > plans[1].noise_multiplier


def test_kd_loss_limits() -> None:
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.randint(0, 3, (5,))
    ce = torch.nn.functional.cross_entropy(s, y, reduction="none")
    torch.testing.assert_close(kd_loss(s, t, y, 2.0, 1.0), ce)
    torch.testing.assert_close(kd_loss(s, s, y, 2.0, 0.0), torch.zeros(5), atol=1e-6, rtol=0)
    kl = kd_loss(s, t, y, 3.0, 0.0)
    p_t = torch.softmax(t / 3, -1)
    expected = 9 * (p_t * (p_t.log() - torch.log_softmax(s / 3, -1))).sum(-1)
    torch.testing.assert_close(kl, expected)
