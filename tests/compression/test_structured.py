"""Structured pruning: heads / neurons / layers really removed, and the pruned model computes exactly
what the dense model computes with the same units zeroed."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers

from dpbench.compression.structured import (drop_layers, encoder_layers, every_other_layer, head_importance,
                                             neuron_importance, remove_heads, remove_neurons, structure,
                                             structured_prune)
from dpbench.errors import ConfigError

HIDDEN, HEADS, FFN = 32, 4, 64
HEAD_SIZE = HIDDEN // HEADS
COMMON = dict(vocab_size=100, hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=FFN,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)


def make(family: str = "bert", layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    if family == "bert":
        config = transformers.BertConfig(num_hidden_layers=layers, max_position_embeddings=64, **COMMON)
        return transformers.BertForSequenceClassification(config).eval()
    config = transformers.RobertaConfig(num_hidden_layers=layers, max_position_embeddings=66, pad_token_id=1,
                                        **COMMON)
    return transformers.RobertaForSequenceClassification(config).eval()


def batch(pad_id: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, family: str = "bert") -> torch.Tensor:
    with torch.no_grad():
        return model(**batch(1 if family == "roberta" else 0)).logits


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def kept_heads(orig_layer, layer) -> list[int]:
    """Original indices of the heads still in ``layer`` (matched by their query rows)."""
    old = orig_layer.attention.self.query.weight.reshape(HEADS, -1)
    new = layer.attention.self.query.weight.reshape(-1, old.shape[1])
    return [int((old == row).all(1).nonzero()) for row in new]


def kept_neurons(orig_layer, layer) -> list[int]:
    old, new = orig_layer.intermediate.dense.weight, layer.intermediate.dense.weight
    return [int((old == row).all(1).nonzero()) for row in new]


def zero_units(layer, heads: list[int], neurons: list[int]) -> None:
    """Dense equivalent of removal: zero the units' q/k/v rows and biases, output columns, FFN rows."""
    attn = layer.attention.self
    with torch.no_grad():
        for h in heads:
            rows = slice(h * HEAD_SIZE, (h + 1) * HEAD_SIZE)
            for lin in (attn.query, attn.key, attn.value):
                lin.weight[rows] = 0
                lin.bias[rows] = 0
            layer.attention.output.dense.weight[:, rows] = 0
        for n in neurons:
            layer.intermediate.dense.weight[n] = 0
            layer.intermediate.dense.bias[n] = 0
            layer.output.dense.weight[:, n] = 0


# --- shapes and counts --------------------------------------------------------------------------------

def test_remove_shrinks_shapes_and_parameter_count():
    model = make()
    before = n_params(model)
    layer = encoder_layers(model)[0]
    remove_heads(layer, [1, 3])
    remove_neurons(layer, [0, 5, 7])
    attn = layer.attention.self
    for lin in (attn.query, attn.key, attn.value):
        assert lin.weight.shape == (2 * HEAD_SIZE, HIDDEN) and lin.bias.shape == (2 * HEAD_SIZE,)
    assert layer.attention.output.dense.weight.shape == (HIDDEN, 2 * HEAD_SIZE)
    assert layer.attention.output.dense.in_features == 2 * HEAD_SIZE
    assert (attn.num_attention_heads, attn.all_head_size) == (2, 2 * HEAD_SIZE)
    assert layer.intermediate.dense.weight.shape == (FFN - 3, HIDDEN)
    assert layer.intermediate.dense.out_features == FFN - 3
    assert layer.output.dense.weight.shape == (HIDDEN, FFN - 3) and layer.output.dense.in_features == FFN - 3
    per_head = 3 * (HEAD_SIZE * HIDDEN + HEAD_SIZE) + HIDDEN * HEAD_SIZE
    per_neuron = HIDDEN + 1 + HIDDEN
    assert before - n_params(model) == 2 * per_head + 3 * per_neuron
    assert structure(model) == {"heads": [2, HEADS], "neurons": [FFN - 3, FFN]}


def test_structured_prune_parameter_count_and_config_untouched():
    model = make()
    before = n_params(model)
    assert structured_prune(model, 0.5) == {"heads": [2, 2], "neurons": [32, 32]}
    per_head = 3 * (HEAD_SIZE * HIDDEN + HEAD_SIZE) + HIDDEN * HEAD_SIZE
    assert before - n_params(model) == 2 * (2 * per_head + 32 * (2 * HIDDEN + 1))
    assert (model.config.num_attention_heads, model.config.intermediate_size) == (HEADS, FFN)


