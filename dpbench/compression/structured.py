"""Structured pruning of BERT-family encoders: remove whole attention heads, feed-forward neurons
and encoder layers, so the weight matrices really shrink (unlike masks, which only zero entries).

Layout assumed (``BertForSequenceClassification`` / ``RobertaForSequenceClassification``), per
encoder layer: ``attention.self.{query,key,value}`` (hidden -> heads * head_size),
``attention.output.dense`` (heads * head_size -> hidden), ``intermediate.dense`` (hidden -> F) and
``output.dense`` (F -> hidden). Head ``h`` owns rows ``h*d:(h+1)*d`` of q/k/v and the same columns
of the attention output projection. Self-attention reshapes to ``(..., -1, head_size)`` and the
mask broadcasts over heads, so nothing else depends on the head count; ``num_attention_heads`` and
``all_head_size`` are kept in step anyway. ``model.config`` keeps the ORIGINAL head and neuron
counts (sparsity is measured against them); the current sizes come from :func:`structure`.

Head and neuron indices given to :func:`remove_heads` / :func:`remove_neurons` refer to the
layer's CURRENT heads / neurons (0 .. current count - 1).
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from dpbench.errors import ConfigError

SUPPORTED_TYPES = ("bert", "roberta")


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder layers of a BERT/RoBERTa model; :class:`ConfigError` for any other model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    encoder = getattr(getattr(model, "base_model", None), "encoder", None)
    layers = getattr(encoder, "layer", None)
    if model_type not in SUPPORTED_TYPES or not isinstance(layers, nn.ModuleList):
        raise ConfigError("structured pruning supports BERT/RoBERTa-style encoders (model.family bert or "
                          f"roberta); use an unstructured method for {model_type or type(model).__name__}")
    return layers


def structure(model: nn.Module) -> dict[str, list[int]]:
    """Current number of attention heads and feed-forward neurons in each encoder layer."""
    layers = encoder_layers(model)
    return {"heads": [layer.attention.self.num_attention_heads for layer in layers],
            "neurons": [layer.intermediate.dense.out_features for layer in layers]}


# --- importance ------------------------------------------------------------------------------------

def _out_sq_norms(linear: nn.Linear, groups: int) -> Tensor:
    """Sum of squares of each of ``groups`` equal blocks of output rows (weight rows and bias)."""
    total = linear.weight.detach().reshape(groups, -1).pow(2).sum(1)
    if linear.bias is not None:
        total = total + linear.bias.detach().reshape(groups, -1).pow(2).sum(1)
    return total


def _in_sq_norms(linear: nn.Linear, groups: int) -> Tensor:
    """Sum of squares of each of ``groups`` equal blocks of input columns of the weight."""
    return linear.weight.detach().reshape(linear.out_features, groups, -1).pow(2).sum((0, 2))


def head_importance(layer: nn.Module) -> Tensor:
    """L2 norm, per current head, of its q/k/v rows (weights and biases) and its output-projection
    columns; shape ``(heads,)``."""
    attn = layer.attention.self
    heads = attn.num_attention_heads
    sq = sum(_out_sq_norms(lin, heads) for lin in (attn.query, attn.key, attn.value))
    return (sq + _in_sq_norms(layer.attention.output.dense, heads)).sqrt()


def neuron_importance(layer: nn.Module) -> Tensor:
    """L2 norm, per feed-forward neuron, of its ``intermediate.dense`` row (weight and bias) and its
    ``output.dense`` column; shape ``(neurons,)``."""
    neurons = layer.intermediate.dense.out_features
    return (_out_sq_norms(layer.intermediate.dense, neurons) + _in_sq_norms(layer.output.dense, neurons)).sqrt()


# --- removal ---------------------------------------------------------------------------------------

def _slice_linear(linear: nn.Module, keep: Tensor, dim: int) -> nn.Linear:
    """A new ``nn.Linear`` holding copies of ``linear``'s output rows (``dim=0``, bias sliced too) or
    input columns (``dim=1``) at indices ``keep``; dtype, device and ``requires_grad`` preserved."""
    if type(linear) is not nn.Linear:
        raise ConfigError(f"structured pruning needs plain nn.Linear layers, found {type(linear).__name__}; "
                          "prune before adding adapters or hooks")
    weight = linear.weight.detach().index_select(dim, keep.to(linear.weight.device)).clone()
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias.detach()
        bias = bias.index_select(0, keep.to(bias.device)).clone() if dim == 0 else bias.clone()
        new.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    new.train(linear.training)
    return new


def _kept(total: int, remove: Sequence[int], what: str) -> Tensor:
    """Sorted indices in ``range(total)`` not in ``remove``; ValueError for bad or all indices."""
    drop = {int(i) for i in remove}
    if len(drop) != len(remove) or not all(0 <= i < total for i in drop):
        raise ValueError(f"{what} to remove must be distinct indices in [0, {total}), got {list(remove)}")
    if len(drop) == total:
        raise ValueError(f"cannot remove all {total} {what} of a layer; keep at least one")
    return torch.tensor([i for i in range(total) if i not in drop], dtype=torch.long)


def remove_heads(layer: nn.Module, heads: Sequence[int]) -> None:
    """Remove the given (current) attention heads from ``layer`` by shrinking q/k/v and the
    attention output projection."""
    attn = layer.attention.self
    kept_heads = _kept(attn.num_attention_heads, heads, "heads")
    if len(kept_heads) == attn.num_attention_heads:
        return
    size = attn.attention_head_size
    rows = (kept_heads[:, None] * size + torch.arange(size)).reshape(-1)
    for name in ("query", "key", "value"):
        setattr(attn, name, _slice_linear(getattr(attn, name), rows, dim=0))
    layer.attention.output.dense = _slice_linear(layer.attention.output.dense, rows, dim=1)
    attn.num_attention_heads = len(kept_heads)
    attn.all_head_size = len(kept_heads) * size


def remove_neurons(layer: nn.Module, neurons: Sequence[int]) -> None:
    """Remove the given (current) feed-forward neurons from ``layer``."""
    kept = _kept(layer.intermediate.dense.out_features, neurons, "neurons")
    if len(kept) == layer.intermediate.dense.out_features:
        return
    layer.intermediate.dense = _slice_linear(layer.intermediate.dense, kept, dim=0)
    layer.output.dense = _slice_linear(layer.output.dense, kept, dim=1)


def _least_important(importance: Tensor, original: int, sparsity: float) -> list[int]:
    """Indices of the least important units to remove so that ``ceil(sparsity * original)`` of the
    ``original`` units are gone in all (at least one stays; nothing already removed comes back)."""
    target = min(math.ceil(sparsity * original - 1e-9), original - 1)
    n = max(0, target - (original - importance.numel()))
    return torch.argsort(importance, stable=True)[:n].tolist()


def structured_prune(model: nn.Module, sparsity: float) -> dict[str, list[int]]:
    """Remove, in every encoder layer, the lowest-magnitude heads and feed-forward neurons until
    ``ceil(sparsity * original)`` of each are gone (original counts from ``model.config``).

    Cumulative: a later call with a larger sparsity removes more (importance recomputed on the
    current weights); the same or a smaller one removes nothing. Returns :func:`structure`.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"structured sparsity must be in [0, 1), got {sparsity}")
    layers = encoder_layers(model)
    heads, neurons = model.config.num_attention_heads, model.config.intermediate_size
    with torch.no_grad():
        for layer in layers:
            remove_heads(layer, _least_important(head_importance(layer), heads, sparsity))
            remove_neurons(layer, _least_important(neuron_importance(layer), neurons, sparsity))
    return structure(model)


