"""``dpbench-tune`` end to end on the synthetic task: a verified record whose ε includes the tuning, trials the
leaderboard refuses, a released record that says nothing of K, and search keys that would change the mechanism."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from dpbench.leaderboard.verify import load_verdicts, verify_record

RUN = ["model=tiny_bert", "task=synthetic", "task.num_train=256", "task.num_dev=64", "task.max_length=24",
       "method=dp_bitfit", "privacy.batch_size=32", "privacy.physical_batch_size=16", "trainer.max_steps=3",
       "trainer.progress_bar=false"]


def _tune(out: Path, *args: str, overrides: list[str] = RUN) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpbench.tuning", "--out", str(out), *args, "--", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tune")
    proc = _tune(out, "--space", "method.optimizer.lr=loguniform(1e-3,1e-1)", "--space",
                 "privacy.clip_norm=choice(0.5,1.0)", "--mean-trials", "3", "--epsilon", "8", "--holdout", "64",
                 "--score-noise", "2", "--secret-seed", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_selected_record_is_verified_with_the_tunings_epsilon(tuned: Path) -> None:
    selected = json.loads((tuned / "selected" / "results.json").read_text())
    verdict = verify_record(selected)
    priv = selected["privacy"]
    assert verdict.ok, verdict.reasons
    assert verdict.epsilon_recomputed == pytest.approx(priv["epsilon"], rel=1e-9) and priv["epsilon"] <= 8
    assert priv["epsilon_single_run"] < priv["epsilon"]
    assert selected["data"]["eval_split"] == "dev" and selected["data"]["dev_examples"] == 64
    assert set(priv["tuning"]["trials"]) == {"distribution", "eta", "gamma", "mean_trials"}  # nothing of K

    log = json.loads((tuned / "private" / "tuning_log.json").read_text())
    trials = log["trials"]
    assert len(trials) == log["k"] >= 1
    best = max(trials, key=lambda t: t["noised_score"])
    assert selected["metrics"] == best["dev_metrics"]
    assert selected["config"]["method"]["optimizer"]["lr"] == pytest.approx(best["config"]["method.optimizer.lr"])
    for t in trials:  # every trial ran the one mechanism the tuning accounted for, with its own seed
        rec = json.loads((Path(t["folder"]) / "results.json").read_text())
        assert rec["privacy"]["stages"] == priv["stages"] and rec["config"]["tuning"]["trial"] is True
        assert rec["seed"] == t["seed"]
    assert len({t["seed"] for t in trials}) == len(trials)

    # The release names neither the trials nor their seeds (with a seed, a trial's noise could be recomputed).
    text = (tuned / "selected" / "results.json").read_text()
    assert selected["seed"] == selected["config"]["seed"] == 0
    assert str(tuned / "private") not in text and "t0000" not in text and "tuning_log" not in text
    assert not any(re.search(rf"\b{t['seed']}\b", text) for t in trials)


def test_leaderboard_lists_the_release_and_refuses_the_trials(tuned: Path) -> None:
    verdicts = load_verdicts(tuned)
    ok = [v for v in verdicts if v.ok]
    assert [Path(v.source).parent.name for v in ok] == ["selected"]
    assert all("dpbench-tune trial" in v.reasons[0] for v in verdicts if not v.ok) and len(verdicts) > 1


def test_tampered_tuning_is_rejected(tuned: Path) -> None:
    selected = json.loads((tuned / "selected" / "results.json").read_text())
    fewer = copy.deepcopy(selected)  # claim a cheaper search: fewer expected trials and a lower total
    fewer["privacy"]["tuning"]["trials"].update(gamma=0.9)
    fewer["privacy"]["epsilon"] = selected["privacy"]["epsilon_single_run"] * 1.01
    assert any("below the tuning's recomputed total" in r for r in verify_record(fewer).reasons)
    other = copy.deepcopy(selected)  # account for a noisier trial than the one that ran
    other["privacy"]["tuning"]["per_trial"]["stages"][0]["noise_multiplier"] *= 2
    assert any("not the stages the record logs" in r for r in verify_record(other).reasons)


@pytest.mark.parametrize("space", ["privacy.batch_size=choice(16,32)", "task.num_train=choice(64,128)",
                                   "method=choice(dp_full,nonprivate)", "privacy.epsilon=uniform(1,8)"])
def test_search_keys_that_change_the_mechanism_are_refused(space: str, tmp_path: Path) -> None:
    proc = _tune(tmp_path / "out", "--space", space, "--epsilon", "8")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("dpbench-tune: error: --space")
    assert not (tmp_path / "out").exists()


def test_a_second_tuning_into_the_same_folder_is_refused(tuned: Path) -> None:
    proc = _tune(tuned, "--space", "method.optimizer.lr=loguniform(1e-3,1e-1)", "--epsilon", "8")
    assert proc.returncode == 2 and "holds a tuning already" in proc.stderr.strip().splitlines()[-1]


def test_a_failed_trial_releases_nothing() -> None:
    """A failure may depend on the data, so the tuning never selects around one: it stops, releasing nothing."""
    from dpbench.tuning import TuneError, _score

    with pytest.raises(TuneError, match="nothing is released"):
        _score({"status": "failed"}, None, None)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_stopping_the_tuner_stops_every_trial_worker(sig: str, tmp_path: Path) -> None:
    """A stopped tuning leaves no trial running: the sweep and the workers it starts form one process group."""
    import signal
    import time

    pidfile = tmp_path / "worker.pid"
    worker = f"sleep 300 & echo $! > {pidfile}; wait"  # a grandchild, as a sweep's trial worker is
    tuner = subprocess.Popen([sys.executable, "-c", "import sys; from dpbench.tuning import run_process_group; "
                              f"run_process_group(['bash', '-c', {worker!r}], sys.stdout, {{}})"], cwd=ROOT,
                             # SIGINT at its default: Python keeps a SIGINT it inherits as ignored
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline and tuner.poll() is None, "the worker never started"
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    assert _alive(pid)
    tuner.send_signal(getattr(signal, sig))
    assert tuner.wait(timeout=30) != 0
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "a trial worker outlived the tuner"
