"""The DistilDP student's start, before and after the public repair (docs/distildp.md).

SmolLM2-135M (30 layers) → a student of 15 layers, kept every other or by Block Influence on the public
repair text (MNLI train sentences); perplexity on public MNLI dev premises (a public proxy) and on 200 Yelp
test reviews (the task's metric, never used to choose), before and after a repair of ``--repair-tokens``
tokens of MNLI train text (distilled from the pre-trained teacher, the preset's repair settings). The repair
uses ``repair.corpus=public`` and frozen embeddings, as the DistilDP table will. SST-2 dev sentences (movie
reviews; public here, Yelp is the private task) are a second, review-like public proxy.

    python docs/bench/student_start.py --data ../shared/data --repair-tokens 40960 --select block_influence
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dpbench.cli import compose_config
from dpbench.data.glue import load_glue
from dpbench.data.perplexity import perplexity
from dpbench.methods import distildp, student_repair

p = argparse.ArgumentParser()
p.add_argument("--data", default="../shared/data")
p.add_argument("--repair-tokens", type=int, default=0, help="0: no repair, only the starts")
p.add_argument("--select", nargs="+", default=["every_other", "block_influence"])
p.add_argument("--repair", nargs="*", default=None, help="selections to repair (default: all of --select)")
p.add_argument("--layers", default=None, help="an explicit list instead, e.g. [0,1,2,8]")
p.add_argument("--out", default="outputs/student_start")
p.add_argument("--set", nargs="*", default=[], help="more overrides, e.g. method.student.repair.optimizer.lr=1e-3")
a = p.parse_args()
torch.set_num_threads(2)
data = str(Path(a.data).resolve())
base = ["experiment=distildp", f"data_root={data}", "method.student.repair.corpus=public", "method.freeze_embeddings=true",
        f"method.student.repair.public.max_tokens={max(a.repair_tokens, 8 * 128)}",
        f"method.student.repair.cache_dir={a.out}/cache", "trainer.progress_bar=false", *a.set]
cfg = compose_config(base)
_, held_out, codes = distildp.load_generation_task(cfg.task, 0)
teacher = distildp.load_causal_lm(cfg.model)
teacher.model.get_input_embeddings().weight.requires_grad_(False)
mnli = list(load_glue("mnli", "dev", f"{data}/mnli").text_a[:150])
sst2 = list(load_glue("sst2", "dev", f"{data}/sst2").text_a[:300])  # public review-like text (Yelp is private)
yelp = held_out.subset(200, 0).texts


def ppl(model) -> str:
    return " / ".join(f"{perplexity(model, teacher.tokenizer, t, 128, 128):,.1f}" for t in (mnli, sst2, yelp))


print(f"perplexity on MNLI dev premises / 300 SST-2 dev sentences / 200 Yelp test reviews; "
      f"teacher: {ppl(teacher.model)}", flush=True)
runs = [("given", f"method.student.layers={a.layers}")] if a.layers else [(s, f"method.student.select={s}") for s in a.select]
for name, override in runs:
    c = compose_config(base + [override])
    chosen = distildp.choose_layers(c, teacher)
    student = distildp.build_student(teacher, chosen["layers"])
    print(f"{name}: layers {chosen['layers']}", flush=True)
    print(f"  before repair: {ppl(student.model)}", flush=True)
    if a.repair_tokens and (a.repair is None or name in a.repair):
        t0 = time.time()
        logs = Path(a.out) / "_".join([name, str(a.repair_tokens), *(o.rsplit(".", 1)[-1] for o in a.set)])
        info = student_repair.repair_student(c, teacher, student, codes, logs, layers=chosen["layers"])
        s = time.time() - t0
        tok = info["corpus"]["tokens"]
        print(f"  after repair on {tok:,} tokens ({info['steps']} steps, {s / 60:.1f} min, {tok / s:.0f} tok/s"
              f"{', cached' if info['cached'] else ''}): {ppl(student.model)}", flush=True)
