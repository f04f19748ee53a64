"""ANADP's allocation: per-group clipping, σ_eff = σ at every step, importance from released
gradients only, and per-group clipped sums equal to a naive per-example loop."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TEXTS, tiny_batch, tiny_model
from dpbench.methods.finetune import select_trainable
from dpbench.privacy.allocation import AllocationConfig, NoiseAllocation, allocation_weights, group_names
from dpbench.privacy.engine import make_engine
from dpbench.privacy.optimizer import PrivateOptimizer


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=40),
       st.floats(0.05, 20), st.floats(0.01, 1.0), st.floats(0.1, 10))
def test_any_scores_keep_sigma_eff(scores: list[float], temperature: float, share: float, sigma: float) -> None:
    w = allocation_weights(torch.tensor(scores, dtype=torch.float64), temperature, share)
    assert torch.all(w > 0) and float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    sigmas = sigma / w.sqrt()
    assert float(sigmas.pow(-2).sum().pow(-0.5)) == pytest.approx(sigma, rel=1e-9)


@pytest.mark.parametrize("split", ["equal", "size"])
def test_group_clip_norms_compose_to_c(split: str) -> None:
    alloc = NoiseAllocation([0, 0, 1, 2, 2], [10, 5, 100, 3, 1], 1.3, 0.7, AllocationConfig(clip_split=split))
    assert float(alloc.clip_norms.pow(2).sum().sqrt()) == pytest.approx(0.7, rel=1e-12)
    assert alloc.effective_noise_multiplier() == pytest.approx(1.3, rel=1e-12)


def test_group_names_by_module_and_block() -> None:
    names = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.lora_A.default.weight",
             "bert.encoder.layer.0.attention.self.query.lora_B.default.weight",
             "bert.encoder.layer.0.output.dense.bias", "classifier.weight", "classifier.bias"]
    group, labels = group_names(names, "module")
    assert group == [0, 1, 1, 2, 3, 3]  # a LoRA module's A and B are one group
    group, labels = group_names(names, "block")
    assert group == [0, 1, 1, 1, 2, 2] and labels[1] == "bert.encoder.layer.0"


def _grouped_engine(lm, clip: float, granularity: str = "block", cfg: AllocationConfig | None = None,
                    sigma: float = 1.0):
    engine = make_engine("bk", lm.model, clip)
    group_of, _ = group_names([n for n, _ in engine.named_params], granularity)
    alloc = NoiseAllocation(group_of, [p.numel() for p in engine.params], sigma, clip,
                            cfg or AllocationConfig(clip_split="size"))
    engine.set_groups(group_of, alloc.clip_norms, count_unclipped=alloc.adaptive)
    return engine, group_of, alloc


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("granularity", ["block", "module"])
def test_per_group_clipping_matches_naive_loop(family: str, granularity: str) -> None:
    """``module`` puts q, k and v (which read the same input) in different groups: each must be
    scaled by its own group's factors (a shared scaled input would break the per-group bound)."""
    lm = tiny_model(family)
    batch = tiny_batch(lm, TEXTS)
    engine, group_of, alloc = _grouped_engine(lm, 0.05, granularity)  # small: most groups of most examples clip
    loss = lambda m, b: F.cross_entropy(m(**lm.inputs(b)).logits, b["labels"], reduction="none")
    engine.accumulate(loss(engine.module, batch))
    got = [s.clone() for s in engine.release()]
    engine.close()
    params = [p for p in lm.model.parameters() if p.requires_grad]
    expected = [torch.zeros_like(p) for p in params]
    clips = alloc.clip_norms
    for i in range(batch["labels"].shape[0]):
        grads = torch.autograd.grad(loss(lm.model, {k: v[i:i + 1] for k, v in batch.items()}).sum(), params)
        for g in range(alloc.k):
            idx = [j for j, k in enumerate(group_of) if k == g]
            norm = math.sqrt(sum(float(grads[j].pow(2).sum()) for j in idx))
            c = min(1.0, float(clips[g]) / (norm + 1e-6))
            for j in idx:
                expected[j] += c * grads[j]
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-12)


ADAPTIVE = AllocationConfig(clip_split="size", clip_quantile=0.5, count_share=0.3)


