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


def _grouped_engine(lm, clip: float, granularity: str = "block"):
    engine = make_engine("bk", lm.model, clip)
    group_of, _ = group_names([n for n, _ in engine.named_params], granularity)
    alloc = NoiseAllocation(group_of, [p.numel() for p in engine.params], 1.0, clip, AllocationConfig(clip_split="size"))
    engine.set_groups(group_of, alloc.clip_norms)
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


def test_one_example_moves_the_rescaled_release_by_at_most_one_over_sigma_eff() -> None:
    """The privacy argument, numerically: each example's clipped contribution, with group k scaled by
    1/(σₖCₖ), has norm ≤ (Σₖ σₖ⁻²)^½ = 1/σ_eff, for a non-uniform allocation."""
    lm = tiny_model("bert")
    batch = tiny_batch(lm, TEXTS)
    engine, group_of, alloc = _grouped_engine(lm, clip=0.05)
    alloc.weights = allocation_weights(torch.arange(1, alloc.k + 1, dtype=torch.float64) ** 3, 1.0, 0.1)
    scale = 1 / (alloc.noise_multipliers() * alloc.clip_norms)
    for i in range(batch["labels"].shape[0]):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        engine.accumulate(F.cross_entropy(engine.module(**lm.inputs(one)).logits, one["labels"], reduction="none"))
        contribution = engine.release()
        rescaled_sq = sum(float(s.pow(2).sum()) * float(scale[g]) ** 2 for s, g in zip(contribution, group_of))
        assert math.sqrt(rescaled_sq) <= 1 / alloc.effective_noise_multiplier() * (1 + 1e-6)
    engine.close()


def _train(lm, alloc_cfg: AllocationConfig, steps: int, batches, release_override=None):
    select_trainable(lm.model, "full")
    engine = make_engine("bk", lm.model, 1.0)
    group_of, _ = group_names([n for n, _ in engine.named_params], "module")
    alloc = NoiseAllocation(group_of, [p.numel() for p in engine.params], 0.8, 1.0, alloc_cfg)
    engine.set_groups(group_of, alloc.clip_norms)
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


def test_allocation_depends_on_private_data_only_through_the_release() -> None:
    """Same released gradients, different private batches → the same allocation."""
    lm_a, lm_b = tiny_model("bert"), tiny_model("bert")
    lm_b.model.load_state_dict(lm_a.model.state_dict())
    batch = tiny_batch(lm_a, TEXTS)
    other = tiny_batch(lm_a, list(reversed(TEXTS)))
    other["labels"] = 1 - other["labels"]
    torch.manual_seed(0)
    released = [[torch.randn_like(p) for p in lm_a.model.parameters()] for _ in range(4)]
    cfg = AllocationConfig(warmup_steps=1)
    a = _train(lm_a, cfg, 4, lambda t: batch, released)
    b = _train(lm_b, cfg, 4, lambda t: other, released)
    torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)
