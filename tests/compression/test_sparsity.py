"""Unstructured magnitude masks: exact target sparsity, masks that hold through DP steps."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TEXTS, tiny_batch, tiny_model
from dpbench.compression.report import compression_report
from dpbench.compression.sparsity import (magnitude_prune, make_permanent, measure_sparsity, prunable_modules,
                                          sparsity_schedule)
from dpbench.privacy.engine import make_engine
from dpbench.privacy.optimizer import PrivateOptimizer


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.9])
def test_target_sparsity_reached_exactly(scope: str, target: float) -> None:
    lm = tiny_model("bert")
    magnitude_prune(lm.model, target, scope)
    s = measure_sparsity(lm.model)
    if scope == "global":
        assert s["prunable_zeros"] == math.ceil(target * s["prunable_params"])
    else:
        for _, m in prunable_modules(lm.model):
            assert int((m.weight == 0).sum()) == math.ceil(target * m.weight.numel())
    assert s["sparsity"] >= target
    assert not any(n.startswith("classifier") or "pooler" in n for n, _ in prunable_modules(lm.model))


def test_global_pruning_removes_the_smallest_magnitudes() -> None:
    lm = tiny_model("bert")
    before = torch.cat([m.weight.detach().abs().flatten() for _, m in prunable_modules(lm.model)])
    magnitude_prune(lm.model, 0.5)
    after = torch.cat([m.weight.detach().flatten() for _, m in prunable_modules(lm.model)])
    assert before[after == 0].max() <= before[after != 0].min()


def test_iterative_schedule_is_cumulative_and_ends_at_target() -> None:
    sched = sparsity_schedule(0.5, 3)
    assert sched[-1] == 0.5 and all(a < b for a, b in zip(sched, sched[1:]))
    kept = [1 - s for s in sched]  # each round keeps the same fraction of what remained
    assert kept[1] / kept[0] == pytest.approx(kept[0]) and kept[2] / kept[1] == pytest.approx(kept[0])
    lm = tiny_model("bert")
    zeros = []
    for s in sched:
        magnitude_prune(lm.model, s)
        mask_zeros = {id(m): m.weight_mask == 0 for _, m in prunable_modules(lm.model)}
        zeros.append(measure_sparsity(lm.model)["sparsity"])
    assert zeros == sorted(zeros) and zeros[-1] >= 0.5
    assert all(z.any() for z in mask_zeros.values())


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_masks_persist_through_dp_steps(family: str) -> None:
    """Noise and clipped gradients never revive a pruned weight, and weight_orig does not drift there."""
    lm = tiny_model(family)
    magnitude_prune(lm.model, 0.5)
    masks = {n: m.weight_mask.clone() for n, m in prunable_modules(lm.model)}
    orig = {n: m.weight_orig.detach().clone() for n, m in prunable_modules(lm.model)}
    engine = make_engine("bk", lm.model, 1.0)
    opt = PrivateOptimizer(torch.optim.AdamW(engine.params, lr=0.1, weight_decay=0.0), engine, noise_multiplier=1.0,
                           expected_batch_size=4.0, generator=torch.Generator().manual_seed(0))
    batch = tiny_batch(lm, TEXTS)
    for _ in range(3):
        logits = engine.module(**lm.inputs(batch)).logits
        engine.accumulate(F.cross_entropy(logits, batch["labels"], reduction="none"))
        opt.step()
    engine.close()
    for n, m in prunable_modules(lm.model):
        pruned = masks[n] == 0
        assert torch.all(m.weight[pruned] == 0)
        assert torch.equal(m.weight_orig[pruned], orig[n][pruned])
        assert not torch.equal(m.weight_orig[~pruned], orig[n][~pruned])  # the rest did train
    make_permanent(lm.model)
    assert measure_sparsity(lm.model)["sparsity"] >= 0.5
    assert not any(name.endswith("weight_orig") for name, _ in lm.model.named_parameters())


def test_report_counts_removed_weights_against_the_dense_model() -> None:
    lm = tiny_model("bert")
    dense = tiny_model("bert").model
    magnitude_prune(lm.model, 0.5)
    make_permanent(lm.model)
    batch = tiny_batch(lm, TEXTS)
    r = compression_report(dense, lm.model, lm.inputs(batch), 0.5)
    assert r["sparsity"] == r["zeros_in_prunable"] >= 0.5
    assert r["params"] == r["params_dense"] - r["prunable_params_dense"] + r["prunable_params"]
    assert r["size_mb_sparse"] > 0 and r["latency_ms"]["compressed"] > 0