@pytest.mark.parametrize("cfg", [None, ADAPTIVE], ids=["fixed_bounds", "adaptive_bounds"])
def test_one_example_moves_the_rescaled_release_by_at_most_one_over_sigma_eff(cfg) -> None:
    """The privacy argument, numerically: each example's clipped contribution, with group k scaled by
    1/(σₖCₖ) (and, with adaptive bounds, its unclipped counts by 1/σ_b), has norm ≤ 1/σ_eff, for a
    non-uniform allocation and unequal bounds."""
    lm = tiny_model("bert")
    batch = tiny_batch(lm, TEXTS)
    engine, group_of, alloc = _grouped_engine(lm, clip=0.05, cfg=cfg)
    alloc.weights = allocation_weights(torch.arange(1, alloc.k + 1, dtype=torch.float64) ** 3, 1.0, 0.1)
    if alloc.adaptive:  # bounds that have moved apart, as adaptation makes them
        alloc.clip_norms = alloc.clip_norms * torch.linspace(0.2, 5.0, alloc.k, dtype=torch.float64)
        engine.set_group_clips(alloc.clip_norms)
    scale = 1 / (alloc.noise_multipliers() * alloc.clip_norms)
    for i in range(batch["labels"].shape[0]):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        engine.accumulate(F.cross_entropy(engine.module(**lm.inputs(one)).logits, one["labels"], reduction="none"))
        contribution = engine.release()
        rescaled_sq = sum(float(s.pow(2).sum()) * float(scale[g]) ** 2 for s, g in zip(contribution, group_of))
        if alloc.adaptive:
            counts = engine.take_unclipped()
            assert set(counts.tolist()) <= {0.0, 1.0}
            rescaled_sq += float(counts.pow(2).sum()) / alloc.count_sigma ** 2
        assert math.sqrt(rescaled_sq) <= 1 / alloc.effective_noise_multiplier() * (1 + 1e-6)
    engine.close()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 60), st.floats(0.01, 0.9), st.floats(0.1, 10), st.floats(0.05, 0.95))
def test_adaptive_bounds_keep_sigma_eff(k: int, share: float, sigma: float, quantile: float) -> None:
    """With the counts' noise in the budget: Σₖ σₖ⁻² + K·σ_b⁻² = σ⁻², so the gradients get more noise."""
    cfg = AllocationConfig(clip_quantile=quantile, count_share=share, warmup_steps=0)
    alloc = NoiseAllocation(list(range(k)), [3] * k, sigma, 1.0, cfg)
    alloc.weights = allocation_weights(torch.rand(k, dtype=torch.float64), 0.5, 0.2)
    assert alloc.effective_noise_multiplier() == pytest.approx(sigma, rel=1e-9)
    assert alloc.grad_sigma > sigma and alloc.count_sigma == pytest.approx(sigma * math.sqrt(k / share))


