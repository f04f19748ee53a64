"""Checks on a composed config that Hydra cannot do: one-line errors that name the fix."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from dpbench.choices import (ACCELERATORS, ACCOUNTANTS, CLIP_SPLITS, CLIPPINGS, DIVERGENCES, ENGINES, GRANULARITIES,
                             GLUE_TASKS, HEAD_INITS, OPTIMIZERS, POOLINGS, PRECISIONS, PRUNE_SCOPES, REPAIR_CORPORA,
                             SCHEDULES, STUDENT_SELECTIONS)
from dpbench.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """What one option accepts: its type (int, float, bool or str), a range or a set of names, the rule in
    words and an example value for the one-line error."""

    kind: type
    words: str
    example: str
    ok: Callable[[Any], bool] = lambda _: True
    nullable: bool = False

    def accepts(self, v: Any) -> bool:
        if v is None:
            return self.nullable
        if self.kind is bool:
            return isinstance(v, bool)
        if self.kind is int:
            return isinstance(v, int) and not isinstance(v, bool) and self.ok(v)
        if self.kind is float:
            return _finite(v) and self.ok(v)
        return isinstance(v, str) and self.ok(v)


def integer(lo: int, example: str, nullable: bool = False) -> Rule:
    return Rule(int, f"an integer >= {lo}" + (" or null" if nullable else ""), example, lambda x: x >= lo, nullable)


def number(words: str, ok: Callable[[float], bool], example: str, nullable: bool = False) -> Rule:
    return Rule(float, f"a number {words}" + (" or null" if nullable else ""), example, ok, nullable)


def one_of(names: tuple[str, ...], nullable: bool = False) -> Rule:
    return Rule(str, "one of: " + ", ".join(names) + (" (or null)" if nullable else ""), names[0],
                lambda x: x in names, nullable)


FLAG = Rule(bool, "true or false", "true")
POSITIVE = number("> 0", lambda x: x > 0, "1.0")
FRACTION = number("in [0, 1)", lambda x: 0 <= x < 1, "0.5")
OPEN_FRACTION = number("in (0, 1)", lambda x: 0 < x < 1, "0.5")
UNIT = number("in [0, 1]", lambda x: 0 <= x <= 1, "0.5")
NON_NEGATIVE = number(">= 0", lambda x: x >= 0, "0.0")


def _optimizer(prefix: str) -> dict[str, Rule]:
    return {f"{prefix}.name": one_of(OPTIMIZERS), f"{prefix}.lr": number("> 0", lambda x: x > 0, "1e-3"),
            f"{prefix}.weight_decay": NON_NEGATIVE, f"{prefix}.schedule": one_of(SCHEDULES),
            f"{prefix}.warmup_steps": integer(0, "0"), f"{prefix}.momentum": FRACTION,
            f"{prefix}.gamma": number("> 0", lambda x: x > 0, "1e-8")}


def _generation(prefix: str) -> dict[str, Rule]:
    return {f"{prefix}.batch_size": integer(1, "16"), f"{prefix}.max_new_tokens": integer(1, "64"),
            f"{prefix}.num_samples": integer(1, "400"), f"{prefix}.top_k": integer(0, "50"),
            f"{prefix}.top_p": number("in (0, 1]", lambda x: 0 < x <= 1, "0.9")}


# Every option in conf/ that takes a number, a flag or a name; checked when the composed config has the key.
RULES: dict[str, Rule] = {
    "seed": integer(0, "0"), "audit": FLAG, "replace_completed_run": FLAG,
    "tuning.trial": FLAG, "tuning.report_dev": FLAG,
    "tuning.holdout_fraction": number("in (0, 1)", lambda x: 0 < x < 1, "0.03", nullable=True),
    "trainer.max_steps": integer(1, "100", nullable=True), "trainer.accelerator": one_of(ACCELERATORS),
    "trainer.devices": integer(1, "1"), "trainer.precision": one_of(PRECISIONS),
    "trainer.num_threads": integer(1, "2", nullable=True), "trainer.reuse_freed_memory": FLAG,
    "trainer.eval_batch_size": integer(1, "64"), "trainer.log_every_n_steps": integer(1, "10"),
    "trainer.progress_bar": FLAG, "trainer.checkpoint_every_n_steps": integer(0, "50"),
    "privacy.accountant": one_of(ACCOUNTANTS), "privacy.clipping": one_of(CLIPPINGS),
    "privacy.engine": one_of(ENGINES), "privacy.allow_large_delta": FLAG, "privacy.self_check": FLAG,
    "privacy.batch_size": integer(1, "1000"), "privacy.physical_batch_size": integer(1, "32"),
    "privacy.physical_batch_tokens": integer(1, "4096", nullable=True), "privacy.group_by_length": FLAG,
    "model.pooling": one_of(POOLINGS), "model.head_init": one_of(HEAD_INITS),
    "model.dropout": number("in [0, 1)", lambda x: 0 <= x < 1, "0.1", nullable=True),
    "model.init_seed": integer(0, "0", nullable=True),
    "task.max_length": integer(2, "128"), "task.max_train_examples": integer(1, "1000", nullable=True),
    "task.max_eval_examples": integer(1, "500", nullable=True),
    "task.holdout_examples": integer(1, "2000", nullable=True), "task.holdout_seed": integer(0, "0"),
    "task.num_train": integer(1, "2000"), "task.num_dev": integer(1, "500"), "task.num_eval": integer(1, "200"), "task.data_seed": integer(0, "0"),
    "task.label_noise": number("in [0, 0.5)", lambda x: 0 <= x < 0.5, "0.0"), "task.simple_fraction": UNIT,
    "method.private": FLAG, "method.freeze_embeddings": FLAG,
    **_optimizer("method.optimizer"), **_optimizer("method.student_optimizer"),
    "method.lora.r": integer(1, "8"), "method.lora.alpha": POSITIVE, "method.lora.dropout": FRACTION,
    "method.anadp.warmup_steps": integer(0, "10"), "method.anadp.beta1": FRACTION, "method.anadp.beta2": FRACTION,
    "method.anadp.temperature": POSITIVE, "method.anadp.uniform_share": UNIT,
    "method.anadp.clip_split": one_of(CLIP_SPLITS), "method.anadp.groups": one_of(GRANULARITIES),
    "method.anadp.clip_quantile": number("in (0, 1)", lambda x: 0 < x < 1, "0.5", nullable=True),
    "method.anadp.clip_lr": POSITIVE, "method.anadp.count_share": OPEN_FRACTION,
    "method.compression.sparsity": FRACTION, "method.compression.iterations": integer(1, "3"),
    "method.compression.scope": one_of(PRUNE_SCOPES), "method.compression.pretrain": FLAG,
    "method.compression.structured": FLAG, "method.student.width_sparsity": FRACTION,
    "method.budget_split": OPEN_FRACTION, "method.kd.lam": UNIT, "method.kd.temperature": POSITIVE,
    "method.kd.alpha": NON_NEGATIVE, "method.student_epochs": POSITIVE,
    "method.student_batch_size": integer(1, "8", nullable=True),
    "method.eval.window": integer(1, "128"), "method.eval.stride": integer(1, "128"),
    **_generation("method.generation"), **_generation("method.student.repair.generation"),
    "method.eval.before_private": FLAG, "method.student.repair.enabled": FLAG,
    "method.student.repair.epochs": POSITIVE, "method.student.repair.batch_size": integer(1, "32"),
    "method.student.repair.lam": UNIT, "method.student.repair.temperature": POSITIVE,
    "method.student.repair.seed": integer(0, "0"), **_optimizer("method.student.repair.optimizer"),
    "method.student.repair.corpus": one_of(REPAIR_CORPORA), "method.student.repair.public.task": one_of(GLUE_TASKS),
    "method.student.repair.public.max_tokens": integer(2, "200000"),
    "method.student.select": one_of(STUDENT_SELECTIONS), "method.student.num_layers": integer(1, "15", nullable=True),
    "method.onpolicy.rounds": integer(1, "4"), "method.onpolicy.samples_per_round": integer(1, "500"),
    "method.onpolicy.epochs_per_round": POSITIVE, "method.onpolicy.divergence": one_of(DIVERGENCES),
    "method.onpolicy.beta": number("in (0, 1)", lambda x: 0 < x < 1, "0.5"),
}

_MISSING = object()


def _num(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for values no run could use."""
    for key, rule in RULES.items():
        v = _num(cfg, key, _MISSING)
        if v is not _MISSING and not rule.accepts(v):
            raise ConfigError(f"{key} must be {rule.words} (got {v!r}); set e.g. {key}={rule.example}"
                              + (" (an RDP epsilon is reported beside the PRV one)" if key == "privacy.accountant" else ""))
    private = bool(_num(cfg, "method.private"))
    eps = _num(cfg, "privacy.epsilon")
    sigma = _num(cfg, "privacy.noise_multiplier")
    if private:
        if sigma is None and (eps is None or not _finite(eps) or eps <= 0):
            raise ConfigError(f"privacy.epsilon must be a number > 0 (got {eps}); set e.g. privacy.epsilon=8")
        if sigma is not None and (not _finite(sigma) or sigma < 0):
            raise ConfigError(f"privacy.noise_multiplier must be >= 0 (got {sigma}); or set it to null to calibrate")
        clip = _num(cfg, "privacy.clip_norm")
        if clip is None or not _finite(clip) or clip <= 0:
            raise ConfigError(f"privacy.clip_norm must be > 0 (got {clip}); set e.g. privacy.clip_norm=1.0")
    delta = _num(cfg, "privacy.delta")
    if delta is not None and not (_finite(delta) and 0 < delta < 1):
        raise ConfigError(f"privacy.delta must be in (0, 1) (got {delta}); set it to null for 1/(2n)")
    epochs, max_steps = _num(cfg, "privacy.epochs"), _num(cfg, "trainer.max_steps")
    if max_steps is None and (epochs is None or not _finite(epochs) or epochs <= 0):
        raise ConfigError(f"privacy.epochs must be > 0 (got {epochs}); or set trainer.max_steps")


