"""Repairing a student cut from a public teacher, before any private step, from public inputs only.

A student made of some of the pre-trained teacher's layers (every other one by default) is a broken
language model until it is trained: DistilDP's DistilGPT2 was a pre-trained small model. Here the student is
distilled from the **pre-trained** teacher, (1 − λ)·CE + λ·T²·KL(teacher ‖ student), on public text:
``repair.corpus=generated``, text the pre-trained teacher samples from the task's public control codes; or
``repair.corpus=public``, the train sentences of a GLUE task read from disk (``repair.public``), packed into
chunks (:mod:`dpbench.data.public_text`), which costs no generation time.

Privacy: the repair's inputs are the public pre-trained weights, the public control-code space or the public
GLUE text (never the private task's own data: the run refuses ``repair.public.task`` equal to its task), its
own seed and its settings, and nothing else. The run builds and repairs the student before its private corpus
is opened (:class:`dpbench.methods.distildp.PrivateCorpus` raises on a read before ``open``), so the
repaired student is a public starting point: it costs no ε and it is the same for every pipeline and every
run seed. It is cached on disk under a hash of exactly those inputs (:func:`repair_key`); tests check that
two different private corpora give identical repaired weights, and that the second run loads the first's.
``model.pretrained`` must be public weights: a privately fine-tuned checkpoint there would make the repair,
and its cache, private.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from dpbench.data.generation import ControlledCorpus, prompt_ids
from dpbench.data.perplexity import perplexity
from dpbench.data.public_text import corpus_digest, glue_texts, packed_corpus
from dpbench.errors import ConfigError
from dpbench.methods.generate import derive_seed, generate_synthetic
from dpbench.methods.language_model import LMDistillModule, train_lm
from dpbench.models.registry import LoadedModel
from dpbench.pipeline import plan_privacy
from dpbench.results.io import read_json, versions, write_json_atomic

WEIGHTS, INFO, EVAL = "student.pt", "info.json", "eval.json"
REPAIR_VERSION = 3  # bump when the repair's code changes what it computes (loss, generation, prompt format)
_NOT_IN_KEY = ("cache_dir", "enabled")  # where it is kept and whether it runs change nothing it computes


def repair_key(cfg: DictConfig, codes: list[str], public_digest: str | None = None,
               layers: list[int] | None = None) -> str:
    """A hash of everything the repaired student depends on: the teacher's model config, the student's
    layers and trainable set (always every parameter but the frozen embeddings: ``method.trainable`` is the
    DP stages'), the repair settings (generation or the public text's digest, optimizer,
    steps, seed), the public codes, the sequence length, micro-batching, precision and devices, the code
    version and the library versions; nothing from the task's data, and not the folder the public text
    was read from (its token ids are in ``public_digest``)."""
    repair = {k: v for k, v in OmegaConf.to_container(cfg.method.student.repair, resolve=True).items()
              if k not in _NOT_IN_KEY}
    unused = "generation" if repair.get("corpus") == "public" else "public"
    repair.pop(unused, None)
    if "public" in repair:
        repair["public"] = {**{k: v for k, v in repair["public"].items() if k != "data_dir"}, "digest": public_digest}
    p, t = cfg.privacy, cfg.trainer
    lib = versions()
    parts = {"version": REPAIR_VERSION, "libraries": {k: lib.get(k) for k in ("torch", "transformers")},
             "model": OmegaConf.to_container(cfg.model, resolve=True),
             "layers": layers if layers is not None else
             OmegaConf.to_container(cfg.method.student, resolve=True).get("layers"),
             "trainable": "full", "freeze_embeddings": bool(cfg.method.get("freeze_embeddings", False)),
             "repair": repair, "codes": list(codes), "max_length": int(cfg.task.max_length),
             "micro_batching": [int(p.physical_batch_size), p.get("physical_batch_tokens"), p.get("group_by_length")],
             "precision": str(t.get("precision", "32-true")), "devices": t.get("devices", 1)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def public_mix(public: DictConfig) -> dict[str, float]:
    """``repair.public.mix``: the share of the public tokens each other GLUE task gives."""
    return {str(k): float(v) for k, v in (public.get("mix") or {}).items()}


def public_corpus(cfg: DictConfig, teacher: LoadedModel) -> ControlledCorpus:
    """``repair.public.task``'s train sentences, packed into chunks that fill ``task.max_length`` after the
    empty code's prefix, up to ``max_tokens``; with ``repair.public.mix`` ({task: share}), that share of the
    tokens comes from each other GLUE task's train sentences (read from ``data_root``/<task>), the chunks
    shuffled together. Never the private task itself."""
    p = cfg.method.student.repair.public
    mix = public_mix(p)
    if any(not 0 < v < 1 for v in mix.values()) or sum(mix.values()) >= 1 or str(p.task) in mix:
        raise ConfigError(f"method.student.repair.public.mix {mix} must give other tasks shares in (0, 1) that "
                          "sum below 1 (the rest is public.task's), e.g. mix={sst2: 0.5}")
    root = cfg.get("data_root")
    sources = {str(p.task): (1 - sum(mix.values()), p.get("data_dir")),
               **{t: (v, str(Path(root) / t) if root else None) for t, v in mix.items()}}
    if str(cfg.task.name) in sources:
        raise ConfigError(f"method.student.repair.public reads the private task '{cfg.task.name}'; the repair "
                          "must read public text only: set it to another task, e.g. repair.public.task=mnli")
    chunk = int(cfg.task.max_length) - len(prompt_ids(teacher.tokenizer, ""))
    seed = int(cfg.method.student.repair.seed)
    parts = [packed_corpus(glue_texts(t, d), teacher.tokenizer, chunk, int(share * int(p.max_tokens)), seed)
             for t, (share, d) in sources.items()]
    if len(parts) == 1:
        return parts[0]
    rows = [row for part in parts for row in zip(part.texts, part.token_ids)]
    random.Random(seed).shuffle(rows)
    return ControlledCorpus([""] * len(rows), [t for t, _ in rows], [ids for _, ids in rows])


def _train(cfg: DictConfig, teacher: LoadedModel, student: LoadedModel, corpus: ControlledCorpus,
           out_dir: Path) -> dict[str, Any]:
    r = cfg.method.student.repair
    r_cfg = copy.deepcopy(cfg)
    r_cfg.method.optimizer = r.optimizer
    r_cfg.privacy.batch_size = min(int(r.batch_size), len(corpus))
    r_cfg.trainer.checkpoint_every_n_steps = 0  # the cache is the repair's checkpoint
    steps = max(1, round(float(r.epochs) * len(corpus) / int(r_cfg.privacy.batch_size)))
    plan = plan_privacy(r_cfg, len(corpus), private=False, steps=steps)
    val = corpus.subset(min(64, len(corpus)), int(r.seed))  # generated (public) text: a progress check only
    flags = {n: p.requires_grad for n, p in teacher.model.named_parameters()}  # the distiller freezes them
    mode = teacher.model.training
    try:
        result = train_lm(r_cfg, student, corpus, val, plan, out_dir, stage_name="student_repair", seed=int(r.seed),
                          module_factory=partial(LMDistillModule, teacher=teacher.model, lam=float(r.lam),
                                                 temperature=float(r.temperature)))
    finally:
        for n, p in teacher.model.named_parameters():
            p.requires_grad_(flags[n])
        teacher.model.train(mode)
    return {"steps": result.steps, "train_s": round(result.train_s, 3),
            "generated_perplexity": result.metrics.get("perplexity")}


def repair_student(cfg: DictConfig, teacher: LoadedModel, student: LoadedModel, codes: list[str],
                   out_dir: Path, layers: list[int] | None = None,
                   load_public: Callable[[], ControlledCorpus] | None = None) -> dict[str, Any]:
    """Repair ``student`` in place from the pre-trained ``teacher`` (which must not have seen private data
    yet) and the public ``codes``; ``layers``: the teacher layers it kept (for the cache key; None → the
    config's); ``load_public``: returns :func:`public_corpus` (the caller's memoised reader; called only for
    ``repair.corpus=public``).
    Returns the record's ``student_init.repair`` (with ``cached``). Loads
    the repaired weights from ``method.student.repair.cache_dir`` when they were made under the same key."""
    r = cfg.method.student.repair
    public = None
    if r.get("corpus", "generated") == "public":
        public = load_public() if load_public is not None else public_corpus(cfg, teacher)
    digest = None if public is None else corpus_digest(public)
    key = repair_key(cfg, codes, digest, layers)
    folder = Path(r.cache_dir) / key if r.get("cache_dir") else None
    if folder is not None and (folder / WEIGHTS).exists() and (folder / INFO).exists():
        info = read_json(folder / INFO)
        student.model.load_state_dict(torch.load(folder / WEIGHTS, weights_only=True))
        return {**info, "cached": True, "cache": str(folder)}
    if public is None:
        gen = generate_synthetic(teacher, codes, r.generation, derive_seed(int(r.seed), "repair"))
        corpus, source = gen.corpus, {"from": "the pre-trained teacher (public), on text it generated from the "
                                              "public codes", "corpus": gen.record()}
    else:
        mix = public_mix(r.public)
        corpus, source = public, {
            "from": f"the pre-trained teacher (public), on {r.public.task}'s train sentences from disk"
                    f"{' mixed with ' + ', '.join(mix) if mix else ''} (public text, not the private task's)",
            "corpus": {"source": "public", "task": str(r.public.task), "mix": mix, "chunks": len(public),
                       "tokens": sum(len(c) for c in public.token_ids or []), "digest": digest}}
    info = {"key": key, **source, "lam": float(r.lam), "temperature": float(r.temperature),
            **_train(cfg, teacher, student, corpus, out_dir)}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{WEIGHTS}.{os.getpid()}"
        torch.save(student.model.state_dict(), tmp)
        os.replace(tmp, folder / WEIGHTS)
        write_json_atomic(folder / INFO, info)
    return {**info, "cached": False, "cache": None if folder is None else str(folder)}


def before_private(teacher: LoadedModel, student: LoadedModel, held_out: ControlledCorpus, window: int,
                   stride: int, folder: str | Path | None) -> dict[str, float]:
    """The pre-trained teacher's and the (repaired) student's held-out perplexity before any private step.
    Kept in the repair's cache ``folder`` (``eval.json``) under a hash of the held-out texts and the
    window, so a sweep measures them once."""
    tag = hashlib.sha256(json.dumps([held_out.texts, window, stride]).encode()).hexdigest()[:16]
    path = Path(folder) / EVAL if folder else None
    saved = read_json(path) if path is not None and path.exists() else {}
    if tag in saved:
        return dict(saved[tag])
    ppl = partial(perplexity, texts=held_out.texts, window=window, stride=stride)
    values = {"pretrained_teacher_perplexity": ppl(teacher.model, teacher.tokenizer),
              "initial_student_perplexity": ppl(student.model, student.tokenizer)}
    if path is not None:
        write_json_atomic(path, {**saved, tag: values})
    return values
