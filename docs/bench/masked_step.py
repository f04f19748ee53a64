"""A DP step on a 50%-masked MiniLM against the dense DP step, per chunk size of the masked norms
(docs/compression.md, "Masks under DP").

Unstructured pruning keeps ``weight_orig`` under a fixed mask, so the bk engine instantiates the masked
per-sample gradients to take their norms (``masked_weight_norms_sq``), in chunks of a given number of
values. Both models are built once; the steps of every configuration are interleaved, and the medians
of ``--repeats`` printed with their ratio to the dense DP step.

    python docs/bench/masked_step.py --batch 128 --seq-len 24
"""
from __future__ import annotations

import argparse
import statistics

import torch
import transformers
from torch.nn.utils import prune

import dpbench.privacy.engine.rules.linear as linear_rule
from dpbench.bench import MODELS, Setup, step
from dpbench.methods.finetune import select_trainable
from dpbench.models.registry import load_model
from dpbench.privacy.engine import make_engine
from dpbench.privacy.optimizer import PrivateOptimizer

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=128)
p.add_argument("--seq-len", type=int, default=24)
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--chunks", type=int, nargs="+", default=[25, 22, 20, 18], help="log2 of values per chunk")
args = p.parse_args()
transformers.logging.set_verbosity_error()


def setup(masked: bool) -> Setup:
    lm = load_model(MODELS["minilm"], 2)
    select_trainable(lm.model, "full")
    lm.model.train()
    if masked:  # as the compression methods prune: global magnitude over the encoder's Linear weights
        targets = [(m, "weight") for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in n]
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=0.5)
    engine = make_engine("bk", lm.model, 1.0)
    opt = PrivateOptimizer(torch.optim.AdamW(engine.params, lr=1e-5), engine, noise_multiplier=1.0,
                           expected_batch_size=float(args.batch), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, lm.model.config.vocab_size - 1, (args.batch, args.seq_len), generator=g)
    inputs = lm.inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return Setup(engine, opt, inputs, torch.randint(0, 2, (args.batch,), generator=g))


dense, masked = setup(False), setup(True)
configs = [("dense DP", dense, None)] + [(f"masked, 2^{c} per chunk", masked, 1 << c) for c in args.chunks]


def timed(s: Setup, chunk: int | None) -> float:
    if chunk:
        linear_rule.masked_weight_norms_sq.__defaults__ = (chunk,)
    return step(s)


for _, s, c in configs:  # warm-up
    timed(s, c)
    timed(s, c)
times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
for _ in range(args.repeats):
    for name, s, c in configs:
        times[name].append(timed(s, c))
base = statistics.median(times["dense DP"])
for name, ts in times.items():
    m = statistics.median(ts)
    print(f"{name:26s} {m * 1000:8.0f} ms/step  {args.batch / m:6.1f} ex/s  {m / base:.2f}x the dense DP step")
