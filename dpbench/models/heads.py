"""The classification head: how a sentence becomes the features the classifier sees, and how the
classifier starts.

``model.pooling``:
* ``cls`` (transformers' default): the family's own head on the first token (BERT: tanh pooler).
* ``mean``: the attention-masked mean of the last hidden states, then dropout and the family's
  classifier. Sentence encoders such as MiniLM (all-MiniLM-L6-v2) were trained for mean-pooled
  embeddings; their CLS pooler was not trained with them (a linear probe on 4,000 SST-2 sentences:
  0.794 dev on mean-pooled features, 0.644 on the pooler's, ``docs/recipes.md``). The pooler's
  parameters are removed, so no trainable parameter is left without a gradient.

``model.head_init``:
* ``default``: transformers' random init.
* ``zero``: the classifier's output layer starts at 0. The first logits are 0 (loss ln K) and the
  backbone receives no gradient until the classifier has moved: under DP this spends the first steps
  on the few head coordinates, where the noise per coordinate is the same but the signal is large.

The per-example computation is unchanged (mean pooling sums over one example's tokens), so
per-sample clipping and the privacy argument do not depend on these choices.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import SequenceClassifierOutput

from dpbench.choices import HEAD_INITS, POOLINGS
from dpbench.errors import ConfigError

MEAN_POOLING_FAMILIES = ("bert", "roberta")
_POOLED_CLASSES: dict[type, type] = {}


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` (B, T, H) over the positions where ``mask`` (B, T) is 1."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class MeanPooling:
    """Mixin for a transformers ``*ForSequenceClassification`` class: its head reads the masked mean
    of the encoder's last hidden states instead of the first token."""

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                **kwargs: Any) -> SequenceClassifierOutput:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("labels", "return_dict")}
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        pooled = masked_mean(hidden, attention_mask)
        if self.config.model_type == "roberta":  # RobertaClassificationHead reads features[:, 0]
            logits = self.classifier(pooled.unsqueeze(1))
        else:
            logits = self.classifier(self.dropout(pooled))
        return SequenceClassifierOutput(logits=logits)


def _mean_pooled_class(cls: type) -> type:
    """``MeanPooling`` over ``cls``, registered in this module so that a pickled model finds it."""
    if cls not in _POOLED_CLASSES:
        name = f"MeanPooled{cls.__name__}"
        pooled = type(name, (MeanPooling, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = _POOLED_CLASSES[cls] = pooled
    return _POOLED_CLASSES[cls]


def output_layer(model: nn.Module) -> nn.Linear:
    """The classifier's last Linear layer (BERT: ``classifier``; RoBERTa: ``classifier.out_proj``)."""
    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if head is not None else []
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no linear classifier to initialise; use model.head_init=default")
    return linears[-1]


def configure_head(model: nn.Module, family: str, pooling: str = "cls", init: str = "default") -> nn.Module:
    """Apply ``model.pooling`` and ``model.head_init`` to a freshly loaded classifier (in place)."""
    if pooling not in POOLINGS:
        raise ConfigError(f"model.pooling '{pooling}' is not supported; choose one of: {', '.join(POOLINGS)}")
    if init not in HEAD_INITS:
        raise ConfigError(f"model.head_init '{init}' is not supported; choose one of: {', '.join(HEAD_INITS)}")
    if pooling == "mean":
        if family not in MEAN_POOLING_FAMILIES:
            raise ConfigError(f"model.pooling=mean supports the {', '.join(MEAN_POOLING_FAMILIES)} families, "
                              f"not {family}; use model.pooling=cls")
        model.__class__ = _mean_pooled_class(type(model))
        if getattr(model.base_model, "pooler", None) is not None:
            model.base_model.pooler = None  # unused: its parameters would never get a gradient
    if init == "zero":
        layer = output_layer(model)
        with torch.no_grad():
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()
    return model
