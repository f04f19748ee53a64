"""Leaderboard submissions: pack verified runs into one JSON file, re-verify it, merge it into a folder.

A submission holds each run's full record (config, metrics, privacy record) with a hash of its config, plus
the submitting environment. ``validate`` trusts nothing in it: every record is verified again (schema and
ε recomputed by the accountant), every config hash is recomputed, and each configuration needs a minimum
number of seeds.
"""
from __future__ import annotations

import hashlib
import json
import platform
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dpbench.leaderboard.aggregate import group_key
from dpbench.leaderboard.verify import Verdict, verify_record
from dpbench.results.io import RESULTS_FILE, read_json, versions, write_json_atomic

FORMAT = "dpbench-submission"
FORMAT_VERSION = 1


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a run's resolved config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
                          .encode()).hexdigest()


def pack(root: Path, verdicts: list[Verdict], name: str) -> tuple[dict[str, Any], list[Verdict]]:
    """The submission of the verified runs among ``verdicts`` (found under ``root``), and the rejected
    verdicts left out of it."""
    ok = [v for v in verdicts if v.ok]
    runs = [{"config_hash": config_hash(v.record["config"]), "source": str(Path(v.source).relative_to(root)),
             "record": v.record} for v in ok]
    sub = {"format": FORMAT, "version": FORMAT_VERSION, "name": name,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "environment": {"platform": platform.platform(), "versions": versions()}, "runs": runs}
    return sub, [v for v in verdicts if not v.ok]


@dataclass
class Review:
    """``validate``'s answer: accepted when there is no reason to reject."""

    runs: list[Verdict] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return not self.reasons


def validate(sub: Any, min_seeds: int = 1) -> Review:
    review = Review()
    if not isinstance(sub, dict) or sub.get("format") != FORMAT:
        review.reasons.append(f"not a {FORMAT} file (make one with `dpbench-leaderboard submit DIR -o FILE`)")
        return review
    if sub.get("version") != FORMAT_VERSION:
        review.reasons.append(f"format version {sub.get('version')!r} is not {FORMAT_VERSION}")
    runs = sub.get("runs")
    if not isinstance(runs, list) or not runs:
        review.reasons.append("holds no runs")
        return review
    for i, run in enumerate(runs):
        record = run.get("record") if isinstance(run, dict) else None
        v = verify_record(record if isinstance(record, dict) else {}, f"run {i} ({(run or {}).get('source', '?')})")
        if v.ok and run.get("config_hash") != config_hash(record["config"]):
            v.reasons.append("config_hash does not match the record's config (edited after packing)")
        review.runs.append(v)
        review.reasons += [f"{v.source}: {why}" for why in v.reasons]
    seeds = Counter(group_key(v.record) for v in review.runs if v.ok)
    for key, n in seeds.items():
        if n < min_seeds:
            task, model, method, _, eps, *_ = key
            review.reasons.append(f"{task}/{model}/{method} at ε={eps}: {n} seed(s), fewer than the {min_seeds} "
                                  f"required (run more seeds, e.g. seed=0,1,2)")
    return review


def read_submission(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return {"_error": str(e)}


def merge(sub: dict[str, Any], into: Path) -> list[Path]:
    """Write an accepted submission's runs as ``into/<name>/<config hash>/results.json``."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(sub.get("name") or "submission"))
    paths = []
    for run in sub["runs"]:
        path = Path(into) / name / run["config_hash"][:16] / RESULTS_FILE
        write_json_atomic(path, run["record"])
        paths.append(path)
    return paths
