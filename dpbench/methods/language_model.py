"""Causal language-model training with the shared DP step: documents "<control code>\n\n<text>",
loss on the text tokens only (the prefix is the condition, never a target), and distillation from a
frozen teacher (DistilDP's loss)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from dpbench.choices import DIVERGENCES
from dpbench.data.generation import ControlledCorpus, lm_loader
from dpbench.methods.base import DPModule, upcast
from dpbench.models.registry import LoadedModel
from dpbench.pipeline import (PrivacyPlan, StageResult, batching_config, dp_config, make_sampler, optim_config,
                              run_stage)
from dpbench.privacy.accounting import Stage


def _shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Next-token logits (B, T-1, V), targets (B, T-1) and the mask of scored positions."""
    targets = labels[:, 1:]
    return upcast(logits[:, :-1]), targets, targets != -100


def token_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example mean next-token NLL over the labelled (text) positions, shape (B,)."""
    lg, targets, mask = _shifted(logits, labels)
    nll = F.cross_entropy(lg.transpose(1, 2), targets.clamp(min=0), reduction="none") * mask
    return nll.sum(1) / mask.sum(1).clamp(min=1)


def token_divergence(student: Tensor, teacher: Tensor, kind: str = "forward", beta: float = 0.5) -> Tensor:
    """Per-position divergence between the teacher's and the student's next-token distributions
    (log-probabilities, (..., V)), summed over the vocabulary: ``forward`` KL(teacher ‖ student),
    ``reverse`` KL(student ‖ teacher), or ``jsd`` the generalised Jensen–Shannon divergence of GKD
    (Agarwal et al., ICLR 2024), β·KL(t ‖ m) + (1 − β)·KL(s ‖ m) with m = β·t + (1 − β)·s."""
    if kind == "forward":
        return F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)
    if kind == "reverse":
        return F.kl_div(teacher, student, reduction="none", log_target=True).sum(-1)
    if kind == "jsd":
        if not 0 < beta < 1:
            raise ValueError(f"jsd needs beta in (0, 1) (got {beta})")
        m = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log1p(-beta)]), 0)
        return (beta * F.kl_div(m, teacher, reduction="none", log_target=True).sum(-1)
                + (1 - beta) * F.kl_div(m, student, reduction="none", log_target=True).sum(-1))
    raise ValueError(f"unknown divergence {kind!r}; choose one of: {', '.join(DIVERGENCES)}")


def distillation_loss(student: Tensor, teacher: Tensor, labels: Tensor, lam: float, temperature: float,
                      divergence: str = "forward", beta: float = 0.5) -> Tensor:
    """DistilDP's (1 − λ)·CE + λ·T²·D(teacher_T, student_T), each a per-example mean over the text
    positions only (the control-code prefix is masked out of both), shape (B,). D is
    KL(teacher ‖ student) by default (:func:`token_divergence` for the others)."""
    ce = token_nll(student, labels)
    s, _, mask = _shifted(student, labels)
    t = upcast(teacher[:, :-1])
    d = token_divergence(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), divergence, beta)
    d = (d * mask).sum(1) / mask.sum(1).clamp(min=1)
    return (1 - lam) * ce + lam * temperature ** 2 * d


class CausalLMModule(DPModule):
    """LM fine-tuning on controlled documents; validation reports perplexity on the text tokens."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._nll_sum, self._tokens = 0.0, 0

    def per_sample_loss(self, batch: dict[str, Tensor], model: nn.Module | None = None) -> Tensor:
        return token_nll((self.engine.module if model is None else model)(**self.lm.inputs(batch)).logits, batch["labels"])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self.model(**self.lm.inputs(batch)).logits
        mask = batch["labels"][:, 1:] != -100
        self._nll_sum += float((token_nll(logits, batch["labels"]) * mask.sum(1)).sum())
        self._tokens += int(mask.sum())

    def on_validation_epoch_end(self) -> None:
        nll = self._nll_sum / max(self._tokens, 1)
        self.final_metrics = {"nll": nll, "perplexity": math.exp(min(nll, 50.0))}
        self._nll_sum, self._tokens = 0.0, 0
        self.log_dict({f"val_{k}": v for k, v in self.final_metrics.items()}, prog_bar=True)


class LMDistillModule(CausalLMModule):
    """The student's loss against a frozen teacher (:func:`distillation_loss`); ``alpha`` > 0 adds the
    MSE of the last hidden states over the text positions (teacher and student must share their width)."""

    def __init__(self, *args, teacher: nn.Module, lam: float, temperature: float, alpha: float = 0.0,
                 divergence: str = "forward", beta: float = 0.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.lam, self.temperature, self.alpha = lam, temperature, alpha
        self.divergence, self.beta = divergence, beta

    def train(self, mode: bool = True) -> "LMDistillModule":
        super().train(mode)
        self.teacher.eval()
        return self

    def per_sample_loss(self, batch: dict[str, Tensor], model: nn.Module | None = None) -> Tensor:
        inputs, hidden = self.lm.inputs(batch), self.alpha > 0
        with torch.no_grad():
            t = self.teacher(**inputs, output_hidden_states=hidden)
        s = (self.engine.module if model is None else model)(**inputs, output_hidden_states=hidden)
        loss = distillation_loss(s.logits, t.logits, batch["labels"], self.lam, self.temperature, self.divergence,
                                 self.beta)
        if hidden:
            mask = (batch["labels"] != -100).unsqueeze(-1)
            mse = ((s.hidden_states[-1] - t.hidden_states[-1]).pow(2) * mask).sum((1, 2))
            loss = loss + self.alpha * mse / (mask.sum((1, 2)) * s.hidden_states[-1].shape[-1]).clamp(min=1)
        return loss


class LMDataModule(L.LightningDataModule):
    """Logical batches of ``train`` from ``sampler``; ``val`` in fixed order."""

    def __init__(self, train: ControlledCorpus, val: ControlledCorpus, lm: LoadedModel, max_length: int,
                 sampler, eval_batch_size: int) -> None:
        super().__init__()
        self.train_set, self.val_set, self.lm, self.max_length = train, val, lm, max_length
        self.train_sampler, self.eval_batch_size = sampler, eval_batch_size

    def train_dataloader(self):
        return lm_loader(self.train_set, self.lm.tokenizer, self.max_length, batch_sampler=self.train_sampler)

    def val_dataloader(self):
        return lm_loader(self.val_set, self.lm.tokenizer, self.max_length, batch_size=self.eval_batch_size)


def train_lm(cfg: DictConfig, lm: LoadedModel, train: ControlledCorpus, val: ControlledCorpus, plan: PrivacyPlan,
             out_dir: Path, *, stage_name: str, seed: int, prior_stages: Sequence[Stage] = (),
             module_factory: Callable[..., CausalLMModule] = CausalLMModule,
             checkpoint_dir: Path | None = None) -> StageResult:
    """One LM training stage under ``plan`` (DP or not), validated on ``val``; ``checkpoint_dir``: see
    :func:`dpbench.pipeline.run_stage`."""
    module = module_factory(lm, optim_config(cfg.method), dp_config(cfg, plan, seed), batching_config(cfg),
                            plan.steps)
    data = LMDataModule(train, val, lm, int(cfg.task.max_length), make_sampler(plan, len(train), seed),
                        int(cfg.trainer.get("eval_batch_size", 64)))
    return run_stage(cfg, module, data, plan, out_dir, stage_name, prior_stages, checkpoint_dir)
