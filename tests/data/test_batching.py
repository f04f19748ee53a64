"""Micro-batches cut by length: every example once, each micro-batch padded to its own longest, and
the same clipped sum (float64) and the same noised update as consecutive slices of the padded batch."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from conftest import TEXTS, TINY, tiny_batch, tiny_model
from dpbench.data.batching import MicroBatching, eval_batches, group_by_length, lengths, microbatches
from dpbench.data.generation import LMCollator, make_synthetic_corpus
from dpbench.data.tasks import get_task_spec
from dpbench.errors import ConfigError, DataError
from dpbench.methods.base import ClassifierModule, DPConfig, OptimConfig
from dpbench.methods.finetune import select_trainable
from dpbench.methods.language_model import token_nll
from dpbench.models.registry import load_causal_lm
from dpbench.privacy.engine import make_engine

UNSORTED = MicroBatching(4, by_length=False)
SORTED = MicroBatching(4)
BUDGET = MicroBatching(4, max_tokens=40)  # more, smaller micro-batches on the long rows
CUTS = {"sorted": SORTED, "token budget": BUDGET}


def test_groups_cover_every_index_once_longest_first_within_limits() -> None:
    rng = random.Random(0)
    for _ in range(50):
        lens = [rng.randint(1, 64) for _ in range(rng.randint(0, 60))]
        m, budget = rng.randint(1, 9), rng.choice([None, 30, 100])
        groups = group_by_length(lens, m, budget)
        flat = [i for g in groups for i in g]
        assert sorted(flat) == list(range(len(lens)))
        assert [lens[i] for i in flat] == sorted(lens, reverse=True)
        for g in groups:
            assert 1 <= len(g) <= m
            if budget is not None and len(g) > 1:
                assert len(g) * lens[g[0]] <= budget


def test_microbatches_trim_padding_and_keep_rows() -> None:
    lm = tiny_model("bert")
    batch = tiny_batch(lm, TEXTS * 3)
    lens = lengths(batch)
    for cut in (SORTED, BUDGET):
        micro = microbatches(batch, cut)
        assert sum(m["labels"].shape[0] for m in micro) == len(lens)
        for m in micro:
            width = m["attention_mask"].shape[1]
            assert m["input_ids"].shape == m["token_type_ids"].shape == (m["labels"].shape[0], width)
            assert int(m["attention_mask"].sum(1).max()) == width  # padded to its own longest only
        computed = sum(m["attention_mask"].numel() for m in micro)
        assert computed < batch["attention_mask"].numel()
    assert [m["labels"].shape[0] for m in microbatches(batch, UNSORTED)] == [4, 4, 4, 4, 2]
    assert all(m["input_ids"].shape[1] == batch["input_ids"].shape[1] for m in microbatches(batch, UNSORTED))
    assert microbatches({k: v[:0] for k, v in batch.items()}, SORTED) == []


def test_bad_cuts_and_left_padding_are_refused() -> None:
    with pytest.raises(ConfigError, match="physical_batch_size"):
        MicroBatching(0)
    with pytest.raises(ConfigError, match="physical_batch_tokens"):
        MicroBatching(4, max_tokens=0)
    lm = tiny_model("bert")
    batch = tiny_batch(lm, TEXTS)
    left = {k: v.flip(1) if v.dim() == 2 else v for k, v in batch.items()}
    with pytest.raises(DataError, match="right-padded"):
        microbatches(left, SORTED)


def test_eval_batches_group_by_length() -> None:
    lens = [3, 9, 1, 9, 4]
    assert eval_batches(lens, 2) == [[1, 3], [4, 0], [2]]
    with pytest.raises(ConfigError):
        eval_batches(lens, 0)


def _clipped_sum(model, loss_fn, batch: dict, cut: MicroBatching, clip: float) -> list[torch.Tensor]:
    engine = make_engine("bk", model, clip)
    try:
        for micro in microbatches(batch, cut):
            engine.accumulate(loss_fn(engine.module, micro))
        return engine.release()
    finally:
        engine.close()


def _classifier_case(family: str, mode: str):
    """ClassifierModule's per-sample loss (cross-entropy of the logits)."""
    lm = tiny_model(family)
    select_trainable(lm.model, mode)
    loss = lambda model, b: F.cross_entropy(model(**lm.inputs(b)).logits, b["labels"], reduction="none")  # noqa: E731
    return lm.model, loss, tiny_batch(lm, TEXTS * 2)


def _lm_case(family: str, mode: str):
    """CausalLMModule's per-sample loss (mean NLL over the text tokens)."""
    lm = load_causal_lm(TINY[family])
    lm.model.to(torch.float64).train()
    select_trainable(lm.model, mode)
    corpus = make_synthetic_corpus(12, seed=0)
    batch = LMCollator(lm.tokenizer, 40)(list(zip(corpus.codes, corpus.texts)))
    return lm.model, (lambda model, b: token_nll(model(**lm.inputs(b)).logits, b["labels"])), batch


CASES = {**{f"{f}-{m}": (_classifier_case, f, m) for f in ("bert", "roberta") for m in ("full", "bitfit")},
         **{f"lm-{f}-{m}": (_lm_case, f, m) for f, m in (("gpt2", "full"), ("gpt2", "bitfit"), ("llama", "full"))}}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cut", CUTS)
def test_sorted_clipped_sum_equals_unsorted(case: str, cut: str) -> None:
    """The privacy-relevant invariant: cutting by length leaves the logical batch's clipped sum as is."""
    build, family, mode = CASES[case]
    model, loss_fn, batch = build(family, mode)
    assert bool((batch["attention_mask"] == 0).any()), "the batch must contain padding"
    norms = torch.stack([torch.sqrt(sum(s.pow(2).sum() for s in _clipped_sum(model, loss_fn,
                         {k: v[i:i + 1] for k, v in batch.items()}, UNSORTED, 1e9)))
                         for i in range(batch["attention_mask"].shape[0])])
    clip = float(norms.median())  # some examples clipped, some not
    expected = _clipped_sum(model, loss_fn, batch, UNSORTED, clip)
    got = _clipped_sum(model, loss_fn, batch, CUTS[cut], clip)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, e, g in zip(names, expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cut", CUTS)
def test_noised_update_is_the_same_whatever_the_cut(cut: str) -> None:
    """Through the module and the private optimizer: one noise draw per logical batch, however many
    micro-batches it is cut into, so the update equals the unsorted path's."""
    after = {}
    for name, batching in (("unsorted", UNSORTED), (cut, CUTS[cut])):
        lm = tiny_model("bert")
        dp = DPConfig(noise_multiplier=0.8, clip_norm=0.05, expected_batch_size=8.0, noise_seed=3)
        module = ClassifierModule(lm, get_task_spec("synthetic"), OptimConfig(name="sgd", lr=1.0), dp, batching, 2)
        opt = module.configure_optimizers()["optimizer"]
        batch = tiny_batch(lm, TEXTS * 2)
        opt.step(lambda: module.accumulate(batch))
        assert opt.last_batch_size == len(TEXTS) * 2
        after[name] = [p.detach().clone() for p in module.engine.params]
        tokens = int(batch["attention_mask"].sum())
        assert module.throughput.examples == len(TEXTS) * 2 and module.throughput.tokens == tokens
    for e, g in zip(after["unsorted"], after[cut]):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13)
