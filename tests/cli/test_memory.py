"""Each record's peak memory is its own run's: in a sweep (jobs one after another in one process), a
small job after a large one reports the small job's peak, close to the same job run alone."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from test_cli_runs import TINY_RUN, dpbench_process, read

if not sys.platform.startswith("linux"):
    pytest.skip("per-job peaks reset the kernel's high-water mark (/proc/self/clear_refs)", allow_module_level=True)

RUN = [*TINY_RUN, "method=dp_full", "method.freeze_embeddings=false", "privacy.epsilon=8"]  # 512-wide embeddings


def test_small_job_after_large_one_records_its_own_peak(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"  # job 0: a 512-wide model (a few hundred MiB more); job 1: the tiny one
    proc = dpbench_process("-m", *RUN, "model.config.hidden_size=512,32", f"hydra.sweep.dir={sweep}",
                   "hydra.sweep.subdir=${hydra.job.num}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    large, small = read(sweep / "0")["memory"], read(sweep / "1")["memory"]
    alone = tmp_path / "alone"
    proc = dpbench_process(*RUN, f"hydra.run.dir={alone}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    alone_peak = read(alone)["memory"]["peak_rss_mb"]
    assert small["measured"].startswith("VmHWM since job start")
    assert large["peak_rss_mb"] > small["peak_rss_mb"] + 150, (large, small)
    assert abs(small["peak_rss_mb"] - alone_peak) <= 0.05 * alone_peak, (small, alone_peak)
