"""The names the config accepts for its choice options, in one torch-free module, so that a bad
option is refused (``dpbench.config.validate``) before torch and transformers are imported."""
from __future__ import annotations

ENGINES = ("bk", "opacus", "opacus_ghost")        # dpbench.privacy.engine
CLIP_SPLITS = ("equal", "size")                   # dpbench.privacy.allocation: Cₖ = C/√K or C·√(dₖ/d)
GRANULARITIES = ("module", "block")               # dpbench.privacy.allocation: ANADP's groups
OPTIMIZERS = ("adam", "adam_bc", "sgd")           # dpbench.methods.base.DPModule.configure_optimizers
SCHEDULES = ("linear", "constant")