def check_devices(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` when the accelerator asked for is not on this machine (imports torch)."""
    accelerator = _num(cfg, "trainer.accelerator") or "cpu"
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator}, but this machine has no CUDA GPU that torch can "
                              "use; set trainer.accelerator=cpu")
        devices = _num(cfg, "trainer.devices") or 1
        if devices > torch.cuda.device_count():
            raise ConfigError(f"trainer.devices={devices}, but this machine has {torch.cuda.device_count()} GPU(s); "
                              f"set trainer.devices={torch.cuda.device_count()}")


def check_sources(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for a model or tokenizer source missing from this machine: an
    uninstalled ``pkg://`` package or a local path that does not exist (hub names are left to the loader)."""
    from dpbench.models.tokenizers import PKG_PREFIX, resolve_source

    for key in ("model.pretrained", "model.tokenizer"):
        source = _num(cfg, key)
        if not isinstance(source, str):
            continue
        if source.startswith(PKG_PREFIX):
            try:
                resolve_source(source)
            except ConfigError as e:
                raise ConfigError(f"{key}: {e}") from None
        elif source.startswith(("/", ".", "~")) and not Path(source).expanduser().exists():
            raise ConfigError(f"{key} '{source}' does not exist; give a model folder, a pkg:// source or a hub name")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
