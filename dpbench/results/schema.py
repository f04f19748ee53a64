"""The run record written to ``results.json`` (the results contract other tools read).

Methods add sections (``compression``, ``audit``, ``generation``...) through ``extra``; the fields
below are never renamed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_RUNNING = "running"
STATUS_STOPPED = "stopped"  # ended by a signal (dpbench.stopping)


@dataclass
class PrivacyRecord:
    epsilon: float | None                 # the accountant's upper bound; None for non-private runs
    target_epsilon: float | None
    delta: float | None
    accountant: str | None                # e.g. "prv"
    clip_norm: float | None
    stages: list[dict[str, Any]] = field(default_factory=list)  # [{name, noise_multiplier, sample_rate, steps}]
    epsilon_estimate: float | None = None
    epsilon_lower: float | None = None
    epsilon_rdp: float | None = None      # RDP cross-check, same mechanism and delta


@dataclass
class RunRecord:
    status: str
    task: str
    model: str
    method: str
    seed: int
    config: dict[str, Any]
    metrics: dict[str, float]
    privacy: PrivacyRecord
    params: dict[str, int]                # {trainable, total}
    timing: dict[str, float]              # {train_s, steps, ...}
    memory: dict[str, float]              # {peak_rss_mb}
    versions: dict[str, str] = field(default_factory=dict)
    git: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)  # {cpu, logical_cpus, torch_threads, cuda}: timings' context
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        if d["error"] is None:
            d.pop("error")
        d.update(extra)
        return d
