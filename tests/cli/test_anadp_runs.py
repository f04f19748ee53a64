"""DP-LoRA and ANADP end to end: ``ok`` records whose ε is the accountant's for the recorded stages;
for ANADP the recorded noise multiplier is σ_eff, equal to the calibrated σ at every step."""
from __future__ import annotations

from pathlib import Path

import pytest

from dpbench.privacy.accounting import Stage, compute_epsilon
from test_cli_runs import TINY_RUN, dpbench, read

pytest.importorskip("peft")


@pytest.mark.parametrize("method, trainable", [("dp_lora", "lora"), ("anadp", "lora"), ("anadp", "bitfit"),
                                               ("anadp", "full"), ("anadp+adaptive", "bitfit")])
def test_lora_and_anadp_write_ok_records(method: str, trainable: str, tmp_path: Path) -> None:
    out = tmp_path / f"{method}_{trainable}"
    adaptive = method.endswith("+adaptive")
    method = method.removesuffix("+adaptive")
    proc = dpbench(*TINY_RUN, f"method={method}", f"method.trainable={trainable}", "trainer.max_steps=6",
                   "privacy.epsilon=3", "method.anadp.warmup_steps=2" if method == "anadp" else "seed=0",
                   "method.anadp.clip_quantile=0.5" if adaptive else "seed=0", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = read(out)
    p = r["privacy"]
    assert r["status"] == "ok" and len(p["stages"]) == 1 and p["stages"][0]["steps"] == 6
    s = p["stages"][0]
    eps = compute_epsilon([Stage(s["name"], s["noise_multiplier"], s["sample_rate"], s["steps"])], p["delta"]).upper
    assert p["epsilon"] == pytest.approx(eps, rel=1e-9) and p["epsilon"] <= 3.0
    if trainable == "lora":
        assert r["params"]["trainable"] < r["params"]["total"] / 20
    if method == "anadp":
        a = r["anadp"]
        assert a["sigma_eff"][0] == pytest.approx(a["sigma_eff"][1], rel=1e-12)
        assert s["noise_multiplier"] == pytest.approx(a["sigma_eff"][0], rel=1e-12)
        k = len(a["groups"])
        counts = k / a["adaptive_clipping"]["count_noise_multiplier"] ** 2 if adaptive else 0.0
        inv = (sum(x ** -2 for x in a["final_noise_multipliers"]) + counts) ** -0.5
        assert inv == pytest.approx(s["noise_multiplier"], rel=1e-9)
        total_clip = sum(c ** 2 for c in a["clip_norms"])
        assert (total_clip != pytest.approx(r["privacy"]["clip_norm"] ** 2, rel=1e-6)) == adaptive  # bounds moved
        assert k == len(a["final_noise_multipliers"]) > 1
