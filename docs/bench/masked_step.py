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

import transformers

import dpbench.privacy.engine.rules.linear as linear_rule
from dpbench.bench import build, step

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=128)
p.add_argument("--seq-len", type=int, default=24)
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--chunks", type=int, nargs="+", default=[25, 22, 20, 18], help="log2 of values per chunk")
args = p.parse_args()
transformers.logging.set_verbosity_error()

dense = build("minilm", "dp full · bk (ours)", args.seq_len, args.batch)
masked = build("minilm", "dp full · bk (ours)", args.seq_len, args.batch, sparsity=0.5)  # as the compression methods prune
configs = [("dense DP", dense, None)] + [(f"masked, 2^{c} per chunk", masked, 1 << c) for c in args.chunks]


def timed(s, chunk: int | None) -> float:
    if chunk:
        linear_rule.MASKED_CHUNK_ELEMS = chunk
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
