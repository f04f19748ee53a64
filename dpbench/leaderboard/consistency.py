"""Cross-checks of a record's logged mechanism against its own config and data sizes.

Recomputing ε from the logged stages proves only that the claim follows from them; a record whose
logged sample rate or step count was lowered would still pass. So the leaderboard also checks that
what was logged is what the config plans for the recorded training set (``data.train_examples``, n):

* every private stage samples at q = ``privacy.batch_size`` / n (all private stages read the same data);
* the private stages' steps add up to the planned total, ``trainer.max_steps`` or ⌈epochs·n/B⌉ (multi-stage
  methods split that total over their stages), and to no more than ``timing.steps`` (which also counts
  non-private stages, e.g. DistilDP's student on synthetic text);
* δ is ``privacy.delta``, or 1/(2n) when that is null.
"""
from __future__ import annotations

import math
from typing import Any

TOL = 1e-9  # relative: the values are computed the same way, so only float noise may differ


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=TOL, abs_tol=0.0)


def consistency_errors(record: dict[str, Any]) -> list[str]:
    """Reasons the logged privacy stages disagree with the record's config and data (empty if none)."""
    priv, cfg = record["privacy"], record.get("config") or {}
    stages = priv["stages"]
    if not stages:
        return []
    p, trainer = cfg.get("privacy") or {}, cfg.get("trainer") or {}
    n = (record.get("data") or {}).get("train_examples")
    if not isinstance(n, int) or n < 1 or not isinstance(p.get("batch_size"), int):
        return ["the record lacks data.train_examples or config.privacy.batch_size, so its sampling rate "
                "cannot be checked"]
    b, out = p["batch_size"], []
    for s in stages:
        if not _close(s["sample_rate"], b / n):
            out.append(f"stage '{s['name']}' logs sample rate {s['sample_rate']:.6g}, but privacy.batch_size / "
                       f"train_examples = {b}/{n} = {b / n:.6g}")
    steps = sum(int(s["steps"]) for s in stages)
    planned = trainer.get("max_steps") or (math.ceil(float(p["epochs"]) * n / b) if p.get("epochs") else None)
    if planned is not None and steps != int(planned):
        out.append(f"the private stages log {steps} steps in all, but the config plans {planned} "
                   f"(trainer.max_steps or ⌈privacy.epochs·n/B⌉)")
    if steps > int(record["timing"]["steps"]):
        out.append(f"the private stages log {steps} steps, more than timing.steps = {record['timing']['steps']}")
    delta = p.get("delta") if p.get("delta") is not None else 1 / (2 * n)
    if priv["delta"] is not None and not _close(priv["delta"], delta):
        out.append(f"δ = {priv['delta']:.6g} is logged, but the config gives {delta:.6g} "
                   "(privacy.delta, or 1/(2n) when null)")
    return out
