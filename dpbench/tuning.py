"""``dpbench-tune``: a sweep whose ε includes the tuning (private hyper-parameter selection, docs/tuning.md).

    dpbench-tune --out DIR --space 'method.optimizer.lr=loguniform(1e-3,3e-2)' --mean-trials 8 --epsilon 8 \\
        --holdout 2000 -- experiment=glue task=sst2 task.data_dir=../shared/data/sst2 method=dp_bitfit

1. The per-trial mechanism is fixed first: the training set less ``--holdout`` examples gives q = B/n and the
   steps; σ is the smallest noise multiplier at which the whole tuning — K trials, K drawn from a truncated
   negative binomial (or Poisson) with the asked mean, the best released — is ε ≤ ``--epsilon`` at δ
   (``privacy.delta``, else 1/(2N) for the N private examples, held-out ones included), by
   :mod:`dpbench.privacy.selection`. Search keys that would change that mechanism are refused.
2. K and the K configurations are drawn from OS entropy (``--secret-seed`` only for tests), and the trials
   run as one Hydra multirun of ``dpbench`` (so ``hydra/launcher=joblib`` or SLURM work as for any sweep),
   each with its own secret seed, ``tuning.holdout_fraction`` (a per-example hashed split) and
   ``tuning.trial=true``; their output goes to ``DIR/private/sweep.log``. A trial that fails ends the
   tuning with nothing released (a failure may depend on the data).
3. Each trial is scored by its count of correct held-out predictions plus N(0, ``--score-noise``²) noise;
   the best is released as ``DIR/selected/results.json``: its dev metrics, its own stages and single-run
   ε, and ``privacy.tuning`` (the distribution, the per-trial mechanism, the total ε), which the
   leaderboard recomputes. ``privacy.epsilon`` is the total.

The guarantee needs K secret: ``DIR/private/`` (the trials, K, their scores) is the curator's and must never
be released; the selected record says nothing of K, of the other trials, of their seeds, or of the tuning's
total time. A second tuning into the same folder is refused: each attempt spends its budget.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpbench.errors import DPBenchError
from dpbench.privacy.selection import DISTRIBUTIONS, TrialCount, TrialMechanism, calibrate_trial_noise, selection_epsilon

# Keys a search may not vary: they change the mechanism every trial must share (sampling, steps, noise, budget,
# data), or turn privacy off. Within privacy.*, only these leave (σ, q, steps) alone.
_FIXED = {"method", "task", "privacy", "experiment", "model", "seed", "trainer.max_steps", "trainer.devices"}
_FIXED_PREFIXES = ("task.", "tuning.", "hydra", "method.private", "method.kind", "method.pipeline")
_PRIVACY_FREE = {"privacy.clip_norm", "privacy.clipping", "privacy.engine", "privacy.physical_batch_size",
                 "privacy.physical_batch_tokens", "privacy.group_by_length"}
_SPACE = re.compile(r"^([\w.]+)=(choice|uniform|loguniform)\((.*)\)$")


class TuneError(DPBenchError):
    """A tuning request that cannot be run as asked."""


@dataclass(frozen=True)
class Dimension:
    """One searched option: ``choice(a,b,...)``, ``uniform(lo,hi)`` or ``loguniform(lo,hi)``."""

    key: str
    kind: str
    values: tuple

    @classmethod
    def parse(cls, text: str) -> Dimension:
        m = _SPACE.match(text.replace(" ", ""))
        if not m:
            raise TuneError(f"--space '{text}' is not KEY=choice(a,b,...), KEY=uniform(lo,hi) or KEY=loguniform(lo,hi)")
        key, kind, args = m.groups()
        if key in _FIXED or (key.startswith(_FIXED_PREFIXES)) or (key.startswith("privacy.") and key not in _PRIVACY_FREE):
            raise TuneError(f"--space may not search '{key}': it changes the mechanism every trial must share "
                            f"(privacy options allowed: {', '.join(sorted(_PRIVACY_FREE))})")
        values = tuple(_value(v) for v in args.split(","))
        if kind != "choice" and (len(values) != 2 or not all(isinstance(v, (int, float)) for v in values)
                                 or not values[0] < values[1] or (kind == "loguniform" and values[0] <= 0)):
            raise TuneError(f"--space '{text}': {kind} needs two numbers lo < hi" + (" (lo > 0)" if kind == "loguniform" else ""))
        return cls(key, kind, values)

    def sample(self, rng: np.random.Generator) -> Any:
        if self.kind == "choice":
            return self.values[int(rng.integers(len(self.values)))]
        lo, hi = (math.log(v) for v in self.values) if self.kind == "loguniform" else self.values
        x = float(rng.uniform(lo, hi))
        return math.exp(x) if self.kind == "loguniform" else x


def _value(text: str) -> Any:
    """A search value as Hydra would read it: int, float (``1e-3`` too), else YAML (true, null, a name)."""
    import yaml

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


@dataclass(frozen=True)
class Plan:
    """What every trial shares, fixed before any trial runs."""

    count: TrialCount
    mechanism: TrialMechanism
    delta: float
    target_epsilon: float
    epsilon: float          # the whole tuning's, at ``delta``
    holdout_fraction: float
    base_seed: int


def make_plan(overrides: list[str], *, mean_trials: float, distribution: str, eta: float, target_epsilon: float,
              holdout: int, score_noise: float) -> Plan:
    """The trials' shared mechanism: q and steps from the composed config, σ calibrated to the total target."""
    from dpbench.cli import compose_config
    from dpbench.config import validate
    from dpbench.pipeline import load_task, plan_privacy
    from dpbench.privacy.accounting import Stage

    cfg = compose_config(overrides)
    validate(cfg)
    if not cfg.method.get("private") or cfg.method.get("kind", "finetune") != "finetune":
        raise TuneError(f"dpbench-tune tunes private fine-tuning methods; method={cfg.method.name} is not one")
    if not score_noise > 0:
        raise TuneError(f"--score-noise must be > 0 (got {score_noise}): the held-out score must be private")
    for key in ("max_train_examples", "max_eval_examples", "holdout_examples"):
        if cfg.task.get(key) is not None:  # index-based subsets are not per-example stable: the argument fails
            raise TuneError(f"task.{key} cannot be used with dpbench-tune (its subset is not per-example "
                            "stable); use --holdout for the scoring split")
    _, whole, _ = load_task(cfg.task, int(cfg.seed))
    if not 0 < holdout < len(whole):
        raise TuneError(f"--holdout must be in [1, {len(whole) - 1}] (got {holdout})")
    fraction = holdout / len(whole)
    train, _ = whole.split_by_hash(fraction, seed=int(cfg.task.get("holdout_seed", 0)))  # as the trials split
    n = len(train)
    steps = plan_privacy(cfg, n, private=False).steps
    q = int(cfg.privacy.batch_size) / n
    delta = float(cfg.privacy.delta) if cfg.privacy.get("delta") is not None else 1 / (2 * len(whole))
    count = TrialCount.with_mean(distribution, mean_trials, eta)
    sigma = calibrate_trial_noise(count, target_epsilon, delta, sample_rate=q, steps=steps, score_noise=score_noise)
    mechanism = TrialMechanism((Stage("train", sigma, q, steps),), score_noise)
    return Plan(count, mechanism, delta, target_epsilon, selection_epsilon(count, [mechanism], delta), fraction,
                int(cfg.seed))


