"""Methods by name: each is a function (config, run folder) → :class:`RunRecord`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from dpbench.errors import ConfigError
from dpbench.results.schema import RunRecord

Runner = Callable[[DictConfig, Path], RunRecord]
KINDS = ("finetune", "prune", "distill", "distildp")


def get_runner(kind: str) -> Runner:
    """``method.kind`` → its runner (imported lazily so the CLI starts fast)."""
    if kind == "finetune":
        from dpbench.methods.finetune import run
    elif kind == "prune":
        from dpbench.methods.compress import run
    elif kind == "distill":
        from dpbench.methods.distill import run
    elif kind == "distildp":
        from dpbench.methods.distildp import run
    else:
        raise ConfigError(f"unknown method.kind '{kind}'; choose one of: {', '.join(KINDS)}")
    return run
