"""When to stop timing a cell: the interval of the median step time is tight, or a cap is reached.

A fixed handful of timed steps does not repeat: on 2x H200 three launches of 4 timed steps of a 1B full
fine-tune differed by 13-23 %, of 40 steps by 1-5 %. So a cell keeps stepping until the confidence
interval of its MEDIAN step time is within ``ci_target`` of the median (both sides), after at least
``min_steps`` timed steps and ``min_timed_s`` timed seconds, or until ``max_steps`` timed steps or
``max_timed_s`` timed seconds.

The interval is distribution-free. For n independent steps, the median lies between the l-th and the
(n+1-l)-th fastest with probability 1 - 2 P(B <= l-1), B ~ Binomial(n, 1/2) the number of steps below the
true median; l is the largest rank that keeps this at or above ``confidence``. Step times are skewed and
have outliers (a collective that waited, an allocator flush), so no normal approximation is assumed.

Steps are not always independent. ZeRO-3's steps on 2x H200 come in episodes (runs of 5-10 fast steps, then
runs of slow ones; results/baselines/README.md): counted as independent, 20 steps of which 15 are fast
give an interval within ±1 % of the fast median, far narrower than the launch's median is known. What the
interval needs is the spread of B, and for a dependent series B is a sum of correlated indicators
I_t = [x_t < median]: Var B = (n/4) tau with tau = 1 + 2 sum_k rho_k, rho_k the autocorrelation of I at lag
k (the definition of an effective sample size: n_eff = n / tau steps whose mean varies as much, as in
TensorFlow Probability's ``tfp.mcmc.effective_sample_size``). So B / n is spread like the share of n_eff
independent steps below the median, and the rule takes the binomial ranks (l', n_eff + 1 - l') of
m = floor(n_eff) independent steps and lays them at the same fractions of the n sorted steps:
l = 1 + floor((l' - 1) n / m). The median's interval stays an order-statistic pair, with no density
estimate and no model of the step times: only the indicator's autocorrelation is estimated, which is what
the median's precision depends on (a slow outlier moves rho of the step times, not of I).

rho_k is estimated from the series (biased estimator, denominator n) and summed over the initial positive
pairs rho_{2m} + rho_{2m+1} (m = 0, 1, ...): the sum stops at the first pair that is not positive, where the
estimates turn to noise; tau is kept within [1, n], so a series that looks independent (or alternating)
gets exactly the former interval. Below 6 effective steps no pair of order statistics reaches 95 %: the
interval is undefined and timing goes on. The estimate has its own noise: on independent steps tau comes out
above 1 about half the time (mean 1.24 at 20 steps, 1.14 at 300), so the interval is never narrower than
before and independent steps stop a little later: the same step at 0.5 % jitter, about 8 % more steps at
1 % and 30 % more at 2 % (tests/worker/test_timing.py measures it).

What it cannot see: an episode longer than every step timed so far. 20 steps inside one fast run have no
visible dependence, and no rule fed only those steps can tell them from a steady cell (the nightly's ZeRO-3
launch that read 7 % below its other nights was such a one, and stops at 20 steps under either interval); nor
a median whose count barely moves, most steps fast with a short slow run. ``min_timed_s`` makes
such a cell time a window long enough to span several episodes (``min_timed_s == max_timed_s``: a fixed
window); 0, the default, leaves the rule as it is.

Pure functions of a series of step times: the worker evaluates them on the slowest rank's series, which
every rank holds after an all-reduce, so that all ranks stop at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.signal import correlate
from scipy.stats import binom

RULE = ("median step time, distribution-free order-statistic interval (binomial) on the effective number of "
        "steps n_eff = n / (1 + 2 sum rho_k), rho_k the autocorrelations of the below-median indicator summed "
        "over initial positive pairs; stop when the interval lies within median x (1 ± ci_target) after at "
        "least min_steps and min_timed_s, or at max_steps / max_timed_s")
# What records written before serial dependence was accounted for say (their steps taken as independent).
RULE_INDEPENDENT = ("median step time, distribution-free order-statistic interval (binomial); stop when the "
                    "interval lies within median x (1 ± ci_target) after at least min_steps and min_timed_s, or "
                    "at max_steps / max_timed_s")
STOP_REASONS = ("converged", "max_steps", "max_timed_s")


@lru_cache(maxsize=4096)
def order_statistic_ranks(n: int, confidence: float) -> tuple[int, int, float] | None:
    """(l, u, coverage): 1-based ranks of the sorted sample bounding the median with probability
    ``coverage`` >= ``confidence``, the tightest symmetric pair; None if even (min, max) falls short."""
    if n < 1:
        return None
    alpha = 1.0 - confidence
    # P(B <= l-1) for l = 1..n//2; the largest l whose two tails together stay within alpha
    tails = 2.0 * binom.cdf(np.arange(n // 2 + 1), n, 0.5)
    ok = np.nonzero(tails[: (n + 1) // 2] <= alpha)[0]  # index k = l - 1, keeping l <= n + 1 - l
    if ok.size == 0:
        return None
    l = int(ok[-1]) + 1
    return l, n + 1 - l, float(1.0 - tails[l - 1])


def autocorrelation(x) -> np.ndarray:
    """rho_0..rho_{n-1} of ``x`` (denominator n at every lag); all 0 past lag 0 for a constant series."""
    d = np.asarray(x, dtype=float) - np.mean(x)
    acov = correlate(d, d, mode="full", method="direct")[len(d) - 1:]
    if acov[0] <= 0:
        return np.r_[1.0, np.zeros(len(d) - 1)]
    return acov / acov[0]


@dataclass(frozen=True)
class Dependence:
    rho1: float  # lag-1 autocorrelation of the step times themselves (descriptive; not what the rule uses)
    tau: float  # 1 + 2 sum rho_k of the below-median indicator, initial positive pairs, within [1, n]
    n_eff: float  # n / tau: independent steps whose median would be as precise


def dependence(times) -> Dependence:
    """How far the steps' order around their median is from independent (see the module docstring)."""
    x = np.asarray(times, dtype=float)
    n = len(x)
    if n < 2:
        return Dependence(0.0, 1.0, float(n))
    rho = autocorrelation(x < np.median(x))
    pairs = rho[: n - n % 2].reshape(-1, 2).sum(axis=1)  # rho_0 + rho_1, rho_2 + rho_3, ...
    stop = int(np.argmax(pairs <= 0)) if np.any(pairs <= 0) else len(pairs)
    tau = float(np.clip(2.0 * pairs[:stop].sum() - 1.0, 1.0, n))
    return Dependence(float(autocorrelation(x)[1]), tau, n / tau)


