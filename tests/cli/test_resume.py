"""Resume after SIGKILL without double-spending privacy, the budget guard, and determinism."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from dpbench.errors import PrivacyError
from dpbench.privacy.engine import make_engine
from dpbench.privacy.optimizer import PrivateOptimizer
from test_cli_runs import TINY_RUN, dpbench, read

RUN = [*TINY_RUN, "method=dp_full", "privacy.epsilon=8", "trainer.max_steps=30", "trainer.checkpoint_every_n_steps=3"]


def _kill_after_first_checkpoint(out: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "dpbench", *RUN, f"hydra.run.dir={out}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoints" / "train.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-training"
    assert not (out / "results.json").exists() or read(out)["status"] != "ok"
    done = torch.load(ckpt, weights_only=False)["steps_done"]
    assert 3 <= done < 30


def test_killed_run_resumes_to_the_uninterrupted_record(tmp_path: Path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert dpbench(*RUN, f"hydra.run.dir={whole}").returncode == 0
    _kill_after_first_checkpoint(killed)
    changed = dpbench(*RUN, "privacy.epsilon=4", f"hydra.run.dir={killed}")  # a new config cannot reset the spend
    assert changed.returncode != 0 and "its steps are spent" in changed.stderr.strip().splitlines()[-1]
    resumed = dpbench(*RUN, f"hydra.run.dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = read(whole), read(killed)
    assert b["status"] == "ok" and b["timing"]["steps"] == a["timing"]["steps"] == 30
    assert b["privacy"]["stages"] == a["privacy"]["stages"] and b["privacy"]["epsilon"] == a["privacy"]["epsilon"]
    assert b["metrics"] == a["metrics"]  # same seed and config: the same result (determinism)
    again = dpbench(*RUN, f"hydra.run.dir={killed}")  # a finished stage is loaded, not trained again
    assert again.returncode == 0 and read(killed)["privacy"] == b["privacy"] and read(killed)["metrics"] == b["metrics"]


def test_budget_guard_refuses_an_extra_noised_step() -> None:
    model = torch.nn.Linear(3, 2)
    engine = make_engine("bk", model, 1.0)
    opt = PrivateOptimizer(torch.optim.SGD(engine.params, lr=0.1), engine, noise_multiplier=1.0,
                           expected_batch_size=4.0, generator=torch.Generator().manual_seed(0), max_steps=2)
    for _ in range(2):
        engine.accumulate(engine.module(torch.randn(4, 3)).pow(2).sum(1))
        opt.step()
    engine.accumulate(engine.module(torch.randn(4, 3)).pow(2).sum(1))
    with pytest.raises(PrivacyError, match="calibrated for 2 steps"):
        opt.step()
    assert opt.steps == 2
