"""One DP teacher for the pipelines that share it: DistilDP, synthetic-only and on-policy distillation.

With the same seed, those three train an identical DP teacher (same model, data, plan, optimizer and noise
seed) and differ only after it. ``method.teacher_cache_dir`` keeps the teacher stage's checkpoint (and
DistilDP's synthetic corpus) in a folder named by :func:`teacher_key`, so a sweep trains each seed's
teacher once; the others load it through the stage checkpoint's "finished: load, do not train" path.

Privacy: every pipeline that loads the teacher post-processes the same DP release; its recorded stage is
that release's (σ, q, steps), so each run's ε is what it would be had it trained the teacher itself, and
the loaded teacher is bit-for-bit the one it would have trained (tested). The folder is private working
state, not a release: like any resumable checkpoint it holds the optimizer's noise-generator state, and
its name hashes the private corpus. Share run folders' results, never the cache.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dpbench.checkpointing import fingerprint
from dpbench.data.generation import ControlledCorpus
from dpbench.pipeline import PrivacyPlan
from dpbench.results.io import versions

TEACHER_CACHE_VERSION = 1  # bump when the teacher stage's code changes what it computes
_TRAINER_NOT_IN_KEY = ("progress_bar", "log_every_n_steps", "checkpoint_every_n_steps")  # no effect on the weights


def text_digest(corpus: ControlledCorpus) -> str:
    """A hash of a corpus's codes and texts."""
    return hashlib.sha256(json.dumps([corpus.codes, corpus.texts]).encode()).hexdigest()[:16]


def teacher_key(cfg: DictConfig, private: ControlledCorpus, plan: PrivacyPlan, seed: int) -> str:
    """A hash of everything the DP teacher stage depends on: the model, the trainable set, the task
    settings and the private corpus's content (not its folder), the privacy settings and the stage's
    plan (σ, q, steps, δ, C), the optimizer, the trainer settings that change the weights, the seed, the
    code version and the library versions."""
    container = {k: OmegaConf.to_container(cfg[k], resolve=True)
                 for k in ("model", "task", "privacy", "trainer", "method")}
    trainer = {k: v for k, v in container["trainer"].items() if k not in _TRAINER_NOT_IN_KEY}
    task = {k: v for k, v in container["task"].items() if k != "data_dir"}
    lib = versions()
    parts: dict[str, Any] = {
        "version": TEACHER_CACHE_VERSION, "libraries": {k: lib.get(k) for k in ("torch", "transformers")},
        "model": container["model"], "task": task, "data": text_digest(private),
        "privacy": container["privacy"], "plan": fingerprint(plan, "teacher", seed), "trainer": trainer,
        "method": {k: container["method"].get(k) for k in ("optimizer", "trainable", "freeze_embeddings")},
        "seed": seed}
    if container["method"].get("trainable") == "lora":  # the adapters' shape (absent otherwise: older keys stay)
        parts["method"]["lora"] = container["method"].get("lora")
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def teacher_folder(cfg: DictConfig, private: ControlledCorpus, plan: PrivacyPlan, seed: int) -> Path | None:
    """The cache folder for this run's DP teacher, or None without ``method.teacher_cache_dir``."""
    root = cfg.method.get("teacher_cache_dir")
    return Path(root) / teacher_key(cfg, private, plan, seed) if root else None