def effective_ranks(n: int, n_eff: float, confidence: float) -> tuple[int, int, float] | None:
    """Ranks of the n sorted steps at the fractions the binomial ranks of floor(n_eff) independent steps take;
    coverage is theirs. n_eff == n gives ``order_statistic_ranks(n)``."""
    m = int(np.floor(n_eff + 1e-9))
    ranks = order_statistic_ranks(m, confidence) if m <= n else None
    if ranks is None:
        return None
    l_eff, _, coverage = ranks
    l = 1 + ((l_eff - 1) * n) // m  # floor: the wider pair when the fraction falls between two ranks
    return l, n + 1 - l, coverage


@dataclass(frozen=True)
class MedianInterval:
    median: float
    low: float
    high: float
    coverage: float  # the interval's probability of holding the median (>= the confidence asked) at n_eff
    n_eff: float | None = None  # the effective number of steps it was built on (None: taken as independent)

    @property
    def rel_half_width(self) -> float:
        """The larger side of the interval over the median: ±1 % means both ends within 1 % of it."""
        if self.median <= 0:
            return float("inf")
        return max(self.median - self.low, self.high - self.median) / self.median


def median_interval(times, confidence: float = 0.95, serial: bool = True) -> MedianInterval | None:
    """The median of ``times`` and its order-statistic interval; None when there are too few (effective) steps.

    ``serial``: account for the steps' serial dependence (n_eff); False takes them as independent (the rule
    before it, for replays of old records)."""
    x = np.asarray(times, dtype=float)
    n_eff = dependence(x).n_eff if serial else float(len(x))
    ranks = effective_ranks(len(x), n_eff, confidence)
    if ranks is None:
        return None
    l, u, coverage = ranks
    s = np.sort(x)
    return MedianInterval(float(np.median(s)), float(s[l - 1]), float(s[u - 1]), coverage,
                          n_eff if serial else None)


@dataclass(frozen=True)
class StoppingRule:
    ci_target: float = 0.01
    confidence: float = 0.95
    min_steps: int = 20
    max_steps: int = 300
    max_timed_s: float = 60.0
    min_timed_s: float = 0.0
    serial: bool = True  # the interval accounts for serial dependence; False: the former rule (replays only)

    @classmethod
    def from_train(cls, train) -> StoppingRule:
        """The rule a cell's ``train`` settings ask for: ``train.steps`` is the minimum of timed steps."""
        t = train.timing
        return cls(t.ci_target, t.confidence, train.steps, t.max_steps, t.max_timed_s, t.min_timed_s)

    def stop_reason(self, times, timed_s: float) -> str | None:
        """Why to stop after these timed steps and ``timed_s`` seconds of timed window, or None to go on.

        Neither cap cuts timing short of ``min_steps`` (max_steps >= min_steps is checked at load; a time
        cap hit earlier waits for the minimum: limits.timeout_s still bounds the cell)."""
        n = len(times)
        if n < self.min_steps:
            return None
        if timed_s >= self.min_timed_s:
            interval = median_interval(times, self.confidence, self.serial)
            if interval is not None and interval.rel_half_width <= self.ci_target:
                return "converged"
        if n >= self.max_steps:
            return "max_steps"
        if timed_s >= self.max_timed_s:
            return "max_timed_s"
        return None

    def summary(self, times, timed_s: float, reason: str | None) -> dict:
        """What the record keeps: the rule, its settings, why timing stopped, the interval reached and the
        series' serial dependence (``rho1``, ``n_eff``)."""
        interval = median_interval(times, self.confidence, self.serial)
        dep = dependence(times)
        return {
            "rule": RULE if self.serial else RULE_INDEPENDENT, "ci_target": self.ci_target,
            "confidence": self.confidence,
            "min_steps": self.min_steps, "max_steps": self.max_steps, "max_timed_s": self.max_timed_s,
            "min_timed_s": self.min_timed_s,
            "stop_reason": reason, "timed_steps": len(times), "timed_s": timed_s,
            "median_s": interval.median if interval else (float(np.median(times)) if len(times) else None),
            "ci_low_s": interval.low if interval else None,
            "ci_high_s": interval.high if interval else None,
            "ci_coverage": interval.coverage if interval else None,
            "ci_rel_half_width": interval.rel_half_width if interval else None,
            "rho1": dep.rho1, "n_eff": dep.n_eff if self.serial else float(len(times)),
        }