@pytest.mark.parametrize("sparsity, heads, neurons", [
    (0.0, 4, 64), (0.25, 3, 48), (0.3, 2, 44), (0.5, 2, 32), (0.75, 1, 16), (0.99, 1, 1)])
def test_counts_use_ceil_of_original(sparsity, heads, neurons):
    assert structured_prune(make(), sparsity) == {"heads": [heads] * 2, "neurons": [neurons] * 2}


def test_iterative_is_cumulative_and_never_grows():
    model = make()
    assert structured_prune(model, 0.25) == {"heads": [3, 3], "neurons": [48, 48]}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for s in (0.25, 0.1, 0.0):  # same or smaller: nothing removed
        assert structured_prune(model, s) == {"heads": [3, 3], "neurons": [48, 48]}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert structured_prune(model, 0.5) == structured_prune(make(), 0.5) == {"heads": [2, 2], "neurons": [32, 32]}


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError):
        structured_prune(make(), sparsity)


def test_remove_refuses_all_or_bad_indices():
    layer = encoder_layers(make())[0]
    for bad in ([0, 1, 2, 3], [4], [-1], [1, 1]):
        with pytest.raises(ValueError):
            remove_heads(layer, bad)
    for bad in (list(range(FFN)), [FFN], [2, 2]):
        with pytest.raises(ValueError):
            remove_neurons(layer, bad)
    assert layer.attention.self.num_attention_heads == HEADS  # refused calls left the layer alone
    assert layer.attention.self.query.weight.shape == (HIDDEN, HIDDEN)
    assert layer.intermediate.dense.weight.shape == (FFN, HIDDEN)


# --- function preserved -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_pruned_equals_dense_with_units_zeroed(family):
    dense = make(family)
    pruned = copy.deepcopy(dense)
    structured_prune(pruned, 0.5)
    zeroed = copy.deepcopy(dense)
    for orig, small, z in zip(encoder_layers(dense), encoder_layers(pruned), encoder_layers(zeroed)):
        heads, neurons = kept_heads(orig, small), kept_neurons(orig, small)
        assert len(heads) == 2 and len(neurons) == 32
        zero_units(z, [h for h in range(HEADS) if h not in heads], [n for n in range(FFN) if n not in neurons])
    out = logits(pruned, family)
    torch.testing.assert_close(out, logits(zeroed, family), rtol=1e-5, atol=1e-5)
    assert (out - logits(dense, family)).abs().max() > 1e-3  # the removed units did matter


def test_explicit_removal_equals_zeroing_with_different_sets_per_layer():
    dense = make()
    pruned, zeroed = copy.deepcopy(dense), copy.deepcopy(dense)
    plan = [([0, 2], [1, 10, 63]), ([3], list(range(0, FFN, 2)))]
    for (heads, neurons), small, z in zip(plan, encoder_layers(pruned), encoder_layers(zeroed)):
        remove_heads(small, heads)
        remove_neurons(small, neurons)
        zero_units(z, heads, neurons)
    torch.testing.assert_close(logits(pruned), logits(zeroed), rtol=1e-5, atol=1e-5)


def test_removes_least_important_units():
    model = make()
    layer = encoder_layers(model)[0]
    rows = slice(2 * HEAD_SIZE, 3 * HEAD_SIZE)
    with torch.no_grad():
        for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
            lin.weight[rows] *= 5
        layer.intermediate.dense.weight[40] *= 5
    assert int(head_importance(layer).argmax()) == 2 and int(neuron_importance(layer).argmax()) == 40
    orig = copy.deepcopy(model)
    structured_prune(model, 0.99)  # one head, one neuron left per layer
    assert kept_heads(encoder_layers(orig)[0], layer) == [2]
    assert kept_neurons(encoder_layers(orig)[0], layer) == [40]


def test_survivors_at_least_as_important_as_removed():
    orig = make(seed=3)
    model = copy.deepcopy(orig)
    structured_prune(model, 0.5)
    for o, layer in zip(encoder_layers(orig), encoder_layers(model)):
        for imp, kept in ((head_importance(o), kept_heads(o, layer)), (neuron_importance(o), kept_neurons(o, layer))):
            removed = [i for i in range(len(imp)) if i not in kept]
            assert imp[kept].min() >= imp[removed].max()


