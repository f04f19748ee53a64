"""Verified runs → one row per configuration: mean ± std and n over seeds, ranked per task and ε."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable

LOWER_IS_BETTER = ("perplexity",)  # metric names containing these rank ascending


def main_metric(record: dict[str, Any]) -> str:
    """The metric a task is ranked by: the task's own (GLUE), else student/plain perplexity, else accuracy."""
    from dpbench.data.tasks import TASKS

    spec = TASKS.get(record.get("task", ""))
    if spec:
        return spec.main_metric
    metrics = record.get("metrics") or {}
    for name in ("student_perplexity", "perplexity", "accuracy"):
        if name in metrics:
            return name
    return next(iter(metrics), "accuracy")


def lower_is_better(metric: str) -> bool:
    return any(s in metric for s in LOWER_IS_BETTER)


def _target_epsilon(record: dict[str, Any]) -> float | None:
    priv = record.get("privacy") or {}
    return priv.get("target_epsilon") if priv.get("stages") else None


def _sparsity(record: dict[str, Any]) -> float | None:
    c = record.get("compression") or {}
    s = c.get("target_sparsity", c.get("sparsity"))
    return None if s is None else round(float(s), 3)


def _trainable_set(record: dict[str, Any]) -> str:
    return str(((record.get("config") or {}).get("method") or {}).get("trainable", ""))


def task_label(record: dict[str, Any]) -> str:
    """The task, marked when the metrics were measured on a split held out of the training set
    (a tuning run) rather than the official dev set, so the two never share a row."""
    held = (record.get("data") or {}).get("eval_split") == "holdout"
    return f"{record['task']} (holdout)" if held else str(record["task"])


def tuning_label(record: dict[str, Any]) -> str:
    """Whether the run's ε includes the hyper-parameter search that chose it (``dpbench-tune``)."""
    priv = record.get("privacy") or {}
    if not priv.get("stages"):
        return "—"
    t = priv.get("tuning")
    if not t:
        return "not accounted"
    return f"accounted: E[K]={float(t['trials']['mean_trials']):g}, one run ε={float(priv['epsilon_single_run']):.2f}"


def group_key(record: dict[str, Any]) -> tuple:
    """Runs that differ only in their seed share a key."""
    return (task_label(record), record["model"], record["method"], _trainable_set(record), _target_epsilon(record),
            _sparsity(record), ((record.get("privacy") or {}).get("tuning") or {}).get("trials", {}).get("mean_trials"))


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


@dataclass
class Row:
    """One configuration aggregated over its seeds."""

    task: str
    model: str
    method: str
    trainable_set: str
    target_epsilon: float | None    # None: non-private
    sparsity: float | None
    metric: str
    mean: float | None
    std: float | None
    n: int
    seeds: list[int]
    epsilon: float | None           # the largest recomputed ε among the seeds
    delta: float | None
    trainable: float
    total: float
    train_s: float
    step_s: float | None
    peak_rss_mb: float
    latency_speedup: float | None = None
    audit_lower: float | None = None  # the largest one-run audit lower bound among the seeds (if audited)
    audit_uninformative: bool = False  # audited, but every audit's settings were too weak to contradict the claim
    tuning: str = "—"  # whether ε includes the tuning (tuning_label); "not accounted" for a plain private run
    rank: int | None = None
    paper: list[dict[str, Any]] = field(default_factory=list)

    @property
    def eps_label(self) -> str:
        return "∞" if self.target_epsilon is None else f"{self.target_epsilon:g}"


def aggregate(records: Iterable[tuple[dict[str, Any], float | None]]) -> list[Row]:
    """``records``: (verified record, recomputed ε). Returns rows sorted by task, ε, rank."""
    groups: dict[tuple, list[tuple[dict[str, Any], float | None]]] = {}
    for rec, eps in records:
        groups.setdefault(group_key(rec), []).append((rec, eps))
    rows = []
    for key, members in groups.items():
        recs = [r for r, _ in members]
        metric = main_metric(recs[0])
        values = [float(r["metrics"][metric]) for r in recs if r["metrics"].get(metric) is not None]
        mean, std = _mean_std(values)
        eps = [e for _, e in members if e is not None]
        steps = [r["timing"]["steps"] for r in recs]
        step_s = [r["timing"]["train_s"] / s for r, s in zip(recs, steps) if s]
        speed = [((r.get("compression") or {}).get("latency_ms") or {}).get("speedup") for r in recs]
        speed = [s for s in speed if s is not None]
        audited = [r["audit"] for r in recs if (r.get("audit") or {}).get("epsilon_lower_bound") is not None]
        audits = [a["epsilon_lower_bound"] for a in audited if a.get("informative", True)]
        rows.append(Row(
            task=key[0], model=key[1], method=key[2], trainable_set=key[3], target_epsilon=key[4], sparsity=key[5],
            metric=metric, mean=mean, std=std, n=len(values), seeds=sorted(int(r["seed"]) for r in recs),
            epsilon=max(eps) if eps else None, delta=recs[0]["privacy"].get("delta"),
            trainable=statistics.fmean(r["params"]["trainable"] for r in recs),
            total=statistics.fmean(r["params"]["total"] for r in recs),
            train_s=statistics.fmean(r["timing"]["train_s"] for r in recs),
            step_s=statistics.fmean(step_s) if step_s else None,
            peak_rss_mb=statistics.fmean(r["memory"]["peak_rss_mb"] for r in recs),
            latency_speedup=statistics.fmean(speed) if speed else None, audit_lower=max(audits) if audits else None,
            audit_uninformative=bool(audited) and not audits, tuning=tuning_label(recs[0])))
    _rank(rows)
    inf = float("inf")
    rows.sort(key=lambda r: (r.task, r.target_epsilon if r.target_epsilon is not None else inf,
                             r.rank or inf, r.model, r.method))
    return rows


def _rank(rows: list[Row]) -> None:
    """Rank 1 = best mean within each (task, ε, sparsity); rows without a value are unranked."""
    buckets: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.mean is not None:
            buckets.setdefault((r.task, r.target_epsilon, r.sparsity), []).append(r)
    for bucket in buckets.values():
        bucket.sort(key=lambda r: r.mean if lower_is_better(r.metric) else -r.mean)
        for i, r in enumerate(bucket, 1):
            r.rank = i
