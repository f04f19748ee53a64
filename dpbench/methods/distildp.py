"""DistilDP (Flemings & Annavaram, 2024) and its baselines: compress a causal LM trained on private text.

``method.pipeline`` picks one of:

- ``distildp``: (1) DP fine-tuning of the teacher on the private documents "<code>\\n\\n<text>";
  (2) the teacher generates ``generation.num_samples`` texts, each conditioned on a control code drawn
  uniformly from the task's *public* code space (every category × stars), never from the private
  label counts; (3) the student trains non-privately on the synthetic text only, with
  (1 − λ)·CE + λ·T²·KL(teacher ‖ student) on the text positions (+ α·MSE of the last hidden states;
  the student shares the teacher's width). ``kd.lam = 0`` gives the "synthetic text only" baseline.
- ``onpolicy``: (1) as DistilDP; (2) for ``onpolicy.rounds`` rounds the *student* samples continuations of
  public control codes, the DP teacher scores them, and the student minimises the divergence to the
  teacher on its own samples (generalised KD, Agarwal et al. 2024: ``onpolicy.divergence``).
- ``dp_student``: the student trained with DP-SGD directly on the private text, all of ε.
- ``dpkd``: teacher and student both DP-trained on the private text (the student on the KD loss);
  ε is the composition of the two, split by ``budget_split``.

Every pipeline's student is built from the pre-trained (public) teacher's layers and, with
``student.repair.enabled``, repaired from public inputs only before the private corpus is opened
(:mod:`dpbench.methods.student_repair`): the same start for all of them, at no privacy cost.

Privacy: in ``distildp`` and ``onpolicy`` everything after the teacher's DP stage touches only the DP
teacher, the public codes and the student's own samples, so it is post-processing and ε is the teacher
stage's ε. Guard: the private corpus can be read only between ``open`` (after the repair) and ``seal``
(after the last DP stage); a read outside that window fails the run.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace
from functools import cache, partial
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from dpbench.checkpointing import CHECKPOINT_DIR, checkpoint_path
from dpbench.compression.layer_influence import block_influence, most_influential
from dpbench.compression.structured import copy_with_layers, every_other_layer, transformer_layers
from dpbench.data.generation import ControlledCorpus, load_yelp, make_synthetic_corpus, public_codes
from dpbench.data.perplexity import perplexity
from dpbench.errors import ConfigError, DataError, PrivacyError
from dpbench.methods.finetune import freeze_embeddings, set_trainable
from dpbench.methods.generate import Generation, cached_generation, derive_seed, generate_synthetic
from dpbench.methods.language_model import LMDistillModule, train_lm
from dpbench.methods.student_repair import before_private, public_corpus, repair_student
from dpbench.methods.teacher_cache import teacher_folder
from dpbench.models.registry import LoadedModel, load_causal_lm
from dpbench.pipeline import PrivacyPlan, StageResult, make_record, plan_privacy, plan_stages, privacy_record
from dpbench.results.schema import RunRecord

PIPELINES = ("distildp", "onpolicy", "dp_student", "dpkd")
CALIBRATION_CHUNKS = 8  # public repair-text chunks that Block Influence is measured on (8 × 128 tokens here)


class PrivateCorpus:
    """The private training set, readable only by the DP stages: closed until :meth:`open` (the public
    student repair runs before it), sealed by :meth:`seal` once the DP stages are done. Its size (for q)
    is always available."""

    def __init__(self, corpus: ControlledCorpus) -> None:
        self._corpus, self.opened, self.sealed = corpus, False, False

    def __len__(self) -> int:
        return len(self._corpus)

    @property
    def corpus(self) -> ControlledCorpus:
        if self.sealed:
            raise PrivacyError("a post-processing stage tried to read the private corpus after the DP stages; "
                               "only the DP teacher and public control codes may be used there")
        if not self.opened:
            raise PrivacyError("a public stage (the student repair) tried to read the private corpus before the "
                               "DP stages; only public weights and control codes may be used there")
        return self._corpus

    def open(self) -> None:
        self.opened = True

    def seal(self) -> None:
        self.sealed = True


def load_generation_task(task: DictConfig, seed: int) -> tuple[ControlledCorpus, ControlledCorpus, list[str]]:
    """(private training corpus, held-out real corpus, public control codes) for ``task``."""
    if task.get("kind") != "generation":
        raise ConfigError(f"method distildp needs a generation task (task=yelp or task=synthetic_lm), got '{task.name}'")
    if task.name == "synthetic_lm":
        seed0 = int(task.get("data_seed", 0))
        train = make_synthetic_corpus(int(task.num_train), seed0)
        held_out = make_synthetic_corpus(int(task.num_eval), seed0 + 10_000)
    else:
        if not task.get("data_dir"):
            raise DataError(f"task.data_dir is not set; point it at the folder holding {task.train_file} "
                            f"(e.g. task.data_dir=../shared/data/{task.name})")
        train = load_yelp(Path(task.data_dir) / task.train_file)
        if task.get("holdout_examples"):  # tune on reviews held out of the training file; the test file stays unread
            train, held_out = train.split_off(int(task.holdout_examples), seed=int(task.get("holdout_seed", 0)))
        else:
            held_out = load_yelp(Path(task.data_dir) / task.eval_file).subset(task.get("max_eval_examples"), 0)
        train = train.subset(task.get("max_train_examples"), seed)
    return train, held_out, public_codes(task.codes)


def choose_layers(cfg: DictConfig, teacher: LoadedModel,
                  load_public: Callable[[], ControlledCorpus] | None = None) -> dict:
    """The teacher layers the student keeps, and how they were chosen: ``student.layers`` when given; else
    every other layer, or (``select=block_influence``) the ``student.num_layers`` (null: half) layers of
    highest Block Influence on the first chunks of the public repair text (from ``load_public``, else read here).
    Reads public inputs only."""
    s = cfg.method.student
    n = len(transformer_layers(teacher.model)[2])
    if s.get("layers") is not None:
        return {"layers": [int(i) for i in s.layers], "select": "given"}
    if s.get("select", "every_other") == "every_other":
        return {"layers": every_other_layer(n), "select": "every_other"}
    chunks = (load_public() if load_public is not None else public_corpus(cfg, teacher)).token_ids[:CALIBRATION_CHUNKS]
    influence = block_influence(teacher.model, torch.tensor(chunks))
    return {"layers": most_influential(influence, int(s.get("num_layers") or math.ceil(n / 2))),
            "select": "block_influence", "block_influence": [round(b, 4) for b in influence],
            "calibration_tokens": sum(len(c) for c in chunks)}


def build_student(teacher: LoadedModel, layers: list[int]) -> LoadedModel:
    """A copy of ``teacher`` keeping ``layers`` (from :func:`choose_layers`): same tokenizer and width."""
    return replace(teacher, model=copy_with_layers(teacher.model, layers))


def dp_train(cfg: DictConfig, lm: LoadedModel, *args, **kwargs) -> StageResult:
    """A stage on the private text (:func:`train_lm`) that trains ``method.trainable`` of ``lm``: ``full`` (less
    frozen embeddings), ``bitfit``, or ``lora`` adapters (``method.lora``), merged into the weights after the
    stage so that what follows (generation, distillation, perplexity) sees a plain model. Merging is
    post-processing of the stage's release: ε is the stage's."""
    set_trainable(lm, cfg.method)
    result = train_lm(cfg, lm, *args, **kwargs)
    if cfg.method.trainable == "lora":
        lm.model = lm.model.merge_and_unload()
    return result


def student_plan(cfg: DictConfig, n: int, epochs: float) -> tuple[DictConfig, PrivacyPlan]:
    """The config and (non-private) plan of a student stage on ``n`` post-processed texts: the student's optimizer,
    batches of ``method.student_batch_size`` (null: ``privacy.batch_size``, as the DP stages), capped at ``n``,
    for ``epochs`` passes."""
    s_cfg = copy.deepcopy(cfg)
    s_cfg.method.optimizer = cfg.method.student_optimizer
    b = min(int(cfg.method.get("student_batch_size") or cfg.privacy.batch_size), n)
    s_cfg.privacy.batch_size = b
    s_cfg.privacy.physical_batch_size = min(int(cfg.privacy.physical_batch_size), b)
    return s_cfg, plan_privacy(s_cfg, n, private=False, steps=max(1, round(epochs * n / b)))


def onpolicy_distill(cfg: DictConfig, teacher: LoadedModel, student: LoadedModel, codes: list[str], out_dir: Path,
                     seed: int) -> tuple[list[StageResult], list[Generation]]:
    """``onpolicy.rounds`` rounds of: the student samples ``onpolicy.samples_per_round`` continuations of
    public codes; the (DP, frozen) teacher scores them; the student minimises the divergence to the teacher
    on its own samples for ``onpolicy.epochs_per_round`` passes. Post-processing of the DP teacher."""
    m, o = cfg.method, cfg.method.onpolicy
    g = OmegaConf.merge(m.generation, {"num_samples": int(o.samples_per_round)})
    factory = partial(LMDistillModule, teacher=teacher.model, lam=1.0, temperature=float(m.kd.temperature),
                      alpha=float(m.kd.get("alpha", 0.0)), divergence=str(o.divergence), beta=float(o.beta))
    results, gens = [], []
    for k in range(int(o.rounds)):
        gen = generate_synthetic(student, codes, g, derive_seed(seed, f"onpolicy{k}"))  # the student's own samples
        s_cfg, plan = student_plan(cfg, len(gen.corpus), float(o.epochs_per_round))
        val = gen.corpus.subset(min(64, len(gen.corpus)), seed)
        results.append(train_lm(s_cfg, student, gen.corpus, val, plan, out_dir, stage_name=f"onpolicy_{k}",
                                seed=seed + 1 + k, module_factory=factory))
        gens.append(gen)
    return results, gens


def run(cfg: DictConfig, out_dir: Path) -> RunRecord:
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    m, seed = cfg.method, int(cfg.seed)
    if m.pipeline not in PIPELINES:
        raise ConfigError(f"method.pipeline '{m.pipeline}' is unknown; choose one of: {', '.join(PIPELINES)}")
    kd = m.kd  # ranges checked by dpbench.config.validate
    lam, temperature, alpha = float(kd.lam), float(kd.temperature), float(kd.get("alpha", 0.0))
    train, held_out, codes = load_generation_task(cfg.task, seed)
    private = PrivateCorpus(train)  # closed until the DP stages
    del train  # from here on, the private text is reachable only through the guard
    teacher = load_causal_lm(cfg.model)
    if m.get("freeze_embeddings", False):  # (tied: the LM head too) public weights, no per-sample V×d gradients
        freeze_embeddings(teacher.model)  # the student copies these flags: its public stages train the rest
    repair = m.student.get("repair")
    load_public = cache(partial(public_corpus, cfg, teacher))  # read once, if at all: layer choice and repair
    chosen = choose_layers(cfg, teacher, load_public)
    student = build_student(teacher, chosen["layers"])  # from the pre-trained (public) teacher
    ppl = dict(window=int(m.eval.window), stride=int(m.eval.stride))
    init = {"from": "pre-trained teacher layers (public)", "layers": len(chosen["layers"]),
            "kept_layers": chosen["layers"], **{k: v for k, v in chosen.items() if k != "layers"}, "repair": None}
    if repair is not None and repair.get("enabled", False):
        init["repair"] = repair_student(cfg, teacher, student, codes, out_dir, layers=chosen["layers"],
                                        load_public=load_public)
    metrics = before_private(teacher, student, held_out, ppl["window"], ppl["stride"],
                             init["repair"]["cache"] if init["repair"] else None) \
        if m.eval.get("before_private", True) else {}
    distill = partial(LMDistillModule, lam=lam, temperature=temperature, alpha=alpha)
    results, extra = {}, {"student_init": init}
    generation_s = 0.0  # generation after the DP stages (DistilDP's corpus, the on-policy samples)
    shared = None  # the DP teacher's cache folder (distildp, onpolicy)

    dp = bool(m.get("private", True))  # false: the non-private control at the same settings (no noise, no ε)
    private.open()
    if m.pipeline == "dp_student":
        plan = plan_privacy(cfg, len(private), private=dp)
        results["student"] = dp_train(cfg, student, private.corpus, held_out, plan, out_dir, stage_name="student",
                                      seed=seed)
        teacher = None
    elif m.pipeline == "dpkd":
        plans = plan_stages(cfg, len(private), [1.0, 1.0], private=dp, budget_split=float(m.budget_split))
        results["teacher"] = dp_train(cfg, teacher, private.corpus, held_out, plans[0], out_dir,
                                      stage_name="teacher", seed=seed)
        results["student"] = dp_train(cfg, student, private.corpus, held_out, plans[1], out_dir,
                                      stage_name="student", seed=seed + 1, prior_stages=[results["teacher"].stage],
                                      module_factory=partial(distill, teacher=teacher.model))
        plan = plans[0]
    else:  # distildp, onpolicy: the DP teacher (shared through method.teacher_cache_dir: teacher_cache.py)
        plan = plan_privacy(cfg, len(private), private=dp)
        shared = teacher_folder(cfg, private.corpus, plan, seed)
        if shared is not None:
            extra["teacher_cache"] = {"key": shared.name, "folder": str(shared),
                                      "found": checkpoint_path(shared, "teacher").exists()}
        results["teacher"] = dp_train(cfg, teacher, private.corpus, held_out, plan, out_dir, stage_name="teacher",
                                      seed=seed, checkpoint_dir=shared)
    private.seal()  # everything below is post-processing of the DP stages

    if m.pipeline == "distildp":
        resumable = int(cfg.trainer.get("checkpoint_every_n_steps") or 0) > 0
        key = {"generation": OmegaConf.to_container(m.generation, resolve=True), "seed": seed, "codes": codes,
               "teacher_steps": results["teacher"].steps}
        kept = shared / "synthetic.json" if shared is not None else \
            out_dir / CHECKPOINT_DIR / "synthetic.json" if resumable else None
        gen = cached_generation(kept, key, lambda: generate_synthetic(teacher, codes, m.generation, seed))
        synthetic, generation_s = gen.corpus, gen.seconds
        s_cfg, s_plan = student_plan(cfg, len(synthetic), float(m.student_epochs))
        results["student"] = train_lm(s_cfg, student, synthetic, held_out, s_plan, out_dir, stage_name="student",
                                      seed=seed + 1, module_factory=partial(distill, teacher=teacher.model))
        (out_dir / "samples.txt").write_text("\n\n---\n\n".join(f"{c}\n{t}" for c, t in
                                                                zip(synthetic.codes[:20], synthetic.texts[:20])))
        extra["generation"] = {**gen.record(), "code_prior": "uniform over public codes", "codes": len(codes),
                               "examples": [{"code": c, "text": t} for c, t in
                                            zip(synthetic.codes[:5], synthetic.texts[:5])]}
    elif m.pipeline == "onpolicy":
        rounds, gens = onpolicy_distill(cfg, teacher, student, codes, out_dir, seed)
        results.update({r_name: r for r_name, r in zip((f"onpolicy_{k}" for k in range(len(rounds))), rounds)})
        last, generation_s, lam = gens[-1].corpus, sum(g.seconds for g in gens), 1.0  # pure divergence
        (out_dir / "samples.txt").write_text("\n\n---\n\n".join(f"{c}\n{t}" for c, t in
                                                                zip(last.codes[:20], last.texts[:20])))
        o = m.onpolicy
        extra["onpolicy"] = {"rounds": len(rounds), "samples_per_round": int(o.samples_per_round),
                             "epochs_per_round": float(o.epochs_per_round), "divergence": str(o.divergence),
                             "beta": float(o.beta), "code_prior": "uniform over public codes",
                             "generation": [g.record() for g in gens]}

    metrics["student_perplexity"] = perplexity(student.model, student.tokenizer, held_out.texts, **ppl)
    if teacher is not None:
        metrics["teacher_perplexity"] = perplexity(teacher.model, teacher.tokenizer, held_out.texts, **ppl)
    stages = [r.stage for r in results.values() if r.stage]
    privacy = privacy_record(stages, plan.delta, plan.target_epsilon, plan.clip_norm)
    params = student.num_params()
    extra["distillation"] = {"pipeline": m.pipeline, "lam": lam, "temperature": temperature, "alpha": alpha,
                             "student_layers": len(transformer_layers(student.model)[2]),
                             "teacher_layers": len(transformer_layers(teacher.model)[2]) if teacher else None,
                             "stage_metrics": {k: r.metrics for k, r in results.items()}}
    record = make_record(cfg, metrics=metrics, privacy=privacy, params=params, results=list(results.values()),
                         extra={**extra, "data": {"train_examples": len(private), "eval_examples": len(held_out)}})
    record.timing["generation_s"] = round(generation_s, 3)  # beside train_s, which counts training steps only
    return record
