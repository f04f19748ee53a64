"""dpbench-snr: per-group signal against the noise the release adds."""
from __future__ import annotations

import math

import pytest
import torch

from dpbench.privacy.snr import group_snr, measure, render


def test_group_snr_sums_each_block_and_the_total() -> None:
    names = ["bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.output.dense.bias",
             "classifier.weight"]
    sums = [torch.full((3, 4), 2.0), torch.full((4,), 1.0), torch.full((2, 2), 10.0)]
    rows = {r.name: r for r in group_snr(names, sums, batch_size=10, noise_std=0.5)}
    block = rows["bert.encoder.layer.0"]
    assert block.params == 16 and block.signal == pytest.approx(math.sqrt(12 * 4 + 4) / 10)
    assert block.noise == pytest.approx(0.5 * 4 / 10)
    assert rows["classifier"].snr == pytest.approx((20 / 10) / (0.5 * 2 / 10))
    assert rows["total"].params == 20 and rows["total"].signal == pytest.approx(math.sqrt(52 + 400) / 10)


def test_measure_on_a_tiny_run_bounds_the_signal_by_the_clip_norm() -> None:
    rows, info = measure(["model=tiny_bert", "task=synthetic", "task.num_train=64", "task.num_dev=8",
                          "method=dp_bitfit", "privacy.batch_size=16", "privacy.clip_norm=0.5",
                          "trainer.max_steps=4"], batches=2)
    total = rows[-1]
    # the mean of clipped gradients has norm ≤ C·|L|/B; Poisson |L| stays well below 3B here
    assert 0 < total.signal < 3 * 0.5
    assert total.noise == pytest.approx(info["sigma"] * 0.5 * math.sqrt(total.params) / 16)
    assert total.params == sum(r.params for r in rows[:-1])
    assert "snr·√T" in render(rows, info)
