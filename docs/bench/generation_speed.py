"""Generation speed, side by side in one run: SmolLM2-135M, 32 samples over the Yelp control codes,
32 new tokens each; one row per generate call (what per-code batching gave when codes outnumber the
samples) vs left-padded batches of 16 across codes."""
from pathlib import Path

import torch
from omegaconf import OmegaConf
from dpbench.data.generation import public_codes
from dpbench.methods.generate import generate_synthetic
from dpbench.models.registry import load_causal_lm
torch.set_num_threads(2)
lm = load_causal_lm(OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/model/smollm2.yaml"))
codes = public_codes("yelp")
g = OmegaConf.create({"num_samples": 32, "max_new_tokens": 32, "top_k": 50, "top_p": 0.9, "batch_size": 1})
one = generate_synthetic(lm, codes, g, 0)
padded = generate_synthetic(lm, codes, OmegaConf.merge(g, {"batch_size": 16}), 0)
print(f"codes {len(codes)}, distinct drawn {len(set(one.corpus.codes))}")
print(f"one row per call : {one.new_tokens} tokens, {one.seconds:.1f} s, {one.tokens_per_s:.1f} tok/s")
print(f"padded batch 16  : {padded.new_tokens} tokens, {padded.seconds:.1f} s, {padded.tokens_per_s:.1f} tok/s")
print(f"speed-up {padded.tokens_per_s / one.tokens_per_s:.2f}x")
print("sample:", padded.corpus.codes[0], "|", padded.corpus.texts[0][:200])
