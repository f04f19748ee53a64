"""The classification head options (``model.pooling``, ``model.head_init``) and frozen embeddings."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TEXTS, TINY, tiny_batch
from dpbench.errors import ConfigError
from dpbench.methods.finetune import set_trainable
from dpbench.models.heads import masked_mean
from dpbench.models.registry import load_model


def pooled(family: str, init: str = "default"):
    lm = load_model({**TINY[family], "pooling": "mean", "head_init": init}, 2)
    lm.model.to(torch.float64).train()
    return lm


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_mean_pooling_reads_the_masked_mean_of_the_last_hidden_states(family: str) -> None:
    lm = pooled(family)
    batch = tiny_batch(lm, TEXTS)
    kw = lm.inputs(batch)
    hidden = lm.model.base_model(**kw).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).double()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    head = lm.model.classifier
    expected = head(mean.unsqueeze(1)) if family == "roberta" else head(mean)
    torch.testing.assert_close(lm.model(**kw).logits, expected)
    # padding does not move an example's logits: the same sentence alone, unpadded
    alone = tiny_batch(lm, TEXTS[:1])
    torch.testing.assert_close(lm.model(**lm.inputs(alone)).logits[0], lm.model(**kw).logits[0])
    assert not any("pooler" in n for n, _ in lm.model.named_parameters()), "the unused CLS pooler must be removed"


def test_masked_mean_ignores_padded_positions() -> None:
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert masked_mean(hidden, torch.tensor([[1, 1, 0]])).item() == 2.0


def test_zero_head_starts_at_uniform_predictions_and_trains_only_the_head_first() -> None:
    lm = pooled("bert", init="zero")
    batch = tiny_batch(lm, TEXTS)
    logits = lm.model(**lm.inputs(batch)).logits
    assert torch.count_nonzero(logits) == 0
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    loss.backward()
    assert lm.model.classifier.weight.grad.abs().sum() > 0
    encoder_grads = [p.grad for n, p in lm.model.named_parameters() if n.startswith("bert.")]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in encoder_grads)


def test_pooled_model_pickles_and_copies() -> None:
    lm = pooled("bert")
    batch = tiny_batch(lm, TEXTS)
    want = lm.model(**lm.inputs(batch)).logits
    for clone in (pickle.loads(pickle.dumps(lm.model)), copy.deepcopy(lm.model)):
        torch.testing.assert_close(clone(**lm.inputs(batch)).logits, want)


@pytest.mark.parametrize("bad, match", [({"pooling": "max"}, "model.pooling 'max'"),
                                        ({"head_init": "ones"}, "model.head_init 'ones'")])
def test_bad_head_options_are_refused(bad: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_model({**TINY["bert"], **bad}, 2)


def test_mean_pooling_refuses_decoder_families() -> None:
    with pytest.raises(ConfigError, match="model.pooling=cls"):
        load_model({**TINY["gpt2"], "pooling": "mean"}, 2)


def test_freeze_embeddings_freezes_every_embedding_table_and_nothing_else() -> None:
    lm = load_model(TINY["bert"], 2)
    set_trainable(lm, OmegaConf.create({"trainable": "full", "freeze_embeddings": True}))
    frozen = {n for n, p in lm.model.named_parameters() if not p.requires_grad}
    assert frozen == {"bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                      "bert.embeddings.token_type_embeddings.weight"}
