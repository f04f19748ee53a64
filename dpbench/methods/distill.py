"""DPKD (Mireshghallah et al., NeurIPS 2022): DP knowledge distillation into a smaller student.

Stage 1 fine-tunes the teacher with DP-SGD on the private task. The student is built from the
released teacher (its layers ``method.student.layers``, every other one by default, optionally
narrowed by structured pruning of heads/neurons) and stage 2 trains it with DP-SGD on the same
private data, on α·CE(student, y) + (1 − α)·T²·KL(teacher_T ‖ student_T) with the teacher's soft
targets at temperature T. The teacher is a DP release, so using it is post-processing; each
student example's loss depends only on that example, so per-sample clipping bounds its influence.
Both stages read the private data: ε is the PRV composition of the two, the first stage calibrated
alone for ``budget_split``·ε and the second so that the composition meets ε (``plan_stages``).
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from dpbench.compression.report import compression_report
from dpbench.compression.structured import copy_with_layers, encoder_layers, structure, structured_prune
from dpbench.errors import ConfigError
from dpbench.methods.base import ClassifierModule, upcast
from dpbench.methods.finetune import set_trainable
from dpbench.models.registry import load_model
from dpbench.pipeline import (data_record, load_task, make_record, plan_stages, privacy_record, sample_inputs,
                              train_classifier)
from dpbench.results.schema import RunRecord


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float, alpha: float) -> Tensor:
    """Per-example α·CE(s, y) + (1 − α)·T²·KL(softmax(t/T) ‖ softmax(s/T)), shape (B,)."""
    hard = F.cross_entropy(student_logits, labels, reduction="none")
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    reduction="none", log_target=True).sum(-1)
    return alpha * hard + (1 - alpha) * t * t * soft


class DistillModule(ClassifierModule):
    """The shared DP step, with the distillation loss against a frozen teacher."""

    def __init__(self, *args, teacher: nn.Module, temperature: float, alpha: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def per_sample_loss(self, batch: dict[str, Tensor], model: nn.Module | None = None) -> Tensor:
        inputs = self.lm.inputs(batch)
        with torch.no_grad():
            teacher_logits = upcast(self.teacher(**inputs).logits)
        student_logits = upcast((self.engine.module if model is None else model)(**inputs).logits)
        return kd_loss(student_logits, teacher_logits, batch["labels"], self.temperature, self.alpha)

    def train(self, mode: bool = True) -> "DistillModule":
        super().train(mode)
        self.teacher.eval()  # no dropout in the teacher's targets
        return self


def build_student(teacher: nn.Module, s: DictConfig) -> nn.Module:
    """A copy of the teacher with ``s.layers`` (null → every other layer) and, if ``s.width_sparsity`` > 0,
    that fraction of each layer's heads and FFN neurons removed by magnitude."""
    student = copy_with_layers(teacher, s.get("layers"))
    if float(s.get("width_sparsity", 0.0)) > 0:
        structured_prune(student, float(s.width_sparsity))
    return student


def run(cfg: DictConfig, out_dir: Path) -> RunRecord:
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    m = cfg.method
    temperature, alpha = float(m.kd.temperature), float(m.kd.alpha)
    if temperature <= 0 or not 0 <= alpha <= 1:
        raise ConfigError(f"method.kd needs temperature > 0 and alpha in [0, 1] (got {temperature}, {alpha})")
    if m.trainable == "lora":
        raise ConfigError("dpkd trains a student cut from the teacher's layers; set method.trainable=full or bitfit")
    spec, train, dev = load_task(cfg.task, int(cfg.seed))
    private = bool(m.private)
    split = m.get("budget_split")
    plans = plan_stages(cfg, len(train), list(m.get("step_fractions") or [1.0, 1.0]), private=private,
                        budget_split=None if split is None else float(split))
    lm = load_model(cfg.model, spec.num_labels)
    encoder_layers(lm.model)  # fail before training if the student cannot be built from this model
    set_trainable(lm, m)
    teacher_res = train_classifier(cfg, lm, spec, train, dev, plans[0], out_dir, stage_name="teacher",
                                   seed=int(cfg.seed))
    teacher = lm.model
    student_lm = replace(lm, model=build_student(teacher, m.student))
    set_trainable(student_lm, m)
    factory = partial(DistillModule, teacher=teacher, temperature=temperature, alpha=alpha)
    student_res = train_classifier(cfg, student_lm, spec, train, dev, plans[1], out_dir, stage_name="student",
                                   seed=int(cfg.seed) + 1, module_factory=factory,
                                   prior_stages=[teacher_res.stage] if teacher_res.stage else [])
    stages = [r.stage for r in (teacher_res, student_res) if r.stage]
    privacy = privacy_record(stages, plans[0].delta, plans[0].target_epsilon, plans[0].clip_norm)
    inputs = sample_inputs(lm, dev, int(cfg.task.max_length), int(cfg.trainer.get("eval_batch_size", 64)))
    report = compression_report(teacher, student_lm.model, inputs)
    report.update(structure=structure(student_lm.model), teacher_metrics=teacher_res.metrics,
                  budget_split=split)
    return make_record(cfg, metrics=student_res.metrics, privacy=privacy, params=student_lm.num_params(),
                       results=[teacher_res, student_res],
                       extra={"compression": report,
                              "data": data_record(cfg.task, train, dev)})
