"""A two-job local sweep (Hydra's joblib launcher) over a tiny config gives two verified leaderboard runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from dpbench.leaderboard.aggregate import aggregate
from dpbench.leaderboard.verify import load_verdicts


def test_joblib_sweep_gives_two_verified_rows(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}",
            "model=tiny_bert", "task=synthetic", "task.num_train=64", "task.num_dev=32", "task.max_length=24",
            "method=dp_bitfit", "privacy.epsilon=8", "privacy.batch_size=16", "privacy.physical_batch_size=8",
            "trainer.max_steps=2", "trainer.progress_bar=false", "seed=0,1"]
    proc = subprocess.run([sys.executable, "-m", "dpbench", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    verdicts = load_verdicts(sweep)
    assert len(verdicts) == 2 and all(v.ok for v in verdicts), [v.reasons for v in verdicts]
    rows = aggregate((v.record, v.epsilon_recomputed) for v in verdicts)
    assert len(rows) == 1 and rows[0].n == 2 and rows[0].seeds == [0, 1] and rows[0].epsilon <= 8


def test_wandb_logger_is_offline_and_logs_the_privacy_record(tmp_path: Path) -> None:
    """``logger=wandb`` without network: offline runs on disk, one of them holding the privacy record."""
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    proc = subprocess.run([sys.executable, "-m", "dpbench", "model=tiny_bert", "task=synthetic", "task.num_train=64",
                           "task.num_dev=32", "task.max_length=24", "method=dp_bitfit", "privacy.batch_size=16",
                           "trainer.max_steps=2", "trainer.progress_bar=false", "logger=wandb",
                           f"hydra.run.dir={out}"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2  # the training stage and the final record
    assert any(b"noise_multiplier" in r.read_bytes() and b"target_epsilon" in r.read_bytes() for r in runs)
    assert [v.ok for v in load_verdicts(out)] == [True]
