"""DistilDP (Flemings & Annavaram, 2024) and its baselines: compress a causal LM trained on private text.

``method.pipeline`` picks one of:

- ``distildp``: (1) DP fine-tuning of the teacher on the private documents "<code>\\n\\n<text>";
  (2) the teacher generates ``generation.num_samples`` texts, each conditioned on a control code drawn
  uniformly from the task's *public* code space (every category × stars), never from the private
  label counts; (3) the student, built from the teacher's pre-trained layers, trains non-privately on
  the synthetic text only, with (1 − λ)·CE + λ·T²·KL(teacher ‖ student) on the text positions
  (+ α·MSE of the last hidden states; the student shares the teacher's width). Stages 2 and 3 touch
  only the DP teacher and public codes, so they are post-processing: ε is the teacher stage's ε.
  ``kd.lam = 0`` gives the "synthetic text only" baseline.
- ``dp_student``: the student trained with DP-SGD directly on the private text, all of ε.
- ``dpkd``: teacher and student both DP-trained on the private text (the student on the KD loss);
  ε is the composition of the two, split by ``budget_split``.

Guard: the private corpus is sealed after the last DP stage; reading it afterwards fails the run.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from dpbench.compression.structured import copy_with_layers, transformer_layers
from dpbench.data.generation import (ControlledCorpus, load_yelp, make_synthetic_corpus, prompt_ids,
                                     public_codes)
from dpbench.data.perplexity import perplexity
from dpbench.errors import ConfigError, DataError, PrivacyError
from dpbench.methods.finetune import select_trainable
from dpbench.methods.language_model import LMDistillModule, train_lm
from dpbench.models.registry import LoadedModel, load_causal_lm
from dpbench.pipeline import make_record, plan_privacy, plan_stages, privacy_record
from dpbench.results.io import read_json, write_json_atomic
from dpbench.results.schema import RunRecord

PIPELINES = ("distildp", "dp_student", "dpkd")


class PrivateCorpus:
    """The private training set behind a seal: once the DP stages are done, reading it raises."""

    def __init__(self, corpus: ControlledCorpus) -> None:
        self._corpus, self.sealed = corpus, False

    def __len__(self) -> int:
        return len(self._corpus)

    @property
    def corpus(self) -> ControlledCorpus:
        if self.sealed:
            raise PrivacyError("a post-processing stage tried to read the private corpus after the DP stages; "
                               "only the DP teacher and public control codes may be used there")
        return self._corpus

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
        train = load_yelp(Path(task.data_dir) / task.train_file).subset(task.get("max_train_examples"), seed)
        held_out = load_yelp(Path(task.data_dir) / task.eval_file).subset(task.get("max_eval_examples"), 0)
    return train, held_out, public_codes(task.codes)


@torch.no_grad()
def generate_synthetic(lm: LoadedModel, codes: list[str], g: DictConfig, seed: int) -> ControlledCorpus:
    """``g.num_samples`` texts from ``lm``, each conditioned on a code drawn uniformly from ``codes``
    (seeded: the same seed gives the same texts). Prompts sharing a code are batched (no padding)."""
    rng = torch.Generator().manual_seed(seed)
    drawn = [codes[i] for i in torch.randint(len(codes), (int(g.num_samples),), generator=rng).tolist()]
    model, tok = lm.model, lm.tokenizer
    was_training = model.training
    model.eval()
    texts: dict[int, str] = {}
    batch = int(g.get("batch_size", 16))
    for j, code in enumerate(sorted(set(drawn))):
        rows = [i for i, c in enumerate(drawn) if c == code]
        prompt = torch.tensor([prompt_ids(tok, code)])
        for k in range(0, len(rows), batch):
            chunk = rows[k:k + batch]
            torch.manual_seed(seed * 100_003 + j * 1_009 + k)
            out = model.generate(prompt.expand(len(chunk), -1), attention_mask=torch.ones_like(prompt).expand(len(chunk), -1),
                                 do_sample=True, top_k=int(g.top_k), top_p=float(g.top_p),
                                 max_new_tokens=int(g.max_new_tokens), pad_token_id=tok.pad_token_id)
            for i, seq in zip(chunk, out[:, prompt.shape[1]:]):
                texts[i] = tok.decode(seq, skip_special_tokens=True).strip()
    model.train(was_training)
    return ControlledCorpus(drawn, [texts[i] for i in range(len(drawn))])


def cached_synthetic(cache: Path | None, key: dict, make: Callable[[], ControlledCorpus]) -> ControlledCorpus:
    """``make()``'s corpus, kept in ``cache`` (JSON) for a resumed run: loaded instead of regenerated
    when the file was written under the same ``key`` (generation settings, seed, codes, teacher
    steps). Generation is post-processing of the DP teacher, so regenerating spends no privacy; the
    cache only saves its time."""
    if cache is not None and cache.exists():
        saved = read_json(cache)
        if saved.get("key") == key:
            return ControlledCorpus(saved["codes"], saved["texts"])
    corpus = make()
    if cache is not None:
        write_json_atomic(cache, {"key": key, "codes": corpus.codes, "texts": corpus.texts})
    return corpus


def build_student(teacher: LoadedModel, s: DictConfig) -> LoadedModel:
    """A copy of ``teacher`` keeping ``s.layers`` (null → every other layer): same tokenizer and width."""
    return replace(teacher, model=copy_with_layers(teacher.model, s.get("layers")))


def run(cfg: DictConfig, out_dir: Path) -> RunRecord:
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    m, seed = cfg.method, int(cfg.seed)
    if m.pipeline not in PIPELINES:
        raise ConfigError(f"method.pipeline '{m.pipeline}' is unknown; choose one of: {', '.join(PIPELINES)}")
    kd = m.kd  # ranges checked by dpbench.config.validate
    lam, temperature, alpha = float(kd.lam), float(kd.temperature), float(kd.get("alpha", 0.0))
    train, held_out, codes = load_generation_task(cfg.task, seed)
    private = PrivateCorpus(train)
    teacher = load_causal_lm(cfg.model)
    select_trainable(teacher.model, m.trainable)
    if m.get("freeze_embeddings", False):  # (tied: the LM head too) public weights, no per-sample V×d gradients
        teacher.model.get_input_embeddings().weight.requires_grad_(False)
    student = build_student(teacher, m.student)  # from the pre-trained (public) teacher
    distill = partial(LMDistillModule, lam=lam, temperature=temperature, alpha=alpha)
    results, extra = {}, {}

    if m.pipeline == "dp_student":
        plan = plan_privacy(cfg, len(private), private=True)
        results["student"] = train_lm(cfg, student, private.corpus, held_out, plan, out_dir, stage_name="student",
                                      seed=seed)
        teacher = None
    elif m.pipeline == "dpkd":
        plans = plan_stages(cfg, len(private), [1.0, 1.0], private=True, budget_split=float(m.budget_split))
        results["teacher"] = train_lm(cfg, teacher, private.corpus, held_out, plans[0], out_dir,
                                      stage_name="teacher", seed=seed)
        results["student"] = train_lm(cfg, student, private.corpus, held_out, plans[1], out_dir,
                                      stage_name="student", seed=seed + 1, prior_stages=[results["teacher"].stage],
                                      module_factory=partial(distill, teacher=teacher.model))
        plan = plans[0]
    else:  # distildp
        plan = plan_privacy(cfg, len(private), private=True)
        results["teacher"] = train_lm(cfg, teacher, private.corpus, held_out, plan, out_dir, stage_name="teacher",
                                      seed=seed)
    private.seal()  # everything below is post-processing of the DP stages

    if m.pipeline == "distildp":
        resumable = int(cfg.trainer.get("checkpoint_every_n_steps") or 0) > 0
        key = {"generation": OmegaConf.to_container(m.generation, resolve=True), "seed": seed, "codes": codes,
               "teacher_steps": results["teacher"].steps}
        synthetic = cached_synthetic(out_dir / "checkpoints" / "synthetic.json" if resumable else None, key,
                                     lambda: generate_synthetic(teacher, codes, m.generation, seed))
        s_cfg = copy.deepcopy(cfg)
        s_cfg.method.optimizer = m.student_optimizer
        steps = max(1, round(float(m.student_epochs) * len(synthetic) / int(cfg.privacy.batch_size)))
        s_plan = plan_privacy(s_cfg, len(synthetic), private=False, steps=steps)
        results["student"] = train_lm(s_cfg, student, synthetic, held_out, s_plan, out_dir, stage_name="student",
                                      seed=seed + 1, module_factory=partial(distill, teacher=teacher.model))
        (out_dir / "samples.txt").write_text("\n\n---\n\n".join(f"{c}\n{t}" for c, t in
                                                                zip(synthetic.codes[:20], synthetic.texts[:20])))
        extra["generation"] = {"num_samples": len(synthetic), "code_prior": "uniform over public codes",
                               "codes": len(codes), "examples": [{"code": c, "text": t} for c, t in
                                                                 zip(synthetic.codes[:5], synthetic.texts[:5])]}

    ppl = dict(window=int(m.eval.window), stride=int(m.eval.stride))
    metrics = {"student_perplexity": perplexity(student.model, student.tokenizer, held_out.texts, **ppl)}
    if teacher is not None:
        metrics["teacher_perplexity"] = perplexity(teacher.model, teacher.tokenizer, held_out.texts, **ppl)
    stages = [r.stage for r in results.values() if r.stage]
    privacy = privacy_record(stages, plan.delta, plan.target_epsilon, plan.clip_norm)
    params = student.num_params()
    extra["distillation"] = {"pipeline": m.pipeline, "lam": lam, "temperature": temperature, "alpha": alpha,
                             "student_layers": len(transformer_layers(student.model)[2]),
                             "teacher_layers": len(transformer_layers(teacher.model)[2]) if teacher else None,
                             "stage_metrics": {k: r.metrics for k, r in results.items()}}
    return make_record(cfg, metrics=metrics, privacy=privacy, params=params,
                       results=list(results.values()),
                       extra={**extra, "data": {"train_examples": len(train), "eval_examples": len(held_out)}})
