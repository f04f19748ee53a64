"""Verifying a run record before it is listed: a typed schema, then ε recomputed from the logged mechanism.

A record is accepted only if every field of the results contract is present and well typed, the ε it
claims is at least the PRV upper bound recomputed from its stages (σ, q, steps of each) and δ, and those
stages are what its config plans for its training set (q = B/n, the planned steps, δ;
:mod:`dpbench.leaderboard.consistency`). A private method with no stages, a claimed ε below the
recomputation, a missing δ or a mechanism that disagrees with the config is rejected with the reason.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dpbench.errors import PrivacyError
from dpbench.leaderboard.consistency import consistency_errors
from dpbench.privacy.accounting import Stage, epsilon_upper
from dpbench.results.io import RESULTS_FILE, read_json

# A claim may sit below the recomputed bound by float noise only (same accountant, same inputs).
REL_TOL = 1e-6


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StageSchema(_Open):
    name: str
    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)


class PrivacySchema(_Open):
    epsilon: float | None
    target_epsilon: float | None
    delta: float | None = Field(gt=0, lt=1)
    accountant: str | None
    clip_norm: float | None
    stages: list[StageSchema]


class ParamsSchema(_Open):
    trainable: int = Field(ge=0)
    total: int = Field(gt=0)


class TimingSchema(_Open):
    train_s: float = Field(ge=0)
    steps: int = Field(ge=0)


class MemorySchema(_Open):
    peak_rss_mb: float = Field(ge=0)


class RunSchema(_Open):
    """The results contract (``dpbench/results/schema.py`` writes it); methods may add fields."""

    status: Literal["ok"]
    task: str
    model: str
    method: str
    seed: int
    config: dict[str, Any]
    metrics: dict[str, float | None]
    privacy: PrivacySchema
    params: ParamsSchema
    timing: TimingSchema
    memory: MemorySchema


@dataclass
class Verdict:
    """One record's verification: ``ok`` with the recomputed ε, or the reasons it is rejected."""

    source: str
    record: dict[str, Any]
    reasons: list[str] = field(default_factory=list)
    epsilon_recomputed: float | None = None

    @property
    def ok(self) -> bool:
        return not self.reasons


def _schema_errors(e: ValidationError) -> list[str]:
    out = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "record"
        out.append(f"missing field '{where}'" if err["type"] == "missing" else f"field '{where}': {err['msg']}")
    return out


@lru_cache(maxsize=4096)
def _recompute(stages: tuple[tuple[str, float, float, int], ...], delta: float) -> float:
    return epsilon_upper([Stage(*s) for s in stages], delta)


def recompute_epsilon(privacy: dict[str, Any]) -> float:
    """PRV upper bound of the logged stages at the logged δ (the same computation a run performs)."""
    stages = tuple((s["name"], float(s["noise_multiplier"]), float(s["sample_rate"]), int(s["steps"]))
                   for s in privacy["stages"])
    return _recompute(stages, float(privacy["delta"]))


def _is_private(record: dict[str, Any]) -> bool:
    method = (record.get("config") or {}).get("method") or {}
    return bool(method.get("private", False))


