"""End to end through the `dpbench` command: every method writes a valid results.json whose ε is
the accountant's. Helpers shared by the other CLI tests; bad input is in test_bad_inputs.py."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

from cli_runner import dpbench, dpbench_process  # noqa: F401 - shared with the other CLI tests

TINY = ["model=tiny_bert", "privacy.batch_size=16", "privacy.physical_batch_size=8", "trainer.max_steps=3",
        "trainer.progress_bar=false"]
TINY_RUN = [*TINY, "task=synthetic", "task.num_train=64", "task.num_dev=32", "task.max_length=24"]


def read(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


REQUIRED = {"status", "task", "model", "method", "seed", "config", "metrics", "privacy", "params", "timing",
            "memory", "versions", "git", "machine"}


@pytest.mark.parametrize("method", ["nonprivate", "dp_full", "dp_bitfit", "dp_full+sgd"])
def test_method_writes_valid_results(method: str, tmp_path: Path) -> None:
    out = tmp_path / method
    extra = ["method.optimizer.name=sgd", "method.optimizer.lr=0.5"] if method.endswith("+sgd") else []
    method = method.removesuffix("+sgd")
    proc = dpbench(*TINY_RUN, f"method={method}", "privacy.epsilon=8", *extra, f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = read(out)
    assert REQUIRED <= set(r) and r["status"] == "ok" and r["method"] == method
    assert r["machine"]["cpu"] and r["machine"]["logical_cpus"] >= 1 and r["machine"]["torch_threads"] >= 1
    assert 0.0 <= r["metrics"]["accuracy"] <= 1.0
    t = r["timing"]
    assert t["steps"] == 3 and t["train_s"] > 0 and r["memory"]["peak_rss_mb"] > 0
    assert t["examples"] > 0 and t["tokens"] > t["examples"] and t["computed_tokens"] >= t["tokens"]
    assert t["examples_per_s"] == pytest.approx(t["examples"] / t["train_s"], rel=0.01)
    assert 0 < r["params"]["trainable"] <= r["params"]["total"]
    p = r["privacy"]
    if method == "nonprivate":
        assert p["epsilon"] is None and p["stages"] == []
        return
    if method == "dp_bitfit":
        assert r["params"]["trainable"] < r["params"]["total"] / 10
    assert set(p) >= {"epsilon", "target_epsilon", "delta", "accountant", "clip_norm", "stages"}
    assert [set(s) for s in p["stages"]] == [{"name", "noise_multiplier", "sample_rate", "steps"}]
    assert p["stages"][0]["steps"] == 3 and p["stages"][0]["sample_rate"] == pytest.approx(16 / 64)
    assert p["delta"] == pytest.approx(1 / (2 * 64)) and p["epsilon"] <= 8.0


def test_epsilon_equals_prv_accountant(tmp_path: Path) -> None:
    """The acceptance command: ε in the record is prv-accountant's upper bound for the recorded mechanism."""
    out = tmp_path / "out"
    proc = dpbench("model=tiny_bert", "task=synthetic", "method=dp_full", "privacy.epsilon=8",
                   "trainer.max_steps=3", "trainer.progress_bar=false", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    p = read(out)["privacy"]
    (stage,) = p["stages"]
    acc = PRVAccountant(prvs=[PoissonSubsampledGaussianMechanism(stage["sample_rate"], stage["noise_multiplier"])],
                        max_self_compositions=[stage["steps"]], eps_error=0.01, delta_error=p["delta"] / 1000)
    low, _, up = acc.compute_epsilon(delta=p["delta"], num_self_compositions=[stage["steps"]])
    assert p["epsilon"] <= 8.0 and p["target_epsilon"] == 8.0
    assert low - 1e-9 <= p["epsilon"] <= up + 0.02 and math.isclose(p["epsilon"], up, rel_tol=0.01)


def test_nonprivate_run_learns_the_synthetic_task(tmp_path: Path) -> None:
    """A pipeline that learns: tiny BERT, 80 non-private steps (≈3 s) reach ≥ 0.70 dev accuracy (0.80 measured
    on 2026-12-01) where the majority class is at most 0.55; a broken loss, optimizer or data path stays near it."""
    from dpbench.data.synthetic import make_synthetic

    out = tmp_path / "learn"
    proc = dpbench("model=tiny_bert", "method=nonprivate", "task=synthetic", "task.num_train=512", "task.num_dev=200",
                   "task.max_length=24", "privacy.batch_size=32", "trainer.max_steps=80", "method.optimizer.lr=3e-3",
                   "trainer.progress_bar=false", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels = make_synthetic(200, pair=False, seed=10_000, simple_fraction=0.5).labels
    majority = max(labels.count(y) for y in set(labels)) / len(labels)
    assert majority <= 0.55 and read(out)["metrics"]["accuracy"] >= 0.70


def test_progress_bar_shows_logical_steps_loss_throughput_and_epsilon(tmp_path: Path) -> None:
    out = tmp_path / "bar"
    proc = dpbench(*TINY_RUN, "method=dp_full", "privacy.epsilon=8", "trainer.progress_bar=true",
                   "trainer.log_every_n_steps=1", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = re.split(r"[\r\n]", proc.stdout + proc.stderr)  # Lightning's bar writes to stdout
    final = [s for s in shown if "train: step" in s and "3/3" in s][-1]
    assert "loss=" in final and "ex/s=" in final and "v_num" not in final and "Epoch" not in final
    eps = float(final.split("ε=")[1].split(",")[0].rstrip("]"))
    assert eps == pytest.approx(read(out)["privacy"]["epsilon"], abs=1e-3)  # the ε of all 3 steps
    logged = (out / "logs" / "train" / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    assert {"train_loss", "examples_per_s", "tokens_per_s", "epsilon_spent"} <= set(header)
    spent = [float(row.split(",")[header.index("epsilon_spent")]) for row in logged[1:]
             if row.split(",")[header.index("epsilon_spent")]]
    assert len(spent) == 3 and spent == sorted(spent) and spent[0] < spent[-1]


def _tsv(folder: Path, train: str, dev: str = "sentence\tlabel\ngood\t1\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text(train)
    (folder / "dev.tsv").write_text(dev)
    return folder


@pytest.mark.shared_data
@pytest.mark.parametrize("task", ["sst2", "mnli"])
def test_real_glue_from_local_folder(task: str, shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / task
    proc = dpbench(*TINY, f"task={task}", f"task.data_dir={shared_data / task}", "task.max_train_examples=64",
                   "task.max_eval_examples=32", "method=dp_bitfit", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = read(out)
    assert r["status"] == "ok" and r["task"] == task and r["data"] == {"train_examples": 64, "dev_examples": 32,
                                                                  "eval_split": "dev"}
    assert r["privacy"]["delta"] == pytest.approx(1 / 128)