def _trial_file(folder: Path, name: str, values: dict[str, Any], plan: Plan, seed: int) -> None:
    from omegaconf import OmegaConf

    stage = plan.mechanism.stages[0]
    fixed = {"privacy.noise_multiplier": stage.noise_multiplier, "privacy.epsilon": None, "privacy.delta": plan.delta,
             "seed": seed, "tuning.trial": True, "tuning.report_dev": True,
             "tuning.holdout_fraction": plan.holdout_fraction}
    conf = OmegaConf.create()
    for key, value in {**values, **fixed}.items():
        OmegaConf.update(conf, key, value, force_add=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text("# @package _global_\n" + OmegaConf.to_yaml(conf))


def run_trials(out: Path, overrides: list[str], configs: list[dict[str, Any]], seeds: list[int], plan: Plan
               ) -> list[Path]:
    """All trials as one ``dpbench -m`` sweep, its output in ``private/sweep.log`` (it names the trials);
    the folders of their records, in order."""
    private = out / "private"
    names = [f"t{i:04d}" for i in range(len(configs))]
    for name, values, seed in zip(names, configs, seeds):
        _trial_file(private / "conf" / "tune_trial", name, values, plan, seed)
    sweep = private / "trials"
    cmd = [sys.executable, "-m", "dpbench", "-m", *overrides, f"hydra.searchpath=[file://{private / 'conf'}]",
           f"+tune_trial={','.join(names)}", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"]
    with open(private / "sweep.log", "w") as log:
        code = run_process_group(cmd, log, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    if code != 0:
        raise TuneError(f"the trials' sweep failed (exit {code}; {private / 'sweep.log'}): nothing is "
                        "released, and this tuning's budget is spent; fix the cause and tune into a new --out")
    return [sweep / str(i) for i in range(len(configs))]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_process_group(cmd: list[str], log: Any, env: dict[str, str]) -> int:
    """Run ``cmd`` as the leader of its own process group and return its exit code. If this process is stopped
    (SIGINT, or SIGTERM while this runs in the main thread) or fails while waiting, the whole group — the sweep
    and every trial worker it started — is killed, so no trial outlives the tuning."""
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        return proc.wait()
    except BaseException:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=10)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _score(record: dict[str, Any] | None, plan: Plan, rng: np.random.Generator) -> tuple[float, float]:
    """(exact, noised) count of correct held-out predictions."""
    if record is None or record.get("status") != "ok":  # a failure may depend on the data: never select around it
        raise TuneError("a trial did not complete: nothing is released, and this tuning's budget is spent; "
                        "fix the cause and tune into a new --out")
    if record["privacy"]["stages"] != [stage.to_dict() for stage in plan.mechanism.stages]:
        raise TuneError("a trial ran another mechanism than the one accounted for; its record's stages differ "
                        "from the plan (report this as a bug)")
    held = int(record["data"]["dev_examples"])
    correct = round(float(record["metrics"]["accuracy"]) * held)
    return float(correct), correct + float(rng.normal(0.0, plan.mechanism.score_noise))


def release(trial: dict[str, Any], plan: Plan, noised_score: float) -> dict[str, Any]:
    """The selected trial's record as released: dev metrics, the total ε and ``privacy.tuning``; nothing of K."""
    rec = deepcopy(trial)
    priv = rec["privacy"]
    priv["epsilon_single_run"] = priv["epsilon"]
    priv["epsilon"] = plan.epsilon
    priv["target_epsilon"] = plan.target_epsilon
    priv["tuning"] = {
        "method": "private selection (Papernot & Steinke, ICLR 2022): K trials, K ~ the distribution below, "
                  "kept secret; the best held-out score released",
        "trials": plan.count.to_dict(), "per_trial": plan.mechanism.to_dict(), "epsilon": plan.epsilon,
        "delta": plan.delta, "accountant": "rdp (Theorem 2 / 6) → (ε, δ)",
        "score": {"split": "holdout (each example's side by its own hash)", "metric": "correct predictions",
                  "noise_std": plan.mechanism.score_noise, "selected_noised": noised_score},
        "trial_seeds": "secret (one per trial, drawn from OS entropy; not released)"}
    rec["seed"] = rec["config"]["seed"] = plan.base_seed  # the trial's own seed stays secret: it fixes its noise
    rec["metrics"] = rec.pop("dev_metrics")
    data = rec["data"]
    rec["data"] = {**data, "eval_split": "dev", "dev_examples": data.pop("official_dev_examples"),
                   "holdout_examples": data["dev_examples"]}
    rec["config"]["tuning"] = {**rec["config"].get("tuning", {}), "trial": False}
    return rec


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpbench-tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (DIR/selected is the release)")
    p.add_argument("--space", action="append", default=[], help="KEY=choice(..)|uniform(lo,hi)|loguniform(lo,hi)")
    p.add_argument("--epsilon", type=float, required=True, help="total ε of tuning and training")
    p.add_argument("--mean-trials", type=float, default=8.0, help="E[K] (default 8)")
    p.add_argument("--distribution", choices=DISTRIBUTIONS, default="truncated_negative_binomial")
    p.add_argument("--eta", type=float, default=0.0, help="truncated negative binomial shape (0: logarithmic)")
    p.add_argument("--holdout", type=int, default=2000, help="training examples held out to score trials")
    p.add_argument("--score-noise", type=float, default=10.0, help="std of the noise on the correct-count score")
    p.add_argument("--dry-run", action="store_true", help="print the plan (σ, ε, E[K]) and stop")
    p.add_argument("--secret-seed", type=int, default=None, help=argparse.SUPPRESS)  # tests only: K becomes known
    p.add_argument("overrides", nargs="*", help="dpbench overrides every trial shares (after --)")
    return p


def main(argv: list[str] | None = None) -> None:
    from dpbench.results.io import read_json, write_json_atomic

    args = _parser().parse_args(argv)
    try:
        space = [Dimension.parse(s) for s in args.space]
        if not space:
            raise TuneError("give at least one --space KEY=...; e.g. --space 'method.optimizer.lr=loguniform(1e-3,3e-2)'")
        if (args.out / "private").exists() or (args.out / "selected").exists():
            raise TuneError(f"'{args.out}' holds a tuning already (each attempt spends its budget); use a new --out")
        plan = make_plan(args.overrides, mean_trials=args.mean_trials, distribution=args.distribution, eta=args.eta,
                         target_epsilon=args.epsilon, holdout=args.holdout, score_noise=args.score_noise)
    except DPBenchError as e:
        print(f"dpbench-tune: error: {str(e).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    stage = plan.mechanism.stages[0]
    print(f"dpbench-tune: E[K]={plan.count.mean:g} trials ({plan.count.distribution}), each σ={stage.noise_multiplier:.4f}, "
          f"q={stage.sample_rate:.5f}, {stage.steps} steps, score noise {plan.mechanism.score_noise:g}: "
          f"total ε={plan.epsilon:.3f} at δ={plan.delta:.2e}")
    if args.dry_run:
        return
    seed = args.secret_seed if args.secret_seed is not None else secrets.randbits(128)
    rng = np.random.default_rng(seed)
    k = plan.count.sample(rng)
    configs = [{d.key: d.sample(rng) for d in space} for _ in range(k)]
    seeds = [int(rng.integers(2**31)) for _ in range(k)]  # independent trials; never released
    log: dict[str, Any] = {"note": "PRIVATE: never release this folder; the guarantee needs K secret",
                           "k": k, "secret_seed": str(seed), "plan_epsilon": plan.epsilon, "trials": []}
    (args.out / "private").mkdir(parents=True)
    best, best_score = None, -math.inf
    try:
        folders = run_trials(args.out, args.overrides, configs, seeds, plan) if k else []
        for values, trial_seed, folder in zip(configs, seeds, folders):
            rec = read_json(folder / "results.json") if (folder / "results.json").exists() else None
            exact, noised = _score(rec, plan, rng)
            log["trials"].append({"folder": str(folder), "config": values, "seed": trial_seed, "score": exact,
                                  "noised_score": noised, "dev_metrics": rec.get("dev_metrics")})
            if noised > best_score:
                best, best_score = rec, noised
    except TuneError as e:
        log["error"] = str(e)
        print(f"dpbench-tune: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        write_json_atomic(args.out / "private" / "tuning_log.json", log)
    if best is None:
        print("dpbench-tune: K = 0 (Poisson): no trial ran and nothing is released", file=sys.stderr)
        return
    released = release(best, plan, best_score)
    write_json_atomic(args.out / "selected" / "results.json", released)
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in released["metrics"].items())
    print(f"dpbench-tune: released {args.out / 'selected' / 'results.json'}: {metrics}; total ε={plan.epsilon:.3f} "
          f"(one run: ε={released['privacy']['epsilon_single_run']:.3f})")


if __name__ == "__main__":
    main()