# --- layers ----------------------------------------------------------------------------------------

def every_other_layer(n: int) -> list[int]:
    """DistilBERT-style layer selection: ``[0, 2, 4, ...]``, i.e. ``ceil(n / 2)`` of ``n`` layers."""
    if n < 1:
        raise ValueError(f"need at least one layer, got {n}")
    return list(range(0, n, 2))


_LAYER_LISTS = (("encoder", "layer"), ("", "h"), ("", "layers"))  # BERT/RoBERTa, GPT-2, Llama


def transformer_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, layers) of the model's stack of transformer blocks (encoder or decoder)."""
    base = getattr(model, "base_model", model)
    for sub, attr in _LAYER_LISTS:
        parent = getattr(base, sub, None) if sub else base
        layers = getattr(parent, attr, None) if parent is not None else None
        if isinstance(layers, nn.ModuleList):
            return parent, attr, layers
    raise ConfigError(f"cannot find the transformer layers of {type(model).__name__}; "
                      "layer dropping supports BERT, RoBERTa, GPT-2 and Llama models")


def drop_layers(model: nn.Module, keep: Sequence[int]) -> None:
    """Keep only transformer layers ``keep`` (in that order) and update the config's layer count.

    Kept layers' ``layer_idx`` attributes (used by decoders' KV caches) are renumbered.
    """
    parent, attr, layers = transformer_layers(model)
    idx = [int(i) for i in keep]
    if not idx or len(set(idx)) != len(idx) or not all(0 <= i < len(layers) for i in idx):
        raise ValueError(f"layers to keep must be one or more distinct indices in [0, {len(layers)}), "
                         f"got {list(keep)}")
    kept = [layers[i] for i in idx]
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    setattr(parent, attr, nn.ModuleList(kept))
    config = model.config
    config.num_hidden_layers = len(kept)  # an alias of n_layer on GPT-2's config
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in idx]


def copy_with_layers(model: nn.Module, keep: Sequence[int] | None = None) -> nn.Module:
    """A deep copy of ``model`` keeping transformer layers ``keep`` (None → every other layer):
    the usual student initialisation, with the teacher's tokenizer and width."""
    student = copy.deepcopy(model)
    n = len(transformer_layers(student)[2])
    drop_layers(student, list(keep) if keep is not None else every_other_layer(n))
    return student
