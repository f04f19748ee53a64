"""One-run privacy audit (Steinke, Nasr & Jagielski, NeurIPS 2023) of dpbench's DP step.

The audit gives an empirical *lower* bound on ε that holds with a stated confidence. A lower bound above
the accountant's upper bound means that the implementation does not do what the accounting assumes.

**Game.** There are m canaries, each included in the training set independently with probability ½. One
training run follows. Each canary then gets a score. The auditor guesses "in" for the k₊ highest scores
and "out" for the k₋ lowest, and abstains on the rest. If the mechanism is (ε, δ)-DP, the number V of
correct guesses among the r = k₊ + k₋ made satisfies

    P[V ≥ v] ≤ P[Binomial(r, p_ε) ≥ v] + 2mδ · max_{1≤i≤v} P[v − i ≤ Binomial(r, p_ε) < v] / i,

with p_ε = e^ε/(1 + e^ε) (the paper's Theorem 3.3 and its numerical form). The reported bound is the
largest ε whose p-value is still below 1 − confidence. k₊ and k₋ are fixed before the run, so no
selection over thresholds inflates the bound.

**Power.** With r guesses the strongest evidence is v = r correct; its bound,
:func:`max_auditable_epsilon`, is the largest ε the audit can ever contradict at those settings (4.17
for the default 1,000 canaries and 200 guesses at δ = 1e-5). A claim at or above it cannot be
contradicted, so the audit is reported as *uninformative* for it (``informative: false``) and the
leaderboard says so instead of showing a bound. :func:`settings_for` gives the canaries and guesses that
make a claim auditable (about 23,000 canaries and 18,000 guesses for ε = 8 at δ = 1e-5; the cost grows
linearly with the canaries: one linear model with a coordinate per canary).

**White-box gradient canaries.** The step audited is the real one: the engine's per-sample clipping, the
private optimizer's noise and the Poisson sampler. They run with the recorded σ, q, steps, clipping norm
and engine, on a linear model whose canary i has a gradient of norm ``canary_norm`` (≫ C) along its own
coordinate. Filler examples fill the dataset to the recorded sampling rate, and their gradients lie on
other coordinates. The score of canary i is the total movement of its coordinate. This is the strongest
attacker the game allows for an additive mechanism, and it costs seconds. It audits the mechanism, not
the language model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import stats

from dpbench.privacy.engine import make_engine
from dpbench.privacy.optimizer import PrivateOptimizer
from dpbench.privacy.sampling import PoissonBatchSampler

METHOD = "one-run audit (Steinke, Nasr & Jagielski 2023), white-box gradient canaries"


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability of ≥ v correct guesses out of r (m canaries) under an (ε, δ)-DP mechanism."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m (got v={v}, r={r}, m={m})")
    p = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, p))  # P[Binomial(r, p) ≥ v]
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[Bin = v−1], P[Bin = v−2], ...
    worst = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1))) if v > 0 else 0.0
    return min(1.0, tail + 2 * m * delta * worst)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε (to 1e-4) such that (ε, δ)-DP is rejected at ``confidence``; 0 if none is."""
    beta = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return math.inf
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < beta else (lo, mid)
    return lo


def max_auditable_epsilon(canaries: int, guesses: int, delta: float, confidence: float = 0.95) -> float:
    """The bound of a perfect audit (every guess correct): no claim at or above it can be contradicted."""
    return epsilon_lower_bound(canaries, guesses, guesses, delta, confidence)


def settings_for(epsilon: float, delta: float, confidence: float = 0.95) -> tuple[int, int] | None:
    """The fewest canaries (from 1,000, by 25% steps; guesses = 0.8·canaries) whose perfect audit exceeds
    ``epsilon``; None when none can (a large δ: the 2mδ term grows with the canaries and caps the bound)."""
    canaries, best = 1000, -math.inf
    while True:
        ceiling = max_auditable_epsilon(canaries, int(0.8 * canaries), delta, confidence)
        if ceiling > epsilon:
            return canaries, int(0.8 * canaries)
        if ceiling <= best or canaries > 10**6:
            return None
        best, canaries = ceiling, int(canaries * 1.25)


@dataclass
class AuditResult:
    epsilon_lower_bound: float
    confidence: float
    delta: float
    canaries: int
    guesses: int
    correct: int
    max_auditable_epsilon: float = math.nan
    method: str = METHOD

    def to_dict(self) -> dict:
        return asdict(self)


