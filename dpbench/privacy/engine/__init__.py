"""Per-sample clipping engines behind one interface (:class:`GradientEngine`)."""
from __future__ import annotations

from torch import nn

from dpbench.choices import ENGINES
from dpbench.errors import ConfigError
from dpbench.privacy.engine.base import GradientEngine, SumEngine, clip_factors



def make_engine(name: str, model: nn.Module, clip_norm: float | None, clipping: str = "flat") -> GradientEngine:
    """Build the engine ``name`` ('none' = non-private sum, 'bk' = ours, 'opacus' = opacus hooks,
    'opacus_ghost' = opacus ghost clipping)."""
    if name == "none" or clip_norm is None:
        return SumEngine(model, None)
    if clip_norm <= 0:
        raise ConfigError(f"privacy.clip_norm must be > 0 (got {clip_norm}); set e.g. privacy.clip_norm=1.0")
    if name == "bk":
        from dpbench.privacy.engine.bookkeeping import BookkeepingEngine

        return BookkeepingEngine(model, clip_norm, clipping)
    if name == "opacus":
        from dpbench.privacy.engine.opacus_engine import OpacusEngine

        return OpacusEngine(model, clip_norm, clipping)
    if name == "opacus_ghost":
        from dpbench.privacy.engine.opacus_ghost import OpacusGhostEngine

        return OpacusGhostEngine(model, clip_norm, clipping)
    raise ConfigError(f"unknown privacy.engine '{name}'; choose one of: {', '.join(ENGINES)}")


__all__ = ["GradientEngine", "SumEngine", "clip_factors", "make_engine", "ENGINES"]
