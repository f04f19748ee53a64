"""DP-AdamBC: the update rule against the paper's formula, plain Adam when there is no noise, and the
noise variance the training module hands it."""
from __future__ import annotations

import torch

from dpbench.privacy.adam_bc import AdamBC


def _run(opt_factory, grads: list[torch.Tensor]) -> torch.Tensor:
    p = torch.nn.Parameter(torch.ones(grads[0].shape, dtype=torch.float64))
    opt = opt_factory([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def test_update_follows_the_bias_corrected_formula() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(50, dtype=torch.float64) * 0.1 for _ in range(4)]
    phi2, gamma, lr, (b1, b2) = 4e-3, 1e-4, 0.01, (0.9, 0.999)
    got = _run(lambda ps: AdamBC(ps, lambda: [phi2], lr=lr, gamma=gamma), grads)
    p, m, v = torch.ones(50, dtype=torch.float64), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * m_hat / torch.sqrt(torch.clamp(v_hat - phi2, min=gamma))
    torch.testing.assert_close(got, p)
    floored = torch.clamp(v_hat - phi2, min=gamma) == gamma
    assert floored.any() and not floored.all(), "the test should exercise both branches"


def test_without_noise_it_is_adam() -> None:
    torch.manual_seed(1)
    grads = [torch.randn(30, dtype=torch.float64) for _ in range(5)]
    ours = _run(lambda ps: AdamBC(ps, lambda: [0.0], lr=0.1, gamma=1e-30), grads)
    adam = _run(lambda ps: torch.optim.Adam(ps, lr=0.1, eps=0.0), grads)
    torch.testing.assert_close(ours, adam)


def test_noise_variance_removes_the_noise_floor_of_the_step() -> None:
    """On pure noise of known variance, DP-Adam's first step moves every coordinate by lr; with the
    variance subtracted most coordinates are floored and move by lr·|g|/√γ ≪ lr."""
    torch.manual_seed(2)
    phi = 1e-3
    noise = [torch.randn(10_000, dtype=torch.float64) * phi]
    adam = (_run(lambda ps: torch.optim.Adam(ps, lr=1.0, eps=0.0), noise) - 1).abs()
    bc = (_run(lambda ps: AdamBC(ps, lambda: [phi ** 2], lr=1.0, gamma=(10 * phi) ** 2), noise) - 1).abs()
    torch.testing.assert_close(adam, torch.ones_like(adam))
    assert float(bc.median()) < 0.1