def audit_dp_step(noise_multiplier: float, sample_rate: float, steps: int, clip_norm: float, delta: float, *,
                  engine: str = "bk", canaries: int = 1000, guesses: int = 200, canary_norm: float = 100.0,
                  filler_dims: int = 16, confidence: float = 0.95, seed: int = 0) -> AuditResult:
    """Run the DP step (``engine``, :class:`PrivateOptimizer`, Poisson sampling) once with canaries and
    return the empirical ε lower bound (see the module docstring)."""
    if not 0 < guesses <= canaries:
        raise ValueError(f"need 0 < guesses <= canaries (got {guesses}, {canaries})")
    gen = torch.Generator().manual_seed(seed)
    included = torch.rand(canaries, generator=gen) < 0.5
    members = included.nonzero().flatten()
    n_in = len(members)
    n = 2 * max(n_in, 1)  # as many filler examples as included canaries; q is what the accountant needs
    dims = canaries + filler_dims
    x = torch.zeros(n, dims, dtype=torch.float64)
    x[torch.arange(n_in), members] = canary_norm  # canary i's gradient lies on coordinate i only
    x[n_in:, canaries:] = torch.randn(n - n_in, filler_dims, generator=gen, dtype=torch.float64)
    model = torch.nn.Linear(dims, 1, bias=False).double()
    torch.nn.init.zeros_(model.weight)
    eng = make_engine(engine, model, clip_norm)
    opt = PrivateOptimizer(torch.optim.SGD(eng.params, lr=1.0), eng, noise_multiplier=noise_multiplier,
                           expected_batch_size=sample_rate * n, generator=torch.Generator().manual_seed(seed + 1),
                           max_steps=steps)
    for batch in PoissonBatchSampler(n, sample_rate, steps, seed=seed + 2):
        if batch:
            eng.accumulate(-eng.module(x[batch]).squeeze(1))  # per-sample loss −w·x: gradient −x
        opt.step()
    eng.close()
    scores = model.weight.detach()[0, :canaries]  # an included canary pushes its coordinate up
    order = torch.argsort(scores, descending=True)
    k_in = guesses // 2
    k_out = guesses - k_in
    correct = int(included[order[:k_in]].sum()) + int((~included[order[canaries - k_out:]]).sum())
    eps_lb = epsilon_lower_bound(canaries, guesses, correct, delta, confidence)
    return AuditResult(eps_lb, confidence, delta, canaries, guesses, correct,
                       max_auditable_epsilon(canaries, guesses, delta, confidence))


def audit_privacy(privacy: dict, engine: str = "bk", **settings) -> dict:
    """Audit each DP stage of a results record's ``privacy`` section; the run's bound is the largest."""
    stages = []
    for s in privacy.get("stages") or []:
        result = audit_dp_step(float(s["noise_multiplier"]), float(s["sample_rate"]), int(s["steps"]),
                               float(privacy["clip_norm"]), float(privacy["delta"]), engine=engine, **settings)
        stages.append({"name": s["name"], **result.to_dict()})
    bound = max((s["epsilon_lower_bound"] for s in stages), default=0.0)
    ceiling = min((s["max_auditable_epsilon"] for s in stages), default=math.inf)
    claimed = privacy.get("epsilon")
    return {"epsilon_lower_bound": bound, "claimed_epsilon": claimed, "method": METHOD, "stages": stages,
            "consistent": claimed is None or bound <= claimed, "max_auditable_epsilon": ceiling,
            "informative": claimed is None or claimed < ceiling}


def main(argv: list[str] | None = None) -> None:
    """``dpbench-audit RESULTS.json``: audit the mechanism a run recorded; exit 1 if the audit's lower
    bound exceeds the ε the run claims."""
    import argparse
    import sys
    from pathlib import Path

    from dpbench.results.io import read_json

    parser = argparse.ArgumentParser(prog="dpbench-audit", description=main.__doc__)
    parser.add_argument("results", type=Path, help="a run's results.json")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--guesses", type=int, default=200)
    parser.add_argument("--confidence", type=float, default=0.95)
    args = parser.parse_args(argv)
    try:
        record = read_json(args.results)
        privacy = record["privacy"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"dpbench-audit: error: cannot read a run record from '{args.results}' ({e}); pass a results.json",
              file=sys.stderr)
        raise SystemExit(2)
    if not privacy.get("stages"):
        print(f"dpbench-audit: error: '{args.results}' records no DP stage (a non-private run)", file=sys.stderr)
        raise SystemExit(2)
    engine = ((record.get("config") or {}).get("privacy") or {}).get("engine", "bk")
    audit = audit_privacy(privacy, engine=engine, canaries=args.canaries, guesses=args.guesses,
                          confidence=args.confidence)
    for s in audit["stages"]:
        print(f"stage {s['name']}: {s['correct']}/{s['guesses']} correct guesses on {s['canaries']} canaries → "
              f"ε ≥ {s['epsilon_lower_bound']:.3f} at {s['confidence']:.0%} confidence")
    verdict = "consistent with" if audit["consistent"] else "CONTRADICTS"
    print(f"audit lower bound {audit['epsilon_lower_bound']:.3f} {verdict} the claimed ε={audit['claimed_epsilon']}")
    if not audit["informative"]:
        better = settings_for(float(audit["claimed_epsilon"]), float(privacy["delta"]), args.confidence)
        hint = (f"--canaries {better[0]} --guesses {better[1]} could contradict this one" if better else
                f"no number of canaries can at δ = {float(privacy['delta']):.3g} (its 2mδ term grows with them)")
        print(f"uninformative: at these settings no claim above ε = {audit['max_auditable_epsilon']:.2f} can be "
              f"contradicted; {hint}")
    raise SystemExit(0 if audit["consistent"] else 1)


if __name__ == "__main__":
    main()
