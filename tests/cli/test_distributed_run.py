"""``trainer.devices=2`` on CPU: Lightning's DDP (gloo) with the private strategy, one record from rank 0."""
from __future__ import annotations

from pathlib import Path

import pytest

from test_cli_runs import TINY_RUN, dpbench_process, read


def test_cli_runs_data_parallel_on_two_cpu_processes(tmp_path: Path) -> None:
    """A second process runs (its log is there); rank 0 writes one ``ok`` record whose stage is the
    single-process plan, with q over the whole dataset. (The update equality is tested in
    tests/privacy/test_distributed.py.)"""
    out = tmp_path / "ddp"
    proc = dpbench_process(*TINY_RUN, "method=dp_full", "privacy.epsilon=8", "trainer.devices=2", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = read(out)
    (stage,) = r["privacy"]["stages"]
    assert r["status"] == "ok" and stage["steps"] == 3 and stage["sample_rate"] == pytest.approx(16 / 64)
    assert (out / "train_ddp_process_1.log").exists()
