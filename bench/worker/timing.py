"""When to stop timing a cell: the interval of the median step time is tight, or a cap is reached.

A fixed handful of timed steps does not repeat: on 2x H200 three launches of 4 timed steps of a 1B full
fine-tune differed by 13-23 %, of 40 steps by 1-5 %. So a cell keeps stepping until the confidence
interval of its MEDIAN step time is within ``ci_target`` of the median (both sides), after at least
``min_steps`` timed steps and ``min_timed_s`` timed seconds, or until ``max_steps`` timed steps or
``max_timed_s`` timed seconds.

The interval takes the steps as independent. Steps that come in episodes (runs of fast steps, then runs of
slow ones) break that: inside one episode the interval looks tight while the launch's median is far from
settled. ``min_timed_s`` makes such a cell time a window long enough to span several episodes
(``min_timed_s == max_timed_s``: a fixed window); 0, the default, leaves the rule as it was.

The interval is distribution-free: for n sorted step times, the median lies between the l-th and the
(n+1-l)-th with probability 1 - 2 P(B <= l-1), B ~ Binomial(n, 1/2) (the number of steps below the true
median); l is the largest rank that keeps this at or above ``confidence``. Step times are skewed and
have outliers (a collective that waited, an allocator flush), so no normal approximation is assumed.
Below 6 steps no pair of order statistics reaches 95 %: the interval is undefined and timing goes on.

Pure functions of a series of step times: the worker evaluates them on the slowest rank's series, which
every rank holds after an all-reduce, so that all ranks stop at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.stats import binom

RULE = ("median step time, distribution-free order-statistic interval (binomial); stop when the interval "
        "lies within median x (1 ± ci_target) after at least min_steps and min_timed_s, or at max_steps / "
        "max_timed_s")
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


@dataclass(frozen=True)
class MedianInterval:
    median: float
    low: float
    high: float
    coverage: float  # the interval's exact probability of holding the median (>= the confidence asked)

    @property
    def rel_half_width(self) -> float:
        """The larger side of the interval over the median: ±1 % means both ends within 1 % of it."""
        if self.median <= 0:
            return float("inf")
        return max(self.median - self.low, self.high - self.median) / self.median


def median_interval(times, confidence: float = 0.95) -> MedianInterval | None:
    """The median of ``times`` and its order-statistic interval; None when there are too few times."""
    x = np.sort(np.asarray(times, dtype=float))
    ranks = order_statistic_ranks(len(x), confidence)
    if ranks is None:
        return None
    l, u, coverage = ranks
    return MedianInterval(float(np.median(x)), float(x[l - 1]), float(x[u - 1]), coverage)


@dataclass(frozen=True)
class StoppingRule:
    ci_target: float = 0.01
    confidence: float = 0.95
    min_steps: int = 20
    max_steps: int = 300
    max_timed_s: float = 60.0
    min_timed_s: float = 0.0

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
        interval = median_interval(times, self.confidence)
        if interval is not None and interval.rel_half_width <= self.ci_target and timed_s >= self.min_timed_s:
            return "converged"
        if n >= self.max_steps:
            return "max_steps"
        if timed_s >= self.max_timed_s:
            return "max_timed_s"
        return None

    def summary(self, times, timed_s: float, reason: str | None) -> dict:
        """What the record keeps: the rule, its settings, why timing stopped and the interval reached."""
        interval = median_interval(times, self.confidence)
        return {
            "rule": RULE, "ci_target": self.ci_target, "confidence": self.confidence,
            "min_steps": self.min_steps, "max_steps": self.max_steps, "max_timed_s": self.max_timed_s,
            "min_timed_s": self.min_timed_s,
            "stop_reason": reason, "timed_steps": len(times), "timed_s": timed_s,
            "median_s": interval.median if interval else (float(np.median(times)) if len(times) else None),
            "ci_low_s": interval.low if interval else None,
            "ci_high_s": interval.high if interval else None,
            "ci_coverage": interval.coverage if interval else None,
            "ci_rel_half_width": interval.rel_half_width if interval else None,
        }
