"""``dpbench-snr``: where a DP run's signal goes, per parameter group, before spending any time on it.

For the run a set of Hydra overrides describes (the same as ``dpbench``'s), draw a few Poisson
logical batches at the run's q, push each through the training module's own per-sample loss and
clipping engine, and compare per group k of d_k parameters

    signal_k = ‖Σᵢ clip(gᵢ)_k‖ / B         (the clipped mean gradient's share in the group)
    noise_k  = σ C √d_k / B                (the norm of the noise the release adds to it)

``snr`` is their ratio for one step; ``snr·√T`` is what T steps would give if the gradient kept its
direction (the signal adds up linearly, the noise as √T). A run whose total is far below 1 is noise:
fewer trainable coordinates (BiTFiT, LoRA, frozen embeddings), larger batches or more epochs move it.

This reads private training data and prints statistics of it: it is a tool for the data owner's
own recipe work (or for public/held-out data), not part of any private release.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch


@dataclass
class GroupSNR:
    name: str
    params: int
    signal: float
    noise: float

    @property
    def snr(self) -> float:
        return self.signal / self.noise if self.noise > 0 else math.inf


def group_snr(names: list[str], sums: list[torch.Tensor], batch_size: float, noise_std: float,
              granularity: str = "block") -> list[GroupSNR]:
    """Per group (``dpbench.privacy.allocation.group_names``) and in total: the clipped sums' norm
    over B against the noise norm σC√d/B (``noise_std`` = σC)."""
    from dpbench.privacy.allocation import group_names

    index, labels = group_names(names, granularity)
    sq, dims = [0.0] * len(labels), [0] * len(labels)
    for k, s in zip(index, sums):
        sq[k] += float(s.double().pow(2).sum())
        dims[k] += s.numel()
    rows = [GroupSNR(label, d, math.sqrt(v) / batch_size, noise_std * math.sqrt(d) / batch_size)
            for label, d, v in zip(labels, dims, sq)]
    rows.append(GroupSNR("total", sum(dims), math.sqrt(sum(sq)) / batch_size,
                         noise_std * math.sqrt(sum(dims)) / batch_size))
    return rows


def measure(overrides: list[str], batches: int = 2, granularity: str = "block") -> tuple[list[GroupSNR], dict]:
    """Average per-group signal over ``batches`` logical batches of the run ``overrides`` describe."""
    from hydra import compose, initialize_config_dir

    from dpbench.cli import CONF_DIR
    from dpbench.config import validate
    from dpbench.data.datamodule import TextDataModule
    from dpbench.methods.finetune import set_trainable
    from dpbench.methods.base import ClassifierModule
    from dpbench.models.registry import load_model
    from dpbench.pipeline import (batching_config, dp_config, load_task, make_sampler, optim_config,
                                  plan_privacy)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    validate(cfg)
    torch.manual_seed(int(cfg.seed))
    spec, train, dev = load_task(cfg.task, int(cfg.seed))
    plan = plan_privacy(cfg, len(train), private=True)
    lm = load_model(cfg.model, spec.num_labels)
    set_trainable(lm, cfg.method)
    module = ClassifierModule(lm, spec, optim_config(cfg.method), dp_config(cfg, plan, int(cfg.seed)),
                              batching_config(cfg), plan.steps)
    data = TextDataModule(train, dev, lm.tokenizer, int(cfg.task.max_length),
                          make_sampler(plan, len(train), int(cfg.seed)))
    lm.model.train()
    totals: list[GroupSNR] | None = None
    names = [n for n, _ in module.engine.named_params]
    for i, batch in enumerate(data.train_dataloader()):
        if i == batches:
            break
        module.accumulate(batch)
        rows = group_snr(names, module.engine.release(), plan.batch_size, plan.noise_multiplier * plan.clip_norm,
                         granularity)
        totals = rows if totals is None else [GroupSNR(a.name, a.params, a.signal + b.signal, a.noise)
                                              for a, b in zip(totals, rows)]
    rows = [GroupSNR(r.name, r.params, r.signal / batches, r.noise) for r in totals]
    info = {"sigma": plan.noise_multiplier, "clip_norm": plan.clip_norm, "batch_size": plan.batch_size,
            "steps": plan.steps, "batches": batches}
    return rows, info


def render(rows: list[GroupSNR], info: dict) -> str:
    root = math.sqrt(info["steps"])
    lines = [f"σ = {info['sigma']:.3f}, C = {info['clip_norm']:g}, B = {info['batch_size']}, "
             f"T = {info['steps']} steps; signal averaged over {info['batches']} Poisson batches",
             f"{'group':44s} {'params':>10s} {'signal':>9s} {'noise':>9s} {'snr':>7s} {'snr·√T':>7s}"]
    for r in rows:
        lines.append(f"{r.name[-44:]:44s} {r.params:10d} {r.signal:9.2e} {r.noise:9.2e} {r.snr:7.3f} "
                     f"{r.snr * root:7.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dpbench-snr", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for dpbench (task=sst2 method=dp_full ...)")
    parser.add_argument("--batches", type=int, default=2, help="logical batches to average the signal over")
    parser.add_argument("--groups", default="block", choices=("block", "module"))
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.exit(2, f"dpbench-snr: error: --batches must be >= 1 (got {args.batches})\n")
    from dpbench.errors import DPBenchError

    try:
        rows, info = measure(args.overrides, args.batches, args.groups)
    except DPBenchError as e:
        print(f"dpbench-snr: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(render(rows, info))


if __name__ == "__main__":
    main()
