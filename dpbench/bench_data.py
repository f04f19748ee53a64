"""``dpbench-bench --task``: training throughput on real data, DP and non-private side by side.

Each configuration trains the packaged model on the task's real training set with Poisson logical
batches drawn as a run draws them (rate B/n, the same seed for every configuration, so step k
sees the same examples everywhere), cut into micro-batches by the run's own code
(:meth:`~dpbench.methods.base.DPModule.accumulate`), through the private optimizer. Configurations:

* ``nonprivate full`` / ``nonprivate bitfit``: no clipping, no noise;
* ``dp full`` / ``dp bitfit``: per-sample clipping (``--clipping``) and noise, micro-batches by length;
* ``dp full · padded batch``: micro-batches are slices of the logical batch padded to its longest
  (``privacy.group_by_length=false``, the behaviour before length grouping);
* ``dp full · filled``: every example made ``--max-length`` real tokens (its ids repeated), i.e. the
  cost of data with no short sentences.

Each configuration lives in its own worker process (loaded and warmed up first); the parent runs
step k of every configuration before step k + 1 of any, rotating their order, and reports
examples/s over the timed steps, time per example relative to ``nonprivate full`` and each
worker's peak RSS.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

CONFIGS = {  # name → (trainable, private, layout)
    "nonprivate full": ("full", False, "grouped"),
    "nonprivate bitfit": ("bitfit", False, "grouped"),
    "dp full": ("full", True, "grouped"),
    "dp bitfit": ("bitfit", True, "grouped"),
    "dp full · padded batch": ("full", True, "padded"),
    "dp full · filled": ("full", True, "filled"),
}
BASELINE = "nonprivate full"


@dataclass
class DataCell:
    model: str
    task: str
    data_dir: str
    max_length: int
    batch_size: int
    physical: int
    tokens: int | None
    clipping: str
    clip_norm: float

    def argv(self) -> list[str]:
        return [self.model, self.task, self.data_dir, str(self.max_length), str(self.batch_size), str(self.physical),
                str(self.tokens or 0), self.clipping, str(self.clip_norm)]

    @classmethod
    def from_argv(cls, a: list[str]) -> DataCell:
        return cls(a[0], a[1], a[2], int(a[3]), int(a[4]), int(a[5]), int(a[6]) or None, a[7], float(a[8]))


def _fill(ids, length: int):
    import torch

    reps = -(-length // len(ids))
    return ids.repeat(reps)[:length] if len(ids) else torch.zeros(length, dtype=torch.long)


def build(cell: DataCell, config: str, steps: int):
    """(one-step function, dataset size) for ``config``: the module, its optimizer and the batches."""
    import torch

    from dpbench.bench import MODELS
    from dpbench.data.batching import MicroBatching
    from dpbench.data.datamodule import Collator, EncodedDataset
    from dpbench.data.glue import load_glue
    from dpbench.data.tasks import get_task_spec
    from dpbench.methods.base import ClassifierModule, DPConfig, OptimConfig
    from dpbench.methods.finetune import select_trainable
    from dpbench.models.registry import load_model
    from dpbench.privacy.sampling import PoissonBatchSampler

    trainable, private, layout = CONFIGS[config]
    spec = get_task_spec(cell.task)
    lm = load_model(MODELS[cell.model], spec.num_labels)
    select_trainable(lm.model, trainable)
    lm.model.train()
    data = EncodedDataset(load_glue(spec.name, "train", cell.data_dir), lm.tokenizer, cell.max_length)
    if layout == "filled":
        data.input_ids = [_fill(ids, cell.max_length) for ids in data.input_ids]
        if data.token_type_ids is not None:
            data.token_type_ids = [_fill(t, cell.max_length) for t in data.token_type_ids]
    n = len(data)
    dp = DPConfig(noise_multiplier=1.0, clip_norm=cell.clip_norm, expected_batch_size=float(cell.batch_size),
                  clipping=cell.clipping) if private else None
    batching = MicroBatching(cell.physical, cell.tokens, by_length=layout != "padded")
    module = ClassifierModule(lm, spec, OptimConfig(lr=1e-5), dp, batching, steps)
    opt = module.configure_optimizers()["optimizer"]
    batches = iter(PoissonBatchSampler(n, cell.batch_size / n, steps, seed=0))
    collate = Collator(lm.tokenizer.pad_token_id)

    def step() -> tuple[float, int, int]:
        import time

        batch = collate([data[i] for i in next(batches)])
        start = time.perf_counter()
        opt.step(lambda: module.accumulate(batch))
        return time.perf_counter() - start, int(batch["labels"].shape[0]), int(batch["attention_mask"].sum())

    torch.set_grad_enabled(True)
    return step, n


def _worker(argv: list[str]) -> None:
    import transformers

    from dpbench.allocator import reuse_freed_memory
    from dpbench.bench import TAG
    from dpbench.results.memory import status_mb

    transformers.logging.set_verbosity_error()
    reuse_freed_memory()  # as `dpbench` runs do
    cell, config, steps, warmup = DataCell.from_argv(argv[:9]), argv[9], int(argv[10]), int(argv[11])
    step, _ = build(cell, config, steps + warmup)
    for _ in range(warmup):
        step()
    print(TAG + str(status_mb("VmRSS")), flush=True)
    for line in sys.stdin:
        command = line.strip()
        reply = ",".join(map(str, step())) if command == "step" else status_mb("VmHWM") if command == "peak" else None
        print(TAG + str(reply), flush=True)


def measure(cell: DataCell, configs: list[str], repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """examples/s, tokens/s and peak RSS per configuration, over ``repeats`` interleaved steps."""
    from dpbench.bench import Worker

    workers = {}
    for c in configs:
        print(f"[bench] loading {c} ...", file=sys.stderr, flush=True)
        workers[c] = Worker(c, ["data", *cell.argv(), c, str(repeats), str(warmup)])
    done: dict[str, list[tuple[float, int, int]]] = {c: [] for c in configs}
    for r in range(repeats):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for c in order:
            s, n, t = workers[c].ask("step").split(",")
            done[c].append((float(s), int(n), int(t)))
        print(f"[bench] step {r + 1}/{repeats}: " + ", ".join(f"{c} {done[c][-1][0]:.1f}s" for c in configs),
              file=sys.stderr, flush=True)
    out = {}
    for c in configs:
        secs, ex, tok = (sum(x[i] for x in done[c]) for i in range(3))
        out[c] = {"seconds": secs, "examples": ex, "tokens": tok, "examples_per_s": ex / secs,
                  "tokens_per_s": tok / secs, "peak_mb": workers[c].close()["peak_mb"]}
    return out


def markdown(cell: DataCell, res: dict[str, dict[str, float]]) -> str:
    base = res.get(BASELINE)
    lines = ["| configuration | examples | s | examples/s | real tokens/s | s per example × nonprivate full "
             "| peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for c, r in res.items():
        ratio = f"{base['examples_per_s'] / r['examples_per_s']:.2f}×" if base else "—"
        lines.append(f"| {c} | {r['examples']:,} | {r['seconds']:.1f} | {r['examples_per_s']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {ratio} | {r['peak_mb']:,.0f} |")
    return "\n".join(lines)