def test_importance_matches_definition():
    layer = encoder_layers(make())[0]
    attn, h = layer.attention.self, 1
    rows = slice(h * HEAD_SIZE, (h + 1) * HEAD_SIZE)
    parts = [t for lin in (attn.query, attn.key, attn.value) for t in (lin.weight[rows], lin.bias[rows])]
    parts.append(layer.attention.output.dense.weight[:, rows])
    expected = torch.cat([p.reshape(-1) for p in parts]).norm()
    torch.testing.assert_close(head_importance(layer)[h], expected)
    n = 7
    ffn = layer.intermediate.dense
    parts = [ffn.weight[n], ffn.bias[n:n + 1], layer.output.dense.weight[:, n]]
    torch.testing.assert_close(neuron_importance(layer)[n], torch.cat(parts).norm())
    assert head_importance(layer).shape == (HEADS,) and neuron_importance(layer).shape == (FFN,)


# --- training after pruning ---------------------------------------------------------------------------

def test_training_after_pruning_gives_small_gradients_and_keeps_flags_and_dtype():
    model = make().double()
    layer = encoder_layers(model)[0]
    layer.attention.self.key.bias.requires_grad_(False)
    structured_prune(model, 0.5)
    assert not layer.attention.self.key.bias.requires_grad
    assert all(p.dtype == torch.float64 for p in model.parameters())
    model.train()
    loss = F.cross_entropy(model(**batch()).logits, torch.tensor([0, 1, 1]))
    loss.backward()
    assert layer.attention.self.query.weight.grad.shape == (2 * HEAD_SIZE, HIDDEN)
    assert layer.attention.output.dense.weight.grad.shape == (HIDDEN, 2 * HEAD_SIZE)
    assert layer.intermediate.dense.weight.grad.shape == (32, HIDDEN)
    assert layer.output.dense.weight.grad.shape == (HIDDEN, 32)
    assert layer.attention.self.key.bias.grad is None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    before = layer.output.dense.weight.detach().clone()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert not torch.equal(before, layer.output.dense.weight)


# --- layers -------------------------------------------------------------------------------------------

def test_every_other_layer():
    assert every_other_layer(4) == [0, 2]
    assert every_other_layer(5) == [0, 2, 4]
    assert every_other_layer(12) == [0, 2, 4, 6, 8, 10]
    assert every_other_layer(1) == [0]
    with pytest.raises(ValueError):
        every_other_layer(0)


def test_drop_layers_keeps_weights_and_equals_a_shallower_model():
    orig = make(layers=4)
    model = copy.deepcopy(orig)
    drop_layers(model, every_other_layer(4))
    assert model.config.num_hidden_layers == 2 and len(encoder_layers(model)) == 2
    for new, old in zip(encoder_layers(model), [encoder_layers(orig)[0], encoder_layers(orig)[2]]):
        assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))
    assert encoder_layers(model)[1].attention.self.layer_idx == 1
    shallow = make(layers=2, seed=9)
    shallow.load_state_dict(model.state_dict(), strict=True)
    out = logits(model)
    assert out.shape == (3, 2)
    torch.testing.assert_close(out, logits(shallow), rtol=1e-5, atol=1e-5)
    assert (out - logits(orig)).abs().max() > 1e-3


def test_drop_layers_reorders_and_rejects_bad_indices():
    model = make(layers=4)
    third = encoder_layers(model)[3]
    drop_layers(model, [3, 1])
    assert encoder_layers(model)[0] is third and third.attention.self.layer_idx == 0
    for bad in ([], [2], [-1], [0, 0]):
        with pytest.raises(ValueError):
            drop_layers(model, bad)
    assert model.config.num_hidden_layers == 2


def test_then_prune_after_dropping_layers():
    model = make(layers=4)
    drop_layers(model, [0, 2])
    assert structured_prune(model, 0.5) == {"heads": [2, 2], "neurons": [32, 32]}
    assert logits(model).shape == (3, 2)


# --- unsupported models -------------------------------------------------------------------------------

def test_gpt2_is_refused_with_a_config_error():
    config = transformers.GPT2Config(vocab_size=100, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.GPT2ForSequenceClassification(config)
    for call in (lambda: structured_prune(model, 0.5), lambda: structure(model)):
        with pytest.raises(ConfigError, match="unstructured method for gpt2"):
            call()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_layers_can_be_dropped_and_still_generate(family: str) -> None:
    """Layer dropping also builds decoder students (DistilDP): layer_idx renumbered, cache generation works."""
    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=4, n_head=2,
                                                                     n_positions=32))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=32))
    kept = [model.base_model.h[i] if family == "gpt2" else model.base_model.layers[i] for i in (0, 2)]
    drop_layers(model, every_other_layer(4))
    layers = model.base_model.h if family == "gpt2" else model.base_model.layers
    assert list(layers) == kept and model.config.num_hidden_layers == 2
    idx = [m.layer_idx for layer in layers for m in layer.modules() if hasattr(m, "layer_idx")]
    assert idx and set(idx) == {0, 1}
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