def test_adaptive_bound_update_follows_the_counts() -> None:
    """Cₖ ← Cₖ·exp(−η(b̃ₖ/B − γ)): all unclipped → shrink, none → grow, exactly γ → stay."""
    cfg = AllocationConfig(clip_quantile=0.5, clip_lr=0.2, warmup_steps=100)
    alloc = NoiseAllocation([0, 1, 2], [4, 4, 4], 1.0, 1.0, cfg)
    before = alloc.clip_norms.clone()
    params = [torch.ones(4)] * 3
    alloc.observe(params, [torch.zeros(4)] * 3, unclipped=torch.tensor([10.0, 0.0, 5.0]), expected_batch_size=10)
    torch.testing.assert_close(alloc.clip_norms / before,
                               torch.tensor([math.exp(-0.1), math.exp(0.1), 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="privatised counts"):
        alloc.observe(params, [torch.zeros(4)] * 3)


def test_adaptive_bounds_move_into_each_groups_norm_range() -> None:
    """Frozen model (lr 0), little noise: after 60 steps every bound sits among its group's per-sample
    norms (within one update step), where the fixed split started most of them outside."""
    lm = tiny_model("bert")
    batch = tiny_batch(lm, TEXTS)
    cfg = AllocationConfig(clip_quantile=0.5, clip_lr=0.3, count_share=0.5, warmup_steps=1000)
    engine, group_of, alloc = _grouped_engine(lm, clip=1.0, granularity="block", cfg=cfg, sigma=0.02)
    n = batch["labels"].shape[0]
    norms = torch.zeros(n, alloc.k, dtype=torch.float64)  # naive per-example, per-group gradient norms
    for i in range(n):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(F.cross_entropy(lm.model(**lm.inputs(one)).logits, one["labels"]), engine.params)
        for g, k in zip(grads, group_of):
            norms[i, k] += float(g.pow(2).sum())
    lo, hi = norms.sqrt().min(0).values, norms.sqrt().max(0).values
    start = alloc.clip_norms.clone()
    opt = PrivateOptimizer(torch.optim.SGD(engine.params, lr=0.0), engine, noise_multiplier=0.02,
                           expected_batch_size=float(n), generator=torch.Generator().manual_seed(0), allocation=alloc)
    for _ in range(60):
        engine.accumulate(F.cross_entropy(engine.module(**lm.inputs(batch)).logits, batch["labels"], reduction="none"))
        opt.step()
    engine.close()
    step = math.exp(0.3 * 0.6)
    inside = (alloc.clip_norms >= lo / step) & (alloc.clip_norms <= hi * step)
    assert bool(inside.all()), (alloc.clip_norms, lo, hi)
    assert int(((start < lo / step) | (start > hi * step)).sum()) >= alloc.k // 2
    assert all(s == pytest.approx(0.02, rel=1e-12) for s in alloc.sigma_eff_history)


def _train(lm, alloc_cfg: AllocationConfig, steps: int, batches, release_override=None):
    select_trainable(lm.model, "full")
    engine = make_engine("bk", lm.model, 1.0)
    group_of, _ = group_names([n for n, _ in engine.named_params], "module")
    alloc = NoiseAllocation(group_of, [p.numel() for p in engine.params], 0.8, 1.0, alloc_cfg)
    engine.set_groups(group_of, alloc.clip_norms, count_unclipped=alloc.adaptive)
    opt = PrivateOptimizer(torch.optim.SGD(engine.params, lr=0.05), engine, noise_multiplier=0.8,
                           expected_batch_size=6.0, generator=torch.Generator().manual_seed(0), allocation=alloc)
    for t in range(steps):
        b = batches(t)
        engine.accumulate(F.cross_entropy(engine.module(**lm.inputs(b)).logits, b["labels"], reduction="none"))
        if release_override is not None:
            sums = engine.release()
            for s, o in zip(sums, release_override[t]):
                s.copy_(o)
            engine._sums = sums  # the step releases exactly this
            engine.num_examples = b["labels"].shape[0]
            if alloc.adaptive:  # and these counts (the optimizer adds the same seeded noise in both runs)
                engine.take_unclipped()
                engine._unclipped += torch.arange(alloc.k, dtype=torch.float64) % 7
        opt.step()
    engine.close()
    return alloc


def test_sigma_eff_equals_sigma_at_every_step_of_a_run() -> None:
    lm = tiny_model("bert")
    batch = tiny_batch(lm, TEXTS)
    alloc = _train(lm, AllocationConfig(warmup_steps=2, temperature=0.5, uniform_share=0.2), 6, lambda t: batch)
    assert len(alloc.sigma_eff_history) == 6
    assert all(s == pytest.approx(0.8, rel=1e-12) for s in alloc.sigma_eff_history)
    assert float(alloc.weights.max() / alloc.weights.min()) > 1.5  # the allocation really is non-uniform


@pytest.mark.parametrize("adaptive", [False, True])
def test_allocation_depends_on_private_data_only_through_the_release(adaptive: bool) -> None:
    """Same released gradients (and counts), different private batches → the same allocation and bounds."""
    lm_a, lm_b = tiny_model("bert"), tiny_model("bert")
    lm_b.model.load_state_dict(lm_a.model.state_dict())
    batch = tiny_batch(lm_a, TEXTS)
    other = tiny_batch(lm_a, list(reversed(TEXTS)))
    other["labels"] = 1 - other["labels"]
    torch.manual_seed(0)
    released = [[torch.randn_like(p) for p in lm_a.model.parameters()] for _ in range(4)]
    cfg = AllocationConfig(warmup_steps=1, clip_quantile=0.5 if adaptive else None)
    a = _train(lm_a, cfg, 4, lambda t: batch, released)
    b = _train(lm_b, cfg, 4, lambda t: other, released)
    torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)
    torch.testing.assert_close(a.clip_norms, b.clip_norms, rtol=0, atol=0)
    assert not adaptive or not torch.equal(a.clip_norms, NoiseAllocation(
        [0] * 1 + list(range(a.k)), [1] * (a.k + 1), 0.8, 1.0, cfg).clip_norms)  # the bounds did move
