"""DistilDP and its baselines end to end on the smoke preset: ``ok`` records, only the private-data
stages in ``privacy.stages``, and ε ≤ 2 equal to the accountant's composition of those stages."""
from __future__ import annotations

from pathlib import Path

import pytest

from dpbench.privacy.accounting import Stage, compute_epsilon
from test_cli_runs import dpbench, read

STAGES = {"distildp": ["teacher"], "distildp_synthetic_only": ["teacher"], "dp_lm_student": ["student"],
          "dpkd_lm": ["teacher", "student"], "dp_onpolicy_kd": ["teacher"]}


@pytest.mark.parametrize("method", sorted(STAGES))
def test_distildp_pipelines_write_ok_records(method: str, tmp_path: Path) -> None:
    out = tmp_path / method
    proc = dpbench("experiment=distildp_smoke", f"method={method}", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = read(out)
    p = r["privacy"]
    assert r["status"] == "ok" and [s["name"] for s in p["stages"]] == STAGES[method]
    stages = [Stage(s["name"], s["noise_multiplier"], s["sample_rate"], s["steps"]) for s in p["stages"]]
    assert p["epsilon"] == pytest.approx(compute_epsilon(stages, p["delta"]).upper, rel=1e-9) and p["epsilon"] <= 2.0
    assert r["metrics"]["student_perplexity"] > 1
    if method != "dp_lm_student":
        assert r["metrics"]["teacher_perplexity"] > 1
    if method.startswith("distildp"):
        assert (out / "samples.txt").exists() and r["generation"]["num_samples"] == 32
        assert r["generation"]["tokens_per_s"] > 0
        assert r["distillation"]["lam"] == (0.0 if method.endswith("only") else 0.4)
    if method == "dp_onpolicy_kd":  # 2 rounds of 16 student samples, each one step of batch 16
        assert (out / "samples.txt").exists() and r["onpolicy"]["rounds"] == 2
        assert [g["num_samples"] for g in r["onpolicy"]["generation"]] == [16, 16]
        assert r["timing"]["steps"] == 4 + 2  # the teacher's DP steps and the student's rounds
        assert r["distillation"]["lam"] == 1.0  # the divergence alone
    assert (r["timing"]["generation_s"] > 0) == (method in ("distildp", "distildp_synthetic_only", "dp_onpolicy_kd"))
    repair = r["student_init"]["repair"]  # every pipeline starts from the repaired student (no cache here)
    assert repair["cached"] is False and repair["steps"] == 2 and repair["corpus"]["tokens_per_s"] > 0
    assert r["metrics"]["pretrained_teacher_perplexity"] > 1 and r["metrics"]["initial_student_perplexity"] > 1
    assert r["distillation"]["student_layers"] == 2


def test_non_private_control_runs_the_same_stages_without_noise_or_epsilon(tmp_path: Path) -> None:
    out = tmp_path / "control"
    proc = dpbench("experiment=distildp_smoke", "method=dpkd_lm", "method.private=false", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = read(out)
    assert r["status"] == "ok" and r["privacy"]["stages"] == [] and r["privacy"]["epsilon"] is None
    assert r["timing"]["steps"] == 2 + 2 and r["metrics"]["student_perplexity"] > 1  # the DP run's 4 steps, split


def test_lora_dp_stages_compose_to_the_target_epsilon(tmp_path: Path) -> None:
    out = tmp_path / "lora"
    proc = dpbench("experiment=distildp_smoke", "method=dpkd_lm", "method.trainable=lora", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = read(out)
    p = r["privacy"]
    stages = [Stage(s["name"], s["noise_multiplier"], s["sample_rate"], s["steps"]) for s in p["stages"]]
    assert r["status"] == "ok" and [s.name for s in stages] == ["teacher", "student"]
    assert p["epsilon"] == pytest.approx(compute_epsilon(stages, p["delta"]).upper, rel=1e-9) and p["epsilon"] <= 2.0
    assert r["metrics"]["student_perplexity"] > 1 and r["metrics"]["teacher_perplexity"] > 1
