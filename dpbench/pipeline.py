"""One run, from a composed config to a ``results.json``: the path every method shares.

config → task data → privacy plan (σ calibrated for the steps that will run) → method → record.
Multi-stage methods call :func:`train_classifier` once per stage and compose their stages in the
accountant; every stage that reads private data appears in ``privacy.stages``.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from dpbench.checkpointing import StageCheckpoint, StopAtBatchEnd, fingerprint
from dpbench.data.batching import MicroBatching
from dpbench.data.datamodule import Collator, EncodedDataset, TextDataModule
from dpbench.data.examples import TextClassificationData
from dpbench.data.glue import load_glue
from dpbench.data.synthetic import make_synthetic
from dpbench.data.tasks import TaskSpec, get_task_spec
from dpbench.errors import ConfigError, DataError
from dpbench.methods.base import ClassifierModule, DPConfig, DPModule, OptimConfig, Throughput
from dpbench.methods.progress import StepProgressBar
from dpbench.models.registry import LoadedModel
from dpbench.privacy.accounting import Stage, calibrate_noise, compute_epsilon, default_delta, epsilon_upper
from dpbench.privacy.allocation import AllocationConfig
from dpbench.privacy.distributed import PrivateDDPStrategy
from dpbench.privacy.sampling import PoissonBatchSampler, ShuffleBatchSampler
from dpbench.results.io import git_info, machine_info, versions
from dpbench.results.memory import memory_record
from dpbench.results.schema import STATUS_OK, PrivacyRecord, RunRecord

ACCOUNTANT = "prv"


# -- data ----------------------------------------------------------------------------------------
def load_task(task: DictConfig, seed: int, *, holdout_fraction: float | None = None
              ) -> tuple[TaskSpec, TextClassificationData, TextClassificationData]:
    """The task's spec and its train/dev data (synthetic in code, GLUE from ``task.data_dir``). With
    ``task.holdout_examples=N`` the evaluation set is N examples held out of the training set (seeded by
    ``task.holdout_seed``, the same for every run), and the official dev set is not read: use it to tune.
    ``holdout_fraction`` (private tuning's trials) holds out that share instead, each example's side fixed by
    its own hash (:meth:`TextClassificationData.split_by_hash`)."""
    spec = get_task_spec(task.name)
    if spec.name.startswith("synthetic"):
        train = make_synthetic(int(task.num_train), pair=spec.is_pair, seed=task.get("data_seed", 0),
                               label_noise=float(task.get("label_noise", 0.0)),
                               simple_fraction=float(task.get("simple_fraction", 0.0)))
    else:
        train = load_glue(spec.name, "train", task.get("data_dir"))
    if holdout_fraction is not None:
        train, dev = train.split_by_hash(float(holdout_fraction), seed=int(task.get("holdout_seed", 0)))
    elif task.get("holdout_examples"):  # tune on a split of the training set; dev stays unread
        train, dev = train.split_off(int(task.holdout_examples), seed=int(task.get("holdout_seed", 0)))
        dev = dev.subset(task.get("max_eval_examples"), seed=0)
    else:
        dev = load_dev(task)
    train = train.subset(task.get("max_train_examples"), seed=seed)
    bad = [y for y in train.labels + dev.labels if not 0 <= y < spec.num_labels]
    if bad:
        raise DataError(f"label {bad[0]} is out of range for task {spec.name} ({spec.num_labels} classes); fix the data")
    return spec, train, dev


def load_dev(task: DictConfig) -> TextClassificationData:
    """The task's official dev set (``task.max_eval_examples`` of it, if set)."""
    spec = get_task_spec(task.name)
    if spec.name.startswith("synthetic"):
        return make_synthetic(int(task.num_dev), pair=spec.is_pair, seed=task.get("data_seed", 0) + 10_000,
                              simple_fraction=float(task.get("simple_fraction", 0.0)))
    return load_glue(spec.name, "dev", task.get("data_dir")).subset(task.get("max_eval_examples"), seed=0)


def data_record(task: DictConfig, train: TextClassificationData, dev: TextClassificationData,
                held_out: bool | None = None) -> dict[str, Any]:
    """The record's ``data`` section: set sizes and which split the metrics were measured on."""
    held_out = bool(task.get("holdout_examples")) if held_out is None else held_out
    return {"train_examples": len(train), "dev_examples": len(dev), "eval_split": "holdout" if held_out else "dev"}


# -- privacy plan --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrivacyPlan:
    """How one training stage samples and how much noise it adds."""

    private: bool
    batch_size: int                 # expected logical batch size B (Poisson) or the fixed size
    sample_rate: float              # q = B / n
    steps: int
    delta: float | None
    noise_multiplier: float | None
    target_epsilon: float | None
    clip_norm: float | None


def plan_privacy(cfg: DictConfig, n: int, *, private: bool, target_epsilon: float | None = None,
                 prior_stages: Sequence[Stage] = (), steps: int | None = None) -> PrivacyPlan:
    """Steps from ``trainer.max_steps`` (else ``privacy.epochs``·n/B); σ calibrated so that the PRV
    upper bound of ε for ``prior_stages`` + this stage is ≤ the target (or taken from
    ``privacy.noise_multiplier`` and checked)."""
    p = cfg.privacy
    if n < 1:
        raise DataError("the training set is empty; check task.data_dir or the task size settings")
    b = int(p.batch_size)
    if b > n:
        raise ConfigError(f"privacy.batch_size ({b}) exceeds the training set size ({n}); lower privacy.batch_size")
    q = b / n
    if steps is None:
        max_steps = cfg.trainer.get("max_steps")
        steps = int(max_steps) if max_steps else max(1, math.ceil(float(p.epochs) * n / b))
    if not private:
        return PrivacyPlan(False, b, q, steps, None, None, None, None)
    delta = float(p.delta) if p.get("delta") is not None else default_delta(n)
    if delta >= 1.0 / n and not p.get("allow_large_delta", False):
        raise ConfigError(f"privacy.delta={delta:g} is not below 1/n={1 / n:g}; lower it or set privacy.allow_large_delta=true")
    target = target_epsilon if target_epsilon is not None else p.get("epsilon")
    target = None if target is None else float(target)
    sigma = p.get("noise_multiplier")
    if sigma is None:
        sigma = calibrate_noise(target, q, steps, delta, prior_stages=prior_stages)
    else:
        eps = compute_epsilon([*prior_stages, Stage("check", float(sigma), q, steps)], delta).upper
        if target is not None and eps > target:
            raise ConfigError(f"privacy.noise_multiplier={sigma} gives ε={eps:.3f} > target {target}; "
                              "raise it or set it to null to calibrate")
    return PrivacyPlan(True, b, q, steps, delta, float(sigma), target, float(p.clip_norm))


def split_steps(total: int, fractions: Sequence[float]) -> list[int]:
    """Integer steps per stage in proportion to ``fractions``, each ≥ 1, summing to ``total``."""
    if not fractions or any(f <= 0 for f in fractions):
        raise ConfigError(f"stage step fractions must be > 0 (got {list(fractions)})")
    if total < len(fractions):
        raise ConfigError(f"{total} steps cannot cover {len(fractions)} training stages; raise trainer.max_steps "
                          "or privacy.epochs")
    weights = [f / sum(fractions) for f in fractions]
    steps = [max(1, math.floor(w * total)) for w in weights]
    for i in sorted(range(len(steps)), key=lambda i: steps[i] - weights[i] * total)[: total - sum(steps)]:
        steps[i] += 1  # the largest remainders get the leftover steps
    while sum(steps) > total:  # only when a tiny stage was raised to 1
        steps[steps.index(max(steps))] -= 1
    return steps


def plan_stages(cfg: DictConfig, n: int, fractions: Sequence[float], *, private: bool,
                budget_split: float | None = None) -> list[PrivacyPlan]:
    """Plans for consecutive training stages on the same private data; the total step count (from
    ``trainer.max_steps`` or ``privacy.epochs``) is split over them by ``fractions``.

    Privacy of the composition: every stage is a Poisson-subsampled Gaussian mechanism on the same
    data, and the run's ε is the PRV composition of all of them. By default every stage gets the
    same σ, calibrated for the total step count, so the composition of the stages is exactly the
    mechanism that was calibrated. With ``budget_split=f`` (two stages), the first stage alone is
    calibrated for f·ε and the second for the composition to reach ε (its own share is then more
    than (1 − f)·ε, since composition is sublinear).
    """
    total = plan_privacy(cfg, n, private=False).steps
    steps = split_steps(total, fractions)
    target = cfg.privacy.get("epsilon")
    if budget_split is not None and private and cfg.privacy.get("noise_multiplier") is not None:
        raise ConfigError("method.budget_split needs a calibrated σ; set privacy.noise_multiplier=null "
                          "or method.budget_split=null (equal σ in both stages)")
    if budget_split is not None and private and target is not None:
        if len(steps) != 2 or not 0 < budget_split < 1:
            raise ConfigError(f"method.budget_split={budget_split} needs exactly two stages and a value in (0, 1)")
        first = plan_privacy(cfg, n, private=True, target_epsilon=budget_split * float(target), steps=steps[0])
        first = replace(first, target_epsilon=float(target))
        prior = [Stage("first", first.noise_multiplier, first.sample_rate, first.steps)]
        return [first, plan_privacy(cfg, n, private=True, prior_stages=prior, steps=steps[1])]
    base = plan_privacy(cfg, n, private=private, steps=total)
    return [replace(base, steps=k) for k in steps]


# -- one training stage --------------------------------------------------------------------------
@dataclass
class StageResult:
    metrics: dict[str, float]
    stage: Stage | None             # None for non-private stages
    train_s: float
    steps: int
    module: DPModule = field(repr=False)

    @property
    def throughput(self) -> Throughput:
        return self.module.throughput


def batching_config(cfg: DictConfig) -> MicroBatching:
    """How each logical batch is cut into micro-batches (``privacy.physical_batch_size``,
    ``privacy.physical_batch_tokens``, ``privacy.group_by_length``)."""
    p = cfg.privacy
    tokens = p.get("physical_batch_tokens")
    return MicroBatching(int(p.physical_batch_size), None if tokens is None else int(tokens),
                         bool(p.get("group_by_length", True)))


def make_sampler(plan: PrivacyPlan, n: int, seed: int):
    if plan.private:  # the sampling the accountant assumes: independent inclusion with rate q
        return PoissonBatchSampler(n, plan.sample_rate, plan.steps, seed=seed)
    return ShuffleBatchSampler(n, plan.batch_size, plan.steps, seed=seed)


def optim_config(method: DictConfig) -> OptimConfig:
    return OptimConfig(**OmegaConf.to_container(method.optimizer, resolve=True))


def allocation_config(method: DictConfig) -> AllocationConfig | None:
    """``method.anadp`` as an :class:`AllocationConfig` (None for uniform noise)."""
    section = method.get("anadp")
    if not section:
        return None
    try:
        return AllocationConfig(**OmegaConf.to_container(section, resolve=True))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method.anadp: {e}") from None


def make_logger(cfg: DictConfig, out_dir: Path, stage: str):
    name = cfg.logger.get("name", "csv")
    if name == "csv":
        return L.pytorch.loggers.CSVLogger(save_dir=str(out_dir), name="logs", version=stage)
    if name == "wandb":
        _wandb_env(cfg)
        return L.pytorch.loggers.WandbLogger(project=cfg.logger.get("project", "dpbench"), save_dir=str(out_dir),
                                             offline=cfg.logger.get("mode", "offline") == "offline",
                                             name=f"{out_dir.name}-{stage}",
                                             config=OmegaConf.to_container(cfg, resolve=True))
    if name in (None, "none"):
        return False
    raise ConfigError(f"unknown logger '{name}'; use logger=csv or logger=wandb")


def _wandb_env(cfg: DictConfig):
    """wandb, offline unless ``logger.mode=online`` (an explicit WANDB_MODE in the environment wins)."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("logger=wandb needs wandb; `pip install dpbench-lm[wandb]` or use logger=csv") from None
    os.environ.setdefault("WANDB_MODE", str(cfg.logger.get("mode", "offline")))
    return wandb


def publish_record(cfg: DictConfig, record: RunRecord, out_dir: Path) -> None:
    """With ``logger=wandb``: one summary run holding the config, the final metrics and the privacy record
    (the per-stage training curves are the Lightning loggers' runs)."""
    if cfg.logger.get("name") != "wandb":
        return
    wandb = _wandb_env(cfg)
    run = wandb.init(project=cfg.logger.get("project", "dpbench"), dir=str(out_dir), name=f"{out_dir.name}-record",
                     config=record.config, job_type="record", reinit="finish_previous")
    run.summary.update({"status": record.status, "metrics": record.metrics, "privacy": asdict(record.privacy),
                        "params": record.params, "timing": record.timing, "memory": record.memory})
    run.finish()


def dp_config(cfg: DictConfig, plan: PrivacyPlan, seed: int) -> DPConfig | None:
    """What the training step needs from the plan (None for a non-private stage)."""
    if not plan.private:
        return None
    p = cfg.privacy
    return DPConfig(noise_multiplier=plan.noise_multiplier, clip_norm=plan.clip_norm,
                    expected_batch_size=plan.batch_size, engine=p.get("engine", "bk"),
                    clipping=p.get("clipping", "flat"), noise_seed=seed + 1, allocation=allocation_config(cfg.method),
                    self_check=bool(p.get("self_check", True)))


def train_classifier(cfg: DictConfig, lm: LoadedModel, spec: TaskSpec, train: TextClassificationData,
                     dev: TextClassificationData, plan: PrivacyPlan, out_dir: Path, *,
                     stage_name: str = "train", seed: int = 0, prior_stages: Sequence[Stage] = (),
                     module_factory: Callable[..., ClassifierModule] = ClassifierModule) -> StageResult:
    """Train ``lm``'s trainable parameters under ``plan``, then evaluate on ``dev``.

    ``module_factory`` builds the Lightning module (a subclass with another per-sample loss, e.g.
    distillation, keeps the same DP step). ``prior_stages``: the private stages run before this one
    (for the ε shown while training)."""
    module = module_factory(lm, spec, optim_config(cfg.method), dp_config(cfg, plan, seed), batching_config(cfg),
                            plan.steps)
    data = TextDataModule(train, dev, lm.tokenizer, int(cfg.task.max_length), make_sampler(plan, len(train), seed),
                          eval_batch_size=int(cfg.trainer.get("eval_batch_size", 64)))
    return run_stage(cfg, module, data, plan, out_dir, stage_name, prior_stages)


def epsilon_meter(plan: PrivacyPlan, stage_name: str, prior_stages: Sequence[Stage], every: int
                  ) -> Callable[[int, float], float]:
    """ε (PRV upper bound) of ``prior_stages`` + this stage's first k steps at σ, recomputed every
    ``every`` steps and at the last one (0.01–0.5 s a call) and held in between."""
    last: dict[str, float] = {}

    def spent(k: int, sigma: float) -> float:
        if not last or k % every == 0 or k >= plan.steps:
            stages = [*prior_stages, Stage(stage_name, sigma, plan.sample_rate, k)]
            last["eps"] = epsilon_upper(stages, plan.delta)
        return last["eps"]

    return spent


def run_stage(cfg: DictConfig, module: DPModule, data: L.LightningDataModule, plan: PrivacyPlan, out_dir: Path,
              stage_name: str, prior_stages: Sequence[Stage] = (), checkpoint_dir: Path | None = None) -> StageResult:
    """Fit ``module`` for the plan's steps (one pass of the logical-batch sampler), then validate; the
    stage is recorded only when exactly the planned number of noised steps ran. With
    ``trainer.checkpoint_every_n_steps`` the stage checkpoints and resumes (:mod:`dpbench.checkpointing`).
    ``checkpoint_dir``: keep the stage's checkpoint there instead of in ``out_dir`` (and always at least at
    its end): a cache that another run with the same stage loads instead of training again."""
    t = cfg.trainer
    log_every = int(t.get("log_every_n_steps", 10))
    if plan.private:
        module.epsilon_spent = epsilon_meter(plan, stage_name, prior_stages, log_every)
    every = int(t.get("checkpoint_every_n_steps") or 0)
    ckpt = None
    if every > 0 or checkpoint_dir is not None:
        sampler = data.train_sampler
        ckpt = StageCheckpoint(checkpoint_dir or out_dir, stage_name, fingerprint(plan, stage_name, sampler.seed),
                               every, sampler)
        ckpt.restore_weights(module)
    devices = t.get("devices", 1)
    strategy = "auto"
    if isinstance(devices, int) and devices > 1:  # data parallel: the private optimizer reduces (distributed.py)
        strategy = PrivateDDPStrategy(process_group_backend="gloo" if t.get("accelerator", "cpu") == "cpu" else None)
    progress = bool(t.get("progress_bar", True))
    stop = StopAtBatchEnd(stage_name, plan.steps, ckpt.save if ckpt is not None else None)  # after ckpt's own save
    callbacks = [c for c in (ckpt, stop, StepProgressBar(stage_name) if progress else None) if c is not None]
    trainer = L.Trainer(
        accelerator=t.get("accelerator", "cpu"), devices=devices, strategy=strategy,
        precision=t.get("precision", "32-true"),
        max_epochs=1, max_steps=-1, num_sanity_val_steps=0, enable_checkpointing=False,
        limit_val_batches=0,  # no validation inside fit: train_s times training only; validated once below
        use_distributed_sampler=False, logger=make_logger(cfg, out_dir, stage_name),
        log_every_n_steps=log_every, enable_progress_bar=progress,
        enable_model_summary=False, default_root_dir=str(out_dir), callbacks=callbacks or None,
    )
    start = time.perf_counter()
    if ckpt is not None and ckpt.finished:  # trained before: load it, spend nothing
        steps = ckpt.steps_done
        ckpt.restore_finished(module)
    else:
        stop.fit(trainer, module, data)
        steps = module.steps_taken
    train_s = time.perf_counter() - start + (ckpt.train_s_before if ckpt else 0.0)
    trainer.limit_val_batches = 1.0
    trainer.validate(module, datamodule=data, verbose=False)
    if steps != plan.steps:
        raise RuntimeError(f"stage '{stage_name}' ran {steps} of {plan.steps} planned steps; not recording it as complete")
    stage = Stage(stage_name, module.effective_noise_multiplier, plan.sample_rate, steps) if plan.private else None
    module.engine.close()
    return StageResult(dict(module.final_metrics), stage, train_s, steps, module)


def evaluate(cfg: DictConfig, module: DPModule, lm: LoadedModel, data: TextClassificationData) -> dict[str, float]:
    """The trained ``module``'s metrics on ``data`` (a model's evaluation is post-processing: no privacy cost)."""
    from torch.utils.data import DataLoader

    from dpbench.data.datamodule import eval_batches

    encoded = EncodedDataset(data, lm.tokenizer, int(cfg.task.max_length))
    loader = DataLoader(encoded, batch_sampler=eval_batches(encoded.lengths, int(cfg.trainer.get("eval_batch_size", 64))),
                        collate_fn=Collator(lm.tokenizer.pad_token_id))
    trainer = L.Trainer(accelerator=cfg.trainer.get("accelerator", "cpu"), devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.validate(module, dataloaders=loader, verbose=False)
    return dict(module.final_metrics)


def sample_inputs(lm: LoadedModel, data: TextClassificationData, max_length: int, size: int) -> dict[str, torch.Tensor]:
    """Model inputs for the first ``size`` examples (e.g. to time inference)."""
    encoded = EncodedDataset(data, lm.tokenizer, max_length)
    items = [encoded[i] for i in range(min(size, len(encoded)))]
    return lm.inputs(Collator(lm.tokenizer.pad_token_id)(items))


# -- the record ----------------------------------------------------------------------------------
def privacy_record(stages: Sequence[Stage], delta: float | None, target: float | None,
                   clip_norm: float | None) -> PrivacyRecord:
    """ε computed by the accountant from the stages actually run (never typed)."""
    if not stages:
        return PrivacyRecord(None, None, None, None, None, [])
    rep = compute_epsilon(stages, delta)
    return PrivacyRecord(epsilon=rep.upper, target_epsilon=target, delta=delta, accountant=ACCOUNTANT,
                         clip_norm=clip_norm, stages=[s.to_dict() for s in stages],
                         epsilon_estimate=rep.estimate, epsilon_lower=rep.lower, epsilon_rdp=rep.rdp)


def timing_record(results: Sequence[StageResult]) -> dict[str, Any]:
    """``timing`` of a run's training stages: seconds and steps, and what they processed per second
    (examples, real tokens; ``computed_tokens`` counts the padding the micro-batches carried)."""
    train_s = sum(r.train_s for r in results)
    total = sum((r.throughput for r in results), Throughput())
    return {"train_s": round(train_s, 3), "steps": sum(r.steps for r in results), **total.rates(train_s)}


def make_record(cfg: DictConfig, *, metrics: dict[str, float], privacy: PrivacyRecord, params: dict[str, int],
                results: Sequence[StageResult], extra: dict[str, Any] | None = None) -> RunRecord:
    """The run's record; ``results`` are its training stages in order (timing is summed over them)."""
    return RunRecord(
        status=STATUS_OK, task=cfg.task.name, model=cfg.model.name, method=cfg.method.name, seed=int(cfg.seed),
        config=OmegaConf.to_container(cfg, resolve=True), metrics=metrics, privacy=privacy, params=params,
        timing=timing_record(results), memory=memory_record(), versions=versions(), git=git_info(),
        machine=machine_info(), extra=extra or {},
    )
