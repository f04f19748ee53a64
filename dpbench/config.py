"""Checks on a composed config that Hydra cannot do: one-line errors that name the fix."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from dpbench.errors import ConfigError
from dpbench.choices import CLIP_SPLITS, ENGINES, GRANULARITIES, OPTIMIZERS, SCHEDULES

# key → (the rule in words, the test, an example value); checked when the config has the key
BOUNDS: dict[str, tuple[str, Callable[[float], bool], str]] = {
    "method.compression.sparsity": ("in [0, 1)", lambda x: 0 <= x < 1, "0.5"),
    "method.student.width_sparsity": ("in [0, 1)", lambda x: 0 <= x < 1, "0.0"),
    "method.budget_split": ("in (0, 1)", lambda x: 0 < x < 1, "0.5"),
    "method.kd.lam": ("in [0, 1]", lambda x: 0 <= x <= 1, "0.4"),
    "method.kd.temperature": ("> 0", lambda x: x > 0, "1.0"),
    "method.kd.alpha": (">= 0", lambda x: x >= 0, "0.0"),
}


def _num(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key)


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for values no run could use."""
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
    choices = {"privacy.accountant": ("prv",), "privacy.clipping": ("flat", "automatic"),
               "privacy.engine": ENGINES, "method.optimizer.name": OPTIMIZERS,
               "method.optimizer.schedule": SCHEDULES, "method.anadp.groups": GRANULARITIES,
               "method.anadp.clip_split": CLIP_SPLITS}
    for key, allowed in choices.items():
        value = _num(cfg, key)
        if value is not None and value not in allowed:
            raise ConfigError(f"{key}='{value}' is not supported; choose one of: {', '.join(allowed)}"
                              + (" (an RDP epsilon is reported beside the PRV one)" if key == "privacy.accountant" else ""))
    delta = _num(cfg, "privacy.delta")
    if delta is not None and not (_finite(delta) and 0 < delta < 1):
        raise ConfigError(f"privacy.delta must be in (0, 1) (got {delta}); set it to null for 1/(2n)")
    for key in ("privacy.batch_size", "privacy.physical_batch_size"):
        v = _num(cfg, key)
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key} must be an integer >= 1 (got {v})")
    tokens = _num(cfg, "privacy.physical_batch_tokens")
    if tokens is not None and (not isinstance(tokens, int) or tokens < 1):
        raise ConfigError(f"privacy.physical_batch_tokens must be an integer >= 1 or null (got {tokens})")
    if not isinstance(_num(cfg, "privacy.group_by_length"), (bool, type(None))):
        raise ConfigError(f"privacy.group_by_length must be true or false (got {_num(cfg, 'privacy.group_by_length')})")
    epochs, max_steps = _num(cfg, "privacy.epochs"), _num(cfg, "trainer.max_steps")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"trainer.max_steps must be an integer >= 1 or null (got {max_steps})")
    if max_steps is None and (epochs is None or not _finite(epochs) or epochs <= 0):
        raise ConfigError(f"privacy.epochs must be > 0 (got {epochs}); or set trainer.max_steps")
    for key, (rule, ok, example) in BOUNDS.items():
        v = _num(cfg, key)
        if v is not None and not (_finite(v) and ok(v)):
            raise ConfigError(f"{key} must be {rule} (got {v}); set e.g. {key}={example}")


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
