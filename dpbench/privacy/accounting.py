"""Privacy accounting for DP-SGD-style training: PRV bounds, an RDP cross-check, and noise calibration.

Every DP mechanism dpbench runs is a :class:`Stage`: a Poisson-subsampled Gaussian mechanism (each example is in a
batch independently with probability ``sample_rate``; the clipped gradient sum gets N(0, (sigma * C)^2) noise) composed
with itself ``steps`` times. A run is a sequence of stages (e.g. a DP teacher, then a DP student on the same data);
stages compose, so the reported epsilon is that of the whole sequence.

Epsilon comes from the PRV accountant (Gopi, Lee, Wutschitz, NeurIPS 2021, package ``prv-accountant``), which
returns ``[lower, upper]`` bounds on the optimal epsilon of the composition. dpbench always *claims* ``upper``.

Numerical settings (documented in results next to delta):
  * ``eps_error = 0.01`` (``EPS_ERROR``): width of the PRV error band; upper - lower is about 2 * eps_error.
  * ``delta_error = delta / 1000`` (``DELTA_ERROR_FRACTION``).

How this differs from calling ``PRVAccountant`` directly (the steps of ``PRVAccountant.__init__`` are redone here with
the library's own Domain, CellCentred discretiser, Heterogeneous composer and bound computation; three inputs change):
  * Truncation domain: the library's ``compute_safe_domain_size`` formula from a vectorised RDP bound at integer
    orders 2..64 (any order gives a valid bound; a little wider than the library's when the best order is
    fractional), rounded up to an FFT-friendly size. Only saves time.
  * The CDF is evaluated only on the PRV's support and once per grid edge (:class:`_GridPSGM`). Same numbers, faster.
  * The mean of the truncated PRV, used by the discretiser to centre the grid, is computed by a 1-D Gaussian
    quadrature over the mechanism's output (:class:`_TruncatedPSGM`). The library integrates the CDF with ``quad``,
    which we measured 4e-4 off at q = 0.111, sigma = 1 (it then refuses with "Discrete mean differs from continuous
    mean significantly", for most sample rates >~ 0.1; an error it does not catch shifts epsilon by ~steps x error).

This module imports numpy, scipy and prv-accountant only; opacus (which imports torch) is imported lazily for the RDP
cross-check.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
from prv_accountant import PoissonSubsampledGaussianMechanism
from prv_accountant.composers import Heterogeneous
from prv_accountant.discretisers import CellCentred
from prv_accountant.domain import Domain
from prv_accountant.privacy_random_variables import PrivacyRandomVariableTruncated
from scipy import integrate
from scipy.fft import next_fast_len
from scipy.special import gammaln, logsumexp

from dpbench.errors import PrivacyError

EPS_ERROR = 0.01
DELTA_ERROR_FRACTION = 1e-3
# Orders of opacus' RDPAccountant (DEFAULT_ALPHAS), used for the RDP cross-check.
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
_INT_ORDERS = np.arange(2, 65, dtype=float)
# Calibration searches on a 10x coarser PRV mesh (epsilon moves by <~1e-3), then finishes on the reported bound.
_SEARCH_MESH_EPS_ERROR = 0.1
_SIGMA_RANGE = (1e-2, 1e4)
_MAX_GRID_POINTS = 5_000_000  # 80 MB per long-double array; more happens only for epsilons in the tens or above


# --------------------------------------------------------------------------------------------------------------------
# Data types and validation
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One DP mechanism run: Poisson-subsampled Gaussian with ``noise_multiplier``, self-composed ``steps`` times.

    ``noise_multiplier = inf`` or ``steps = 0`` means the stage releases nothing and is skipped by the accountant.
    """

    name: str
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma = self.noise_multiplier
        if not (isinstance(sigma, numbers.Real) and sigma > 0):  # NaN fails too
            raise PrivacyError(f"stage '{self.name}': noise_multiplier must be > 0 (got {sigma})")
        _check_sample_rate(self.sample_rate, f"stage '{self.name}': sample_rate")
        _check_steps(self.steps, f"stage '{self.name}': steps")
        for field, kind in (("noise_multiplier", float), ("sample_rate", float), ("steps", int)):
            object.__setattr__(self, field, kind(getattr(self, field)))  # plain Python numbers (JSON, hashing)

    def to_dict(self) -> dict:
        """Plain dict (``name``, ``noise_multiplier``, ``sample_rate``, ``steps``) for results and checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Stage:
        """Inverse of :meth:`to_dict`."""
        return cls(name=str(d["name"]), noise_multiplier=float(d["noise_multiplier"]),
                   sample_rate=float(d["sample_rate"]), steps=int(d["steps"]))

    @property
    def active(self) -> bool:
        """Whether the stage releases anything (finite noise and at least one step)."""
        return self.steps > 0 and math.isfinite(self.noise_multiplier)


class _AccountantFailure(PrivacyError):
    """The PRV accountant cannot handle these stages (grid too large or numerically unstable; epsilon in the tens+)."""


@dataclass(frozen=True)
class EpsilonReport:
    """PRV bounds ``lower <= estimate <= upper`` on epsilon at a fixed delta, and the RDP epsilon for comparison."""

    lower: float
    estimate: float
    upper: float
    rdp: float | None = None


def default_delta(n: int) -> float:
    """dpbench's delta convention: ``1 / (2n)`` for a private dataset of ``n`` examples (FastDP's default).

    Other libraries use ``1/n`` or ``n^-1.1``; results always record the delta actually used.
    """
    if n < 1:
        raise PrivacyError(f"dataset size must be >= 1 to choose delta (got {n})")
    return 1.0 / (2 * n)


def _check_sample_rate(q: float, what: str = "sample_rate") -> None:
    if not (isinstance(q, numbers.Real) and 0 < q <= 1):
        raise PrivacyError(f"{what} must be in (0, 1] (got {q}); use batch_size / dataset_size")


def _check_steps(steps: int, what: str = "steps") -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise PrivacyError(f"{what} must be an integer >= 0 (got {steps!r})")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, numbers.Real) and 0 < delta < 1):
        raise PrivacyError(f"privacy.delta must be in (0, 1) (got {delta}); the convention is 1/(2n)")


def _check_epsilon(eps: float) -> None:
    if not (isinstance(eps, numbers.Real) and eps > 0):
        raise PrivacyError(f"privacy.epsilon must be > 0 (got {eps}); set e.g. privacy.epsilon=8")


def _active(stages: Sequence[Stage]) -> list[Stage]:
    return [s for s in stages if s.active]


# --------------------------------------------------------------------------------------------------------------------
# RDP (cross-check, domain size, starting point of the calibration search)
# --------------------------------------------------------------------------------------------------------------------
def rdp_epsilon(stages: Sequence[Stage], delta: float) -> float:
    """Epsilon from RDP composition (opacus' analysis, its default orders): per-stage RDP curves are summed, then
    converted with Balle et al. (2020). A valid but looser bound: typically ~5-10% above the PRV epsilon."""
    _check_delta(delta)
    active = _active(stages)
    if not active:
        return 0.0
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent  # lazy: opacus imports torch

    rdp = sum(compute_rdp(q=s.sample_rate, noise_multiplier=s.noise_multiplier, steps=s.steps, orders=RDP_ORDERS)
              for s in active)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha" is expected for tiny epsilons
        eps, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def _rdp_per_step(q: float, sigma: float) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at integer orders 2..64 (Mironov et al. 2019), vectorised."""
    if q == 1.0:
        return _INT_ORDERS / (2 * sigma**2)
    a = _INT_ORDERS[:, None]
    i = np.arange(_INT_ORDERS[-1] + 1)[None, :]
    log_terms = (gammaln(a + 1) - gammaln(i + 1) - gammaln(np.maximum(a - i, 0) + 1)
                 + i * math.log(q) + (a - i) * math.log1p(-q) + (i * i - i) / (2 * sigma**2))
    log_terms = np.where(i <= a, log_terms, -np.inf)
    return logsumexp(log_terms, axis=1) / (_INT_ORDERS - 1)


def _rdp_to_eps(rdp: np.ndarray, delta: float) -> float:
    """RDP -> (eps, delta), same conversion as prv-accountant's RDP accountant."""
    a = _INT_ORDERS
    return float(np.nanmin(rdp - np.log(delta * a) / (a - 1) + np.log1p(-1 / a)))


def _fast_rdp_epsilon(stages: Sequence[Stage], delta: float) -> float:
    return _rdp_to_eps(sum(_rdp_per_step(s.sample_rate, s.noise_multiplier) * s.steps for s in stages), delta)


def _domain(stages: Sequence[Stage], eps_error: float, delta_error: float) -> tuple[float, float, int]:
    """Half-width L of the PRV domain, mesh size and number of grid points.

    L is prv_accountant's ``compute_safe_domain_size`` (remark 5.6 of Gopi et al.), then enlarged (never shrunk) by
    < 0.1% so the grid has an FFT-friendly (5-smooth) number of points; the mesh is PRVAccountant's.
    """
    total = sum(s.steps for s in stages)
    L = _fast_rdp_epsilon(stages, delta_error / 4)
    for s in stages:
        L = max(L, _rdp_to_eps(_rdp_per_step(s.sample_rate, s.noise_multiplier), delta_error / 8 / total))
    L = max(L, eps_error) + 3
    dt = eps_error / math.sqrt(total / 2 * math.log(12 / delta_error))
    if L / dt > _MAX_GRID_POINTS:
        return L, dt, 2 * math.ceil(L / dt) + 2
    k = 2 * next_fast_len(math.ceil(L / dt) + 1, real=True) // 2 - 1  # Domain.create_aligned: [-k dt, (k+1) dt]
    return max(L, (k - 0.5) * dt), dt, 2 * k + 2


# --------------------------------------------------------------------------------------------------------------------
# PRV accounting
# --------------------------------------------------------------------------------------------------------------------
class _GridPSGM(PoissonSubsampledGaussianMechanism):
    """The library's PRV, evaluated faster with the same formulas.

    * ``cdf`` runs the library's formula only where the PRV has support (t > log(1 - q)); elsewhere it is 0, as in the
      library, without the (slow, long-double NaN) arithmetic the library does there.
    * ``probability`` evaluates the CDF once per cell edge when the cells tile a grid (as in the accountant's
      discretisation) instead of twice; same numbers up to rounding of the edges.
    """

    def cdf(self, t):
        if np.ndim(t) == 0:
            return super().cdf(t)
        t = np.asarray(t)
        support = t > (np.log(1 - self.p) if self.p < 1 else -np.inf)
        out = np.zeros(t.shape, dtype=np.result_type(t, self.p))
        out[support] = super().cdf(t[support])
        return out

    def probability(self, a, b):
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim == 1 and a.shape == b.shape and a.size > 1:
            width = b[0] - a[0]
            if width > 0 and np.abs(a[1:] - b[:-1]).max() <= 1e-9 * width:
                return np.diff(self.cdf(np.append(a, b[-1])))
        return super().probability(a, b)


class _TruncatedPSGM(PrivacyRandomVariableTruncated):
    """The library's truncated PRV with an accurate mean (see the module docstring)."""

    def mean(self) -> float:
        p, sigma = float(self.prv.p), float(self.prv.sigma)
        return _psgm_partial_mean(p, sigma, float(self.t_min), float(self.t_max)) / float(self.remaining_mass)


def _psgm_partial_mean(p: float, sigma: float, t_min: float, t_max: float) -> float:
    """E[Y; t_min <= Y <= t_max] for the privacy loss Y = log(1 - p + p exp((2o - 1) / (2 sigma^2))) of the
    Poisson-subsampled Gaussian, o ~ p N(1, sigma^2) + (1 - p) N(0, sigma^2): Y is increasing in o, so this is a
    Gaussian integral of a smooth function over an interval of o (quadrature to ~1e-12)."""
    s2 = sigma**2

    def o_of(t: float) -> float:  # inverse of Y(o): o = sigma^2 log((e^t - 1 + p) / p) + 1/2
        if p < 1 and t <= math.log1p(-p):
            return -math.inf
        z = t + math.log1p(-(1 - p) * math.exp(-t)) if t > 0 else math.log(math.expm1(t) + p)
        return s2 * (z - math.log(p)) + 0.5

    def loss(o: float) -> float:
        x = (2 * o - 1) / (2 * s2)
        return x if p == 1 else float(np.logaddexp(math.log1p(-p), math.log(p) + x))

    o_lo, o_hi, total = o_of(t_min), o_of(t_max), 0.0
    for mu, weight in ((0.0, 1 - p), (1.0, p)):
        lo, hi = max((o_lo - mu) / sigma, -40.0), min((o_hi - mu) / sigma, 40.0)
        if weight > 0 and lo < hi:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", integrate.IntegrationWarning)  # roundoff-limited at ~1e-14: fine
                value, _ = integrate.quad(lambda u: loss(mu + sigma * u) * math.exp(-u * u / 2), lo, hi,
                                          points=[0.0] if lo < 0 < hi else None, epsabs=1e-14, epsrel=1e-12,
                                          limit=500)
            total += weight * value / math.sqrt(2 * math.pi)
    return total


def _prv_bounds(active: Sequence[Stage], delta: float, eps_error: float,
                mesh_eps_error: float | None = None) -> tuple[float, float, float]:
    """(lower, estimate, upper) of the composition of ``active`` stages.

    With ``mesh_eps_error=None`` these are ``PRVAccountant.compute_epsilon``'s rigorous bounds. A coarser
    ``mesh_eps_error`` gives a fast approximation of the same numbers (not a bound), used only to search.
    """
    if not active:
        return 0.0, 0.0, 0.0
    mesh_eps_error = mesh_eps_error or eps_error
    delta_error = delta * DELTA_ERROR_FRACTION
    prvs = [_GridPSGM(sampling_probability=s.sample_rate, noise_multiplier=s.noise_multiplier) for s in active]
    steps = [int(s.steps) for s in active]
    L, dt, n_points = _domain(active, mesh_eps_error, delta_error)
    if n_points > _MAX_GRID_POINTS:
        raise _AccountantFailure(f"epsilon is too large to account (PRV grid of {n_points:.2g} points, domain {L:.0f});"
                                 f" use more noise, fewer steps, a smaller sample rate or a larger eps_error")
    with np.errstate(all="ignore"):
        try:  # = PRVAccountant(prvs, mesh_eps_error, delta_error, steps, eps_max=L).compute_epsilon(delta, steps)
            domain = Domain.create_aligned(-L, L, dt)
            dprvs = [CellCentred().discretise(_TruncatedPSGM(prv, domain.t_min(), domain.t_max()), domain)
                     for prv in prvs]
            composed = Heterogeneous(dprvs).compute_composition(steps)
            lower, est, upper = composed.compute_epsilon(delta, delta_error, eps_error)
        except ValueError as e:
            if "Floating point" not in str(e):
                raise
            raise PrivacyError(f"delta={delta} is too small for the PRV accountant; use a larger delta") from e
        except RuntimeError as e:
            raise _AccountantFailure(f"PRV accountant failed ({e}); epsilon is probably far above any useful value, "
                                     f"use more noise or fewer steps") from e
    return max(float(lower), 0.0), max(float(est), 0.0), max(float(upper), 0.0)


def compute_epsilon(stages: Sequence[Stage], delta: float, eps_error: float = EPS_ERROR) -> EpsilonReport:
    """Epsilon of the composition of ``stages`` at ``delta``: PRV bounds (claim ``upper``) and the RDP epsilon.

    ``upper - lower`` is about ``2 * eps_error``; cost grows as ``1 / eps_error``. Skipped stages (``steps == 0`` or
    infinite noise) contribute nothing; no active stage gives epsilon 0.
    """
    _check_delta(delta)
    if not eps_error > 0:
        raise PrivacyError(f"eps_error must be > 0 (got {eps_error})")
    lower, est, upper = _prv_bounds(_active(stages), delta, eps_error)
    return EpsilonReport(lower=lower, estimate=est, upper=upper, rdp=rdp_epsilon(stages, delta))


def epsilon_upper(stages: Sequence[Stage], delta: float) -> float:
    """``compute_epsilon(stages, delta).upper`` (same computation, without the RDP cross-check)."""
    _check_delta(delta)
    return _prv_bounds(_active(stages), delta, EPS_ERROR)[2]


# --------------------------------------------------------------------------------------------------------------------
# Noise calibration
# --------------------------------------------------------------------------------------------------------------------
def calibrate_noise(target_epsilon: float, sample_rate: float, steps: int, delta: float, *, rel_tol: float = 1e-3,
                    prior_stages: Sequence[Stage] = ()) -> float:
    """Smallest noise multiplier (to relative precision ``rel_tol``) whose PRV upper bound for ``prior_stages`` plus
    the new stage (``sample_rate``, ``steps``) is <= ``target_epsilon``.

    Search in log-sigma / log-epsilon: RDP gives a start and a slope, a coarse-mesh PRV approximation is bracketed and
    bisected (regula falsi), then Newton steps on :func:`epsilon_upper` (the reported bound) finish. Only sigmas whose
    reported bound was computed and found <= target are ever returned.
    """
    _check_epsilon(target_epsilon)
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    if steps == 0:
        raise PrivacyError("calibrate_noise needs steps >= 1 (got 0); a stage without steps needs no noise")
    if not 0 < rel_tol <= 0.1:
        raise PrivacyError(f"rel_tol must be in (0, 0.1] (got {rel_tol})")
    ever_sampled = 1.0 if sample_rate == 1 else -math.expm1(steps * math.log1p(-sample_rate))
    if ever_sampled <= delta:
        raise PrivacyError(f"delta={delta} is at least the chance that an example is ever sampled, so any noise meets "
                           f"the target; use a smaller delta (the convention is 1/(2n))")
    prior = _active(prior_stages)

    def stages(sigma: float) -> list[Stage]:
        return [*prior, Stage("calibrated", sigma, sample_rate, int(steps))]

    if prior:
        spent = _prv_bounds(prior, delta, EPS_ERROR, _SEARCH_MESH_EPS_ERROR)[2]
        if spent >= target_epsilon:
            raise _unreachable(target_epsilon, f"prior stages alone already spend epsilon~{spent:.3f}")

    def log_excess(x: float, mesh_eps_error: float | None) -> float:
        """log(upper bound / target) at sigma = e^x; decreasing in x, <= 0 means feasible."""
        try:
            eps = _prv_bounds(stages(math.exp(x)), delta, EPS_ERROR, mesh_eps_error)[2]
        except (ArithmeticError, RuntimeError, ValueError, _AccountantFailure):
            return math.inf  # the accountant fails only where epsilon is huge
        return math.log(eps / target_epsilon) if eps > 0 else -math.inf

    def approx(x: float) -> float:
        return log_excess(x, _SEARCH_MESH_EPS_ERROR)

    tol = math.log1p(rel_tol) / 2
    x0 = math.log(_rdp_calibrate(stages, delta, target_epsilon))
    slope = _rdp_slope(stages, delta, x0)
    a, fa, b, fb = _bracket(approx, x0, slope, target_epsilon)
    a, fa, b, fb = _regula_falsi(approx, a, fa, b, fb, tol)
    secant = (fa - fb) / (b - a)
    slope = secant if math.isfinite(secant) and secant > 0 else slope
    x = _newton_feasible(lambda x: log_excess(x, None), b, slope, tol)
    if x is None:
        raise _unreachable(target_epsilon, "no noise multiplier found whose reported bound meets it")
    return math.exp(x)


def _unreachable(target: float, why: str) -> PrivacyError:
    return PrivacyError(f"target epsilon {target} is unreachable ({why}); raise privacy.epsilon or give earlier "
                        f"stages fewer steps / more noise")


def _rdp_calibrate(stages: Callable[[float], list[Stage]], delta: float, target: float) -> float:
    """Sigma at which the (fast, integer-order) RDP epsilon meets ``target``: the search's starting point."""
    lo, hi = _SIGMA_RANGE
    if _fast_rdp_epsilon(stages(hi), delta) > target:
        return hi
    for _ in range(40):  # bisection in log-sigma to ~1e-4 relative; ~0.3 ms per step
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _fast_rdp_epsilon(stages(mid), delta) > target else (lo, mid)
    return hi


def _rdp_slope(stages: Callable[[float], list[Stage]], delta: float, x: float, h: float = 0.01) -> float:
    """-d log(eps) / d log(sigma) of the RDP epsilon at sigma = e^x (PRV epsilons have about the same slope)."""
    e0, e1 = (_fast_rdp_epsilon(stages(math.exp(x + d)), delta) for d in (0.0, h))
    slope = math.log(e0 / e1) / h if e0 > 0 and e1 > 0 else 1.0
    return min(max(slope, 0.5), 20.0)


def _bracket(f: Callable[[float], float], x0: float, slope: float,
             target: float) -> tuple[float, float, float, float]:
    """Find a < b with f(a) > 0 >= f(b): Newton steps from x0 (overshooting by 10%), the slope re-estimated by secant
    after each step that did not flip the sign (first step at most 1, then at most quadrupling)."""
    x_min, x_max = (math.log(s) for s in _SIGMA_RANGE)
    x, fx = x0, f(x0)
    step = 0.25
    while True:
        new_step = 1.1 * fx / slope if math.isfinite(fx) else 0.5
        new_step = math.copysign(min(max(abs(new_step), 0.005), 4 * abs(step)), 1.0 if fx > 0 else -1.0)
        x_new = min(max(x + new_step, x_min), x_max)
        if x_new == x:
            raise _unreachable(target, f"needs a noise multiplier outside {_SIGMA_RANGE}")
        f_new = f(x_new)
        if (f_new > 0) != (fx > 0):
            return (x_new, f_new, x, fx) if f_new > 0 else (x, fx, x_new, f_new)
        secant = (fx - f_new) / (x_new - x)
        if math.isfinite(secant) and 0.1 * slope < secant < 10 * slope:
            slope = secant
        x, fx, step = x_new, f_new, new_step


def _regula_falsi(f: Callable[[float], float], a: float, fa: float, b: float, fb: float,
                  tol: float) -> tuple[float, float, float, float]:
    """Shrink the bracket (f(a) > 0 >= f(b)) below ``tol`` with the Illinois variant of regula falsi; every new point
    stays ``tol/2`` inside the bracket so the last step closes it."""
    kept = 0  # +1: a kept last time, -1: b kept last time
    wa, wb = fa, fb  # Illinois-weighted values used for interpolation
    while b - a > tol:
        finite = math.isfinite(wa) and math.isfinite(wb)
        c = b - wb * (b - a) / (wb - wa) if finite else (a + b) / 2
        c = min(max(c, a + tol / 2), b - tol / 2)
        fc = f(c)
        if fc > 0:
            a, fa, wa = c, fc, fc
            wb = wb / 2 if kept == -1 else wb
            kept = -1
        else:
            b, fb, wb = c, fc, fc
            wa = wa / 2 if kept == 1 else wa
            kept = 1
    return a, fa, b, fb


def _newton_feasible(g: Callable[[float], float], x: float, slope: float, tol: float,
                     max_iter: int = 12) -> float | None:
    """Smallest x found with g(x) <= 0, by secant steps (initial slope ``-slope``) biased ``tol/4`` to the feasible
    side.

    Stops at a feasible x within ``tol`` of the root (g(x) >= -slope * tol), or when the next step would not improve on
    the best feasible x. Returns None if no feasible x was seen.
    """
    best = prev = None
    for _ in range(max_iter):
        r = g(x)
        if prev is not None and math.isfinite(r):
            secant = (prev[1] - r) / (x - prev[0])
            slope = secant if math.isfinite(secant) and secant > 0 else slope
        if r <= 0:
            best = x if best is None else min(best, x)
            if -r <= slope * tol:
                break
        x_next = x + (r / slope if math.isfinite(r) else 0.1) + tol / 4
        if best is not None and x_next >= best:
            break
        prev, x = (x, r), x_next
    return best
