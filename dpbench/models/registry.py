"""Build a (model, tokenizer) pair from a model config: hub name, local path, packaged weights or a
random-init config. The model-family quirks (which inputs to pass explicitly) live here, once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          PreTrainedTokenizerBase)

from dpbench.errors import ConfigError
from dpbench.models.heads import configure_head
from dpbench.models.tokenizers import load_tokenizer, resolve_source

FAMILIES = ("bert", "roberta", "distilbert", "gpt2", "llama")
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout",
                "attention_dropout", "seq_classif_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "summary_first_dropout")


@dataclass
class LoadedModel:
    """A model, its tokenizer and the family whose input conventions it follows."""

    name: str
    family: str
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase

    def inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Model kwargs for a collated batch. Position (and token-type) ids are passed explicitly
        with a real batch dimension, so per-sample hooks see (B, T) inputs, never a broadcast
        buffer. RoBERTa derives positions from ``input_ids`` per sample, so it gets none."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        kw: dict[str, Tensor] = {"input_ids": ids, "attention_mask": mask}
        if self.family != "roberta":
            kw["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
        if self.family in ("bert", "roberta"):
            kw["token_type_ids"] = batch.get("token_type_ids", torch.zeros_like(ids))
        return kw

    def num_params(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"trainable": trainable, "total": total}


def _set_dropout(config: Any, p: float) -> None:
    for key in DROPOUT_KEYS:
        if getattr(config, key, None) is not None:
            setattr(config, key, p)


def load_model(cfg: Mapping[str, Any], num_labels: int) -> LoadedModel:
    """Load the model described by ``cfg`` (a ``conf/model/*.yaml`` node) with a fresh
    ``num_labels``-way classification head, pooled and initialised as ``model.pooling`` and
    ``model.head_init`` say (:mod:`dpbench.models.heads`)."""
    lm = _load(cfg, AutoModelForSequenceClassification, num_labels=num_labels)
    configure_head(lm.model, lm.family, str(cfg.get("pooling") or "cls"), str(cfg.get("head_init") or "default"))
    return lm


def load_causal_lm(cfg: Mapping[str, Any]) -> LoadedModel:
    """Load ``cfg`` as a causal language model (its LM head), e.g. SmolLM2 from a GGUF file
    (``model.gguf_file``, dequantised to float32 by transformers)."""
    return _load(cfg, AutoModelForCausalLM)


def _load(cfg: Mapping[str, Any], auto_cls: Any, **config_kwargs: Any) -> LoadedModel:
    family = cfg.get("family")
    if family not in FAMILIES:
        raise ConfigError(f"model.family '{family}' is not supported; choose one of: {', '.join(FAMILIES)}")
    pretrained = cfg.get("pretrained")
    gguf = cfg.get("gguf_file")
    tokenizer_source = cfg.get("tokenizer") or pretrained
    if tokenizer_source is None:
        raise ConfigError(f"model '{cfg.get('name')}' has neither model.pretrained nor model.tokenizer; set one")
    tokenizer = load_tokenizer(tokenizer_source, cfg.get("tokenizer_kind", "auto"),
                               gguf if tokenizer_source == pretrained else None)

    overrides = dict(cfg.get("config") or {})
    file_kwargs = {"gguf_file": gguf} if gguf else {}
    if pretrained is None:  # random init from a config: tests and smoke runs
        overrides.setdefault("vocab_size", len(tokenizer))
        overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
        config = AutoConfig.for_model(family, **config_kwargs, **overrides)
    else:
        source = resolve_source(pretrained)
        try:
            config = AutoConfig.from_pretrained(source, **file_kwargs, **config_kwargs, **overrides)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load model '{pretrained}' ({type(e).__name__}); give a local folder, "
                              "an installed pkg:// source, or a hub name with network") from None
    if cfg.get("dropout") is not None:
        _set_dropout(config, float(cfg["dropout"]))
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id

    seed = cfg.get("init_seed")
    if seed is not None:
        torch.manual_seed(int(seed))
    if pretrained is None:
        model = auto_cls.from_config(config)
    else:
        model = auto_cls.from_pretrained(source, config=config, dtype=torch.float32, **file_kwargs)
    return LoadedModel(name=str(cfg.get("name")), family=family, model=model, tokenizer=tokenizer)
