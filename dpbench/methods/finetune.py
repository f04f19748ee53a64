"""Fine-tuning recipes: full (non-private or DP-SGD/DP-Adam) and bias-only (DP-BiTFiT).

The recipe only decides which parameters train; the DP step is the shared one in ``base.py``.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from torch import nn

from dpbench.errors import ConfigError
from dpbench.models.registry import load_model
from dpbench.pipeline import load_task, make_record, plan_privacy, privacy_record, train_classifier
from dpbench.results.schema import RunRecord

HEAD_PREFIXES = ("classifier", "score", "pre_classifier")  # BERT/RoBERTa/DistilBERT, GPT-2/Llama
TRAINABLE_MODES = ("full", "bitfit")


def is_head(name: str) -> bool:
    return name.split(".")[0] in HEAD_PREFIXES


def select_trainable(model: nn.Module, mode: str) -> None:
    """``full``: every parameter. ``bitfit``: every bias plus the classification head
    (Bu et al.'s DP-BiTFiT keeps the task head trainable)."""
    if mode not in TRAINABLE_MODES:
        raise ConfigError(f"unknown method.trainable '{mode}'; choose one of: {', '.join(TRAINABLE_MODES)}")
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "full" or name.endswith("bias") or is_head(name))


def run(cfg: DictConfig, out_dir: Path) -> RunRecord:
    """One fine-tuning stage on the private training set, evaluated on dev."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    spec, train, dev = load_task(cfg.task, int(cfg.seed))
    private = bool(cfg.method.private)
    plan = plan_privacy(cfg, len(train), private=private)
    lm = load_model(cfg.model, spec.num_labels)
    select_trainable(lm.model, cfg.method.trainable)
    result = train_classifier(cfg, lm, spec, train, dev, plan, out_dir, seed=int(cfg.seed))
    stages = [result.stage] if result.stage else []
    record = privacy_record(stages, plan.delta, plan.target_epsilon, plan.clip_norm)
    return make_record(cfg, metrics=result.metrics, privacy=record, params=lm.num_params(),
                       train_s=result.train_s, steps=result.steps,
                       extra={"data": {"train_examples": len(train), "dev_examples": len(dev)}})
