"""Block Influence (ShortGPT): a layer that leaves the hidden state unchanged scores 0 and is the first to go."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dpbench.compression.layer_influence import block_influence, most_influential


def test_an_identity_layer_has_zero_influence_and_is_dropped_first() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=4, n_head=2, n_positions=32))
    block = model.transformer.h[1]
    for proj in (block.attn.c_proj, block.mlp.c_proj):  # the residual branches add nothing: h_out = h_in
        torch.nn.init.zeros_(proj.weight), torch.nn.init.zeros_(proj.bias)
    model.train()
    influence = block_influence(model, torch.randint(0, 64, (3, 12)))
    assert len(influence) == 4 and influence[1] == pytest.approx(0.0, abs=1e-6)
    assert all(b > 1e-3 for i, b in enumerate(influence) if i != 1)
    assert model.training  # mode restored
    assert most_influential(influence, 3) == [0, 2, 3]


def test_most_influential_keeps_model_order_and_refuses_bad_counts() -> None:
    assert most_influential([0.5, 0.1, 0.9, 0.1], 2) == [0, 2]
    assert most_influential([0.5, 0.1, 0.9, 0.1], 3) == [0, 1, 2]  # a tie goes to the earlier layer
    with pytest.raises(ValueError, match="cannot keep 5 of 4"):
        most_influential([0.5, 0.1, 0.9, 0.1], 5)
