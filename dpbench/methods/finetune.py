"""Fine-tuning recipes: full (non-private or DP-SGD/DP-Adam), bias-only (DP-BiTFiT) and LoRA adapters
(DP-LoRA, with peft), each with uniform noise or ANADP's allocation (``method.anadp``).

The recipe only decides which parameters train; the DP step is the shared one in ``base.py``.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from torch import nn

from dpbench.errors import ConfigError
from dpbench.models.registry import LoadedModel, load_model
from dpbench.pipeline import (data_record, evaluate, load_dev, load_task, make_record, plan_privacy, privacy_record,
                              train_classifier)
from dpbench.results.schema import RunRecord

HEAD_PREFIXES = ("classifier", "score", "pre_classifier")  # BERT/RoBERTa/DistilBERT, GPT-2/Llama
TRAINABLE_MODES = ("full", "bitfit", "lora")
LORA_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
                "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}  # Hu et al. / Yu et al.: W_q and W_v


def is_head(name: str) -> bool:
    return name.removeprefix("base_model.model.").split(".")[0] in HEAD_PREFIXES


def apply_lora(lm: LoadedModel, lora: DictConfig | None) -> None:
    """Wrap ``lm.model`` with peft LoRA adapters (rank r, scale alpha/r) on the family's attention
    projections; adapters and the task head train, everything else is frozen."""
    from peft import LoraConfig, get_peft_model

    lora = lora or {}
    targets = list(lora.get("target_modules") or LORA_TARGETS[lm.family])
    config = LoraConfig(r=int(lora.get("r", 8)), lora_alpha=float(lora.get("alpha", 16)),
                        lora_dropout=float(lora.get("dropout", 0.0)), target_modules=targets, bias="none",
                        fan_in_fan_out=lm.family == "gpt2")
    lm.model = get_peft_model(lm.model, config)
    for name, p in lm.model.named_parameters():
        if is_head(name):
            p.requires_grad_(True)


def select_trainable(model: nn.Module, mode: str) -> None:
    """``full``: every parameter. ``bitfit``: every bias plus the classification head
    (Bu et al.'s DP-BiTFiT keeps the task head trainable). (``lora`` is :func:`apply_lora`.)"""
    if mode not in TRAINABLE_MODES or mode == "lora":
        raise ConfigError(f"unknown method.trainable '{mode}'; choose one of: full, bitfit")
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "full" or name.endswith("bias") or is_head(name))


def freeze_embeddings(model: nn.Module) -> None:
    """Freeze every embedding table (word, position, token type). In MiniLM the word embeddings are
    half of the 22.7M parameters; under DP each of their coordinates gets noise at every step while
    only the rows of the batch's tokens get signal."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.weight.requires_grad_(False)


def set_trainable(lm: LoadedModel, method: DictConfig) -> None:
    """The method's trainable parameter set: full, bitfit or lora (``method.lora``), with the
    embedding tables frozen if ``method.freeze_embeddings``."""
    mode = method.trainable
    if mode not in TRAINABLE_MODES:
        raise ConfigError(f"unknown method.trainable '{mode}'; choose one of: {', '.join(TRAINABLE_MODES)}")
    if mode == "lora":
        apply_lora(lm, method.get("lora"))
    else:
        select_trainable(lm.model, mode)
    if method.get("freeze_embeddings", False):
        freeze_embeddings(lm.model)


def run(cfg: DictConfig, out_dir: Path) -> RunRecord:
    """One fine-tuning stage on the private training set, evaluated on dev."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    tuning = cfg.get("tuning") or {}
    fraction = tuning.get("holdout_fraction")  # a dpbench-tune trial: a per-example split
    spec, train, dev = load_task(cfg.task, int(cfg.seed), holdout_fraction=fraction)
    private = bool(cfg.method.private)
    plan = plan_privacy(cfg, len(train), private=private)
    lm = load_model(cfg.model, spec.num_labels)
    set_trainable(lm, cfg.method)
    result = train_classifier(cfg, lm, spec, train, dev, plan, out_dir, seed=int(cfg.seed))
    stages = [result.stage] if result.stage else []
    record = privacy_record(stages, plan.delta, plan.target_epsilon, plan.clip_norm)
    extra = {"data": data_record(cfg.task, train, dev, held_out=True if fraction is not None else None)}
    if tuning.get("report_dev") and extra["data"]["eval_split"] == "holdout":
        official = load_dev(cfg.task)
        extra["dev_metrics"] = evaluate(cfg, result.module, lm, official)
        extra["data"]["official_dev_examples"] = len(official)
    alloc = result.module.allocation
    if alloc is not None:
        extra["anadp"] = {"groups": result.module.group_names, "clip_norms": alloc.clip_norms.tolist(),
                          "final_noise_multipliers": alloc.noise_multipliers().tolist(),
                          "sigma_eff": [min(alloc.sigma_eff_history), max(alloc.sigma_eff_history)]}
        if alloc.adaptive:  # the counts' share of the mechanism (σ_eff above includes it)
            extra["anadp"]["adaptive_clipping"] = {"quantile": alloc.cfg.clip_quantile, "lr": alloc.cfg.clip_lr,
                                                   "count_noise_multiplier": alloc.count_sigma,
                                                   "gradient_noise_multiplier": alloc.grad_sigma}
    return make_record(cfg, metrics=result.metrics, privacy=record, params=lm.num_params(),
                       results=[result], extra=extra)
