"""DP compression by pruning (Mireshghallah et al., NeurIPS 2022): zero-shot, one-shot and iterative
magnitude pruning (DPIMP), unstructured (masks) or structured (whole heads and FFN neurons removed).

A run is a schedule of DP fine-tuning stages and pruning rounds on the private training set::

    zero-shot   prune(s) → train
    one-shot    train → prune(s) → train
    DPIMP (k)   train → prune(s₁) → train → … → prune(s_k = s) → train

Pruning looks only at weights — pre-trained (public) or released by earlier DP stages — so it is
post-processing and costs no privacy. Every training stage reads the private data; the stages share
one σ calibrated for their total step count (``pipeline.plan_stages``), and the recorded ε is the
PRV composition of all of them. Unstructured masks are ``torch.nn.utils.prune`` masks: the engine
clips the masked per-sample gradients and zeroes pruned coordinates of the released sum, so neither
clipping nor noise revives a pruned weight.
"""
from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from dpbench.compression.report import compression_report
from dpbench.compression.sparsity import magnitude_prune, make_permanent, sparsity_schedule
from dpbench.compression.structured import encoder_layers, structure, structured_prune
from dpbench.errors import ConfigError
from dpbench.methods.finetune import set_trainable
from dpbench.models.registry import load_model
from dpbench.pipeline import (data_record, load_task, make_record, plan_stages, privacy_record, sample_inputs,
                              train_classifier)
from dpbench.results.schema import RunRecord

Action = tuple[str, float]  # ("train", step fraction) | ("prune", cumulative sparsity)


def schedule(c: DictConfig) -> list[Action]:
    """The run's actions from ``method.compression`` (sparsity, iterations, pretrain, step_fractions)."""
    sparsity, k = float(c.sparsity), int(c.iterations)
    if not 0 <= sparsity < 1:
        raise ConfigError(f"method.compression.sparsity must be in [0, 1) (got {sparsity}); e.g. 0.5")
    if k < 1:
        raise ConfigError(f"method.compression.iterations must be >= 1 (got {k})")
    n_train = k + int(bool(c.pretrain))
    fractions = list(c.get("step_fractions") or [1.0] * n_train)
    if len(fractions) != n_train:
        raise ConfigError(f"method.compression.step_fractions needs {n_train} values (one per training stage), "
                          f"got {len(fractions)}")
    actions: list[Action] = [("train", fractions.pop(0))] if c.pretrain else []
    for s in sparsity_schedule(sparsity, k):
        actions += [("prune", s), ("train", fractions.pop(0))]
    return actions


def run(cfg: DictConfig, out_dir: Path) -> RunRecord:
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    c = cfg.method.compression
    private = bool(cfg.method.private)
    structured = bool(c.get("structured", False))
    if private and not structured and cfg.privacy.get("engine", "bk") != "bk":
        raise ConfigError("unstructured pruning trains masked weights (weight_orig), which only the bk engine clips; "
                          "set privacy.engine=bk")
    if cfg.method.trainable == "lora":
        raise ConfigError("pruning removes the model's own weights; set method.trainable=full or bitfit")
    actions = schedule(c)
    spec, train, dev = load_task(cfg.task, int(cfg.seed))
    planned = plan_stages(cfg, len(train), [v for a, v in actions if a == "train"], private=private)
    plans = iter(planned)
    lm = load_model(cfg.model, spec.num_labels)
    if structured:
        encoder_layers(lm.model)  # fail before training on a model without heads/neurons to remove
    set_trainable(lm, cfg.method)
    dense = copy.deepcopy(lm.model)
    results, history = [], []
    for action, value in actions:
        if action == "prune":
            if structured:
                structured_prune(lm.model, value)
            else:
                magnitude_prune(lm.model, value, str(c.get("scope", "global")))
            history.append({"prune_to": value})
            continue
        name = f"finetune{len(results)}"
        res = train_classifier(cfg, lm, spec, train, dev, next(plans), out_dir, stage_name=name,
                               seed=int(cfg.seed) + len(results), prior_stages=[r.stage for r in results if r.stage])
        results.append(res)
        history.append({"stage": name, "steps": res.steps, "metrics": res.metrics})
    make_permanent(lm.model)
    privacy = privacy_record([r.stage for r in results if r.stage], planned[0].delta, planned[0].target_epsilon,
                             planned[0].clip_norm)
    inputs = sample_inputs(lm, dev, int(cfg.task.max_length), int(cfg.trainer.get("eval_batch_size", 64)))
    report = compression_report(dense, lm.model, inputs, float(c.sparsity))
    report.update(structured=structured, schedule=history)
    if structured:
        report["structure"] = structure(lm.model)
    return make_record(cfg, metrics=results[-1].metrics, privacy=privacy, params=lm.num_params(),
                       results=results,
                       extra={"compression": report,
                              "data": data_record(cfg.task, train, dev)})
