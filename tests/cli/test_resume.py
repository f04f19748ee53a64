"""Resume after SIGKILL without double-spending privacy, the budget guard, and determinism."""
from __future__ import annotations

import json
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


def _signal_after_first_checkpoint(out: Path, sig: signal.Signals) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "dpbench", *RUN, f"hydra.run.dir={out}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = out / "checkpoints" / "train.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    _, stderr = proc.communicate()
    assert not (out / "results.json").exists() or read(out)["status"] != "ok"
    done = torch.load(ckpt, weights_only=False)["steps_done"]
    assert 3 <= done < 30, "the run ended before the signal could stop it mid-training"
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict:
    """The uninterrupted run every stopped-and-resumed one must equal."""
    out = tmp_path_factory.mktemp("whole")
    assert dpbench(*RUN, f"hydra.run.dir={out}").returncode == 0
    return read(out)


def _resumes_to(whole: dict, out: Path) -> dict:
    resumed = dpbench(*RUN, f"hydra.run.dir={out}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    b = read(out)
    assert b["status"] == "ok" and b["timing"]["steps"] == whole["timing"]["steps"] == 30
    assert b["privacy"]["stages"] == whole["privacy"]["stages"] and b["privacy"]["epsilon"] == whole["privacy"]["epsilon"]
    assert b["metrics"] == whole["metrics"]  # same seed and config: the same result (determinism)
    return b


def test_killed_run_resumes_to_the_uninterrupted_record(whole: dict, tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    assert _signal_after_first_checkpoint(killed, signal.SIGKILL).returncode == -signal.SIGKILL
    changed = dpbench(*RUN, "privacy.epsilon=4", f"hydra.run.dir={killed}")  # a new config cannot reset the spend
    assert changed.returncode != 0 and "its steps are spent" in changed.stderr.strip().splitlines()[-1]
    b = _resumes_to(whole, killed)

    # A folder holding a completed run is refused; run again only when asked, and the record is never lost.
    again = dpbench(*RUN, f"hydra.run.dir={killed}")
    assert again.returncode == 2 and "holds a completed run" in again.stderr.strip().splitlines()[-1]
    assert read(killed) == b
    failing = dpbench(*RUN, "replace_completed_run=true", "model.tokenizer=/no/such/tokenizer",
                      f"hydra.run.dir={killed}")
    assert failing.returncode == 2 and read(killed) == b  # the failed attempt is kept beside, not over it
    assert json.loads((killed / "results.failed.json").read_text())["status"] == "failed"
    replaced = dpbench(*RUN, "replace_completed_run=true", f"hydra.run.dir={killed}")  # the finished stage loads
    assert replaced.returncode == 0 and read(killed)["privacy"] == b["privacy"] and read(killed)["metrics"] == b["metrics"]
    kept = list(killed.glob("results.replaced-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == b


def test_terminated_run_says_so_checkpoints_and_resumes(whole: dict, tmp_path: Path) -> None:
    """SIGTERM (SLURM's preemption and time-limit signal): the step in flight completes, the stage checkpoints,
    the command exits 143 with one line, and the record says "stopped"; the same command then resumes."""
    out = tmp_path / "terminated"
    stopped = _signal_after_first_checkpoint(out, signal.SIGTERM)
    last = stopped.stderr.strip().splitlines()[-1]
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert last.startswith("dpbench: stopped: stopped by SIGTERM after") and "resume" in last
    done = torch.load(out / "checkpoints" / "train.pt", weights_only=False)["steps_done"]
    assert f"after {done} of 30 steps" in last  # the checkpoint holds every step taken
    assert read(out)["status"] == "stopped" and "metrics" not in read(out)
    _resumes_to(whole, out)


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
