"""Generation speed, side by side in one run: SmolLM2-135M over the Yelp control codes, the same seeded draw of
codes decoded ``batch_size`` rows per ``generate`` call (left-padded across codes, KV cache, top-k 50 / top-p 0.9).
Batch 1 is what per-code batching gave when codes outnumber the samples.

    python docs/bench/generation_speed.py                                   # 64 samples × 32 tokens; B = 1, 16, 64
    python docs/bench/generation_speed.py --samples 128 --batch-sizes 16 64 128
"""
import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dpbench.data.generation import public_codes
from dpbench.methods.generate import generate_synthetic
from dpbench.models.registry import load_causal_lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32, help="max new tokens per sample")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_causal_lm(OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/model/smollm2.yaml"))
    codes = public_codes("yelp")
    g = OmegaConf.create({"num_samples": args.samples, "max_new_tokens": args.tokens, "top_k": 50, "top_p": 0.9})
    rows = [(b, generate_synthetic(lm, codes, OmegaConf.merge(g, {"batch_size": b}), 0)) for b in args.batch_sizes]
    base = rows[0][1].tokens_per_s
    print(f"SmolLM2-135M, {args.samples} samples × ≤ {args.tokens} new tokens, "
          f"{len(set(rows[0][1].corpus.codes))} of {len(codes)} codes drawn, {args.threads} threads")
    print("| batch | new tokens | seconds | tokens/s | vs batch", rows[0][0], "|")
    print("|---|---|---|---|---|")
    for b, gen in rows:
        print(f"| {b} | {gen.new_tokens} | {gen.seconds:.1f} | {gen.tokens_per_s:.1f} | {gen.tokens_per_s / base:.2f}× |")
    print("sample:", rows[-1][1].corpus.codes[0], "|", rows[-1][1].corpus.texts[0][:200])


if __name__ == "__main__":
    main()
