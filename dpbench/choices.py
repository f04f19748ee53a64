"""The names the config accepts for its choice options, in one torch-free module, so that a bad
option is refused (``dpbench.config.validate``) before torch and transformers are imported."""
from __future__ import annotations

ENGINES = ("bk", "opacus", "opacus_ghost")        # dpbench.privacy.engine
CLIP_SPLITS = ("equal", "size")                   # dpbench.privacy.allocation: Cₖ = C/√K or C·√(dₖ/d)
GRANULARITIES = ("module", "block")               # dpbench.privacy.allocation: ANADP's groups
OPTIMIZERS = ("adam", "adam_bc", "sgd")           # dpbench.methods.base.DPModule.configure_optimizers
SCHEDULES = ("linear", "constant")
POOLINGS = ("cls", "mean")                        # dpbench.models.heads
HEAD_INITS = ("default", "zero")                  # dpbench.models.heads
DIVERGENCES = ("forward", "reverse", "jsd")         # dpbench.methods.language_model.token_divergence
PRUNE_SCOPES = ("global", "layer")                # dpbench.compression.sparsity
CLIPPINGS = ("flat", "automatic")                 # dpbench.privacy.clipping
REPAIR_CORPORA = ("generated", "public")          # dpbench.methods.student_repair: what the student is repaired on
STUDENT_SELECTIONS = ("every_other", "block_influence")  # dpbench.methods.distildp.choose_layers
GLUE_TASKS = ("sst2", "cola", "mrpc", "rte", "qnli", "mnli", "qqp")  # dpbench.data.glue.FORMATS
ACCOUNTANTS = ("prv",)
ACCELERATORS = ("cpu", "gpu", "cuda", "auto")     # Lightning's names
PRECISIONS = ("32-true", "32", "64-true", "64", "16-mixed", "bf16-mixed", "16-true", "bf16-true")