def verify_record(record: dict[str, Any], source: str = "<record>") -> Verdict:
    """Schema check, then the privacy claim against the accountant."""
    v = Verdict(source, record)
    if not isinstance(record, dict):
        v.reasons.append("not a JSON object")
        return v
    if record.get("status") != "ok":
        v.reasons.append(f"status is {record.get('status')!r}, not 'ok' (incomplete or failed run)"
                         + (f": {record['error']}" if record.get("error") else ""))
        return v
    try:
        RunSchema.model_validate(record)
    except ValidationError as e:
        v.reasons.extend(_schema_errors(e))
        return v
    if ((record.get("config") or {}).get("tuning") or {}).get("trial"):
        v.reasons.append("a dpbench-tune trial, private to the curator (its release would reveal the number of "
                         "trials): list the tuner's selected record instead")
        return v
    priv = record["privacy"]
    claimed, stages = priv["epsilon"], priv["stages"]
    if not stages:
        if claimed is not None:
            v.reasons.append(f"claims ε={claimed} but logs no DP stage to recompute it from")
        elif _is_private(record):
            v.reasons.append("a private method with no privacy stages logged")
        return v
    if claimed is None:
        v.reasons.append("logs DP stages but claims no ε (privacy.epsilon is null)")
        return v
    if priv["delta"] is None:
        v.reasons.append("lacks privacy.delta, needed to recompute ε")
        return v
    v.reasons.extend(consistency_errors(record))
    try:
        v.epsilon_recomputed = recompute_epsilon(priv)
    except PrivacyError as e:
        v.reasons.append(f"ε cannot be recomputed: {e}")
        return v
    if not math.isfinite(claimed) or claimed < v.epsilon_recomputed * (1 - REL_TOL):
        v.reasons.append(f"claimed ε={claimed:.4f} is below the recomputed upper bound "
                         f"{v.epsilon_recomputed:.4f} (σ, q, steps, δ as logged)")
    if priv.get("tuning") is not None:
        v.reasons.extend(_tuning_errors(record, claimed, v))
    audit = record.get("audit") or {}
    bound = audit.get("epsilon_lower_bound")
    if bound is not None and bound > claimed:
        v.reasons.append(f"the privacy audit's lower bound ε ≥ {bound:.3f} exceeds the claimed ε={claimed:.4f}")
    target = priv["target_epsilon"]
    if target is not None and v.epsilon_recomputed > target * (1 + REL_TOL):
        v.reasons.append(f"recomputed ε={v.epsilon_recomputed:.4f} exceeds the run's target ε={target}")
    return v


def _tuning_errors(record: dict[str, Any], claimed: float, v: Verdict) -> list[str]:
    """A tuned record: its total ε recomputed from ``privacy.tuning`` (private selection over its per-trial
    mechanism, which must be the stages it logs); the verdict's ε becomes that total."""
    from dpbench.privacy.selection import TrialCount, TrialMechanism, selection_epsilon

    priv, task = record["privacy"], (record.get("config") or {}).get("task") or {}
    t = priv["tuning"]
    unstable = [k for k in ("max_train_examples", "max_eval_examples") if task.get(k) is not None]
    if unstable:
        return [f"a tuned run with task.{unstable[0]} set: its index-based subset breaks the per-example split "
                "the tuning's bound needs"]
    try:
        trials = {k: t["trials"][k] for k in ("distribution", "eta", "gamma", "mu") if k in t["trials"]}
        mechanism = TrialMechanism.from_dict(t["per_trial"])
        count = TrialCount(**trials)
        total = selection_epsilon(count, [mechanism], float(priv["delta"]))
    except (KeyError, TypeError, ValueError, PrivacyError) as e:
        return [f"privacy.tuning cannot be recomputed: {e}"]
    out = []
    if not math.isclose(count.mean, float(t["trials"].get("mean_trials", math.nan)), rel_tol=1e-9):
        out.append(f"privacy.tuning states E[K]={t['trials'].get('mean_trials')}, but its distribution's is {count.mean:g}")
    if [s.to_dict() for s in mechanism.stages] != [dict(s) for s in priv["stages"]]:
        out.append("privacy.tuning's per-trial mechanism is not the stages the record logs")
    if claimed < total * (1 - REL_TOL):
        out.append(f"claimed ε={claimed:.4f} is below the tuning's recomputed total {total:.4f} "
                   "(private selection over the logged trial mechanism)")
    v.epsilon_recomputed = max(total, v.epsilon_recomputed or 0.0)
    return out


def load_verdicts(root: Path) -> list[Verdict]:
    """Verify every ``results.json`` under ``root`` (unreadable files are rejected, not skipped)."""
    out = []
    for path in sorted(Path(root).rglob(RESULTS_FILE)):
        try:
            record = read_json(path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            out.append(Verdict(str(path), {}, [f"unreadable: {e}"]))
            continue
        out.append(verify_record(record, str(path)))
    return out
