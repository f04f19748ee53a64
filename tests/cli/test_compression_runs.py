"""The DP compression methods end to end (issue: DP model compression): an ``ok`` record with the
measured sparsity, every DP stage listed, and ε equal to the PRV composition of those stages."""
from __future__ import annotations

from pathlib import Path

import pytest

from dpbench.privacy.accounting import Stage, compute_epsilon
from test_cli_runs import TINY_RUN, dpbench, read

SHORT = [*TINY_RUN, "trainer.max_steps=8", "privacy.epsilon=4"]  # the documented short schedule
STAGES = {"dpkd": 2, "prune_zero_shot": 1, "prune_one_shot": 2, "dpimp": 4, "dpimp_structured": 4}


@pytest.mark.parametrize("method", sorted(STAGES))
def test_compression_method_writes_ok_record(method: str, tmp_path: Path) -> None:
    out = tmp_path / method
    proc = dpbench(*SHORT, f"method={method}", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = read(out)
    assert r["status"] == "ok" and r["method"] == method and 0 <= r["metrics"]["accuracy"] <= 1
    c, p = r["compression"], r["privacy"]
    assert c["sparsity"] >= 0.5 and c["params"] < c["params_dense"]
    assert c["latency_ms"]["dense"] > 0 and c["latency_ms"]["compressed"] > 0 and c["size_mb"] > 0
    stages = [Stage(s["name"], s["noise_multiplier"], s["sample_rate"], s["steps"]) for s in p["stages"]]
    assert len(stages) == STAGES[method] and sum(s.steps for s in stages) == 8 == r["timing"]["steps"]
    composed = compute_epsilon(stages, p["delta"]).upper
    assert p["epsilon"] == pytest.approx(composed, rel=1e-9) and p["epsilon"] <= p["target_epsilon"] == 4
    if len(stages) > 1:
        assert all(compute_epsilon([s], p["delta"]).upper < p["epsilon"] for s in stages)
    if method == "dpimp_structured":
        assert c["structure"] == {"heads": [1, 1], "neurons": [32, 32]}  # tiny_bert: 2 heads, 64 neurons
    if method in ("prune_zero_shot", "prune_one_shot", "dpimp"):
        assert c["zeros_in_prunable"] >= 0.5 and c["params_stored"] == c["params_dense"]
    if method == "dpkd":
        assert c["structure"]["heads"] == [2] and "accuracy" in c["teacher_metrics"]


@pytest.mark.parametrize("overrides, expected", [
    (["method=dpimp", "method.compression.sparsity=1.0"], "method.compression.sparsity"),
    (["method=prune_one_shot", "privacy.engine=opacus"], "privacy.engine=bk"),
    (["method=dpimp", "trainer.max_steps=3"], "trainer.max_steps"),
    (["method=dpimp", "method.compression.step_fractions=[1,1]"], "step_fractions"),
    (["method=dpkd", "model=tiny_gpt2"], "unstructured"),
    (["method=dpkd", "method.kd.alpha=2"], "method.kd"),
])
def test_bad_compression_config_one_line_error(overrides: list[str], expected: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = dpbench(*SHORT, *overrides, f"hydra.run.dir={out}")
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode != 0 and lines[-1].startswith("dpbench: error: ") and expected in lines[-1], proc.stderr[-2000:]
    assert not (out / "results.json").exists() or read(out)["status"] != "ok"
