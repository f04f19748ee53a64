"""The DP step: noise std σC once per logical batch, divided by the expected batch size;
closure-style (Lightning) and explicit steps give the same update."""
from __future__ import annotations

import pytest
import torch

from dpbench.privacy.engine import make_engine
from dpbench.privacy.optimizer import PrivateOptimizer


def _linear(d_in: int = 100, d_out: int = 100, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, d_out))


@pytest.mark.parametrize("streams", [1, 2])
def test_noise_std_matches_sigma_times_clip(streams: int) -> None:
    model = _linear()
    sigma, clip, expected_b = 1.3, 0.7, 20.0
    engine = make_engine("opacus", model, clip)
    before = [p.detach().clone() for p in model.parameters()]
    opt = PrivateOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), engine, noise_multiplier=sigma,
                           expected_batch_size=expected_b, generator=torch.Generator().manual_seed(0),
                           noise_streams=streams)
    x = torch.randn(8, 100)
    engine.accumulate((engine.module(x) * 0.0).sum(1))  # zero gradients: the update is pure noise
    opt.step()
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())]) * expected_b
    assert abs(update.mean().item()) < 0.05 * sigma * clip
    assert abs(update.std().item() / (sigma * clip) - 1) < 0.03  # 10,100 draws: 3% ≈ 4 standard errors
    engine.close()


def test_empty_logical_batch_still_adds_noise_once() -> None:
    model = _linear(4, 3)
    engine = make_engine("opacus", model, 1.0)
    opt = PrivateOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), engine, noise_multiplier=1.0,
                           expected_batch_size=1.0, generator=torch.Generator().manual_seed(0))
    before = model[0].weight.detach().clone()
    opt.step(lambda: torch.zeros(()))  # a closure that sees no examples
    assert opt.steps == 1 and not torch.equal(before, model[0].weight)
    engine.close()


def test_closure_step_equals_explicit_step() -> None:
    x, y = torch.randn(10, 6), torch.randn(10, 2)
    results = []
    for style in ("closure", "explicit"):
        model = _linear(6, 2, seed=1)
        engine = make_engine("opacus", model, 0.5)
        opt = PrivateOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), engine, noise_multiplier=0.8,
                               expected_batch_size=10.0, generator=torch.Generator().manual_seed(3))

        def accumulate() -> torch.Tensor:
            for sl in (slice(0, 4), slice(4, 10)):  # two micro-batches, one logical batch
                engine.accumulate((engine.module(x[sl]) - y[sl]).pow(2).sum(1))
            return torch.zeros(())

        for _ in range(3):
            if style == "closure":
                opt.step(accumulate)
            else:
                accumulate()
                opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
        engine.close()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_parallel_noise_streams_are_deterministic_and_distinct() -> None:
    def noise(seed: int) -> list[torch.Tensor]:
        model = torch.nn.Sequential(torch.nn.Linear(50, 40), torch.nn.Linear(40, 30))
        engine = make_engine("bk", model, 1.0)
        opt = PrivateOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), engine, noise_multiplier=1.0,
                               expected_batch_size=1.0, generator=torch.Generator().manual_seed(seed),
                               noise_streams=2)
        sums = [torch.empty_like(p) for p in engine.params]
        opt._fill_noise(sums)
        engine.close()
        return sums

    a, b, c = noise(0), noise(0), noise(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, z) for x, z in zip(a, c))
    flat = torch.cat([x.flatten() for x in a])
    assert len(set(flat.tolist())) == flat.numel()  # no stream repeats another's draws
