"""DP-LoRA: peft's adapters are clipped per sample exactly like a naive per-example loop."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import TEXTS, tiny_batch, tiny_model
from dpbench.methods.finetune import apply_lora
from test_engine import check_against_naive, classification_loss

pytest.importorskip("peft")


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama"])
def test_lora_adapters_match_naive_loop(family: str) -> None:
    lm = tiny_model(family)
    apply_lora(lm, OmegaConf.create({"r": 2, "alpha": 4}))
    for name, p in lm.model.named_parameters():  # non-zero B, so that A's gradients are not all zero
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    trainable = [n for n, p in lm.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.split(".")[2] in ("classifier", "score") for n in trainable)
    batch = tiny_batch(lm, TEXTS)
    check_against_naive(lm.model, classification_loss(lm), batch, "bk")
