"""95 % intervals for the report's figures: one launch's median step time, and a cell's figure across launches.

Fresh launches are the unit of repetition: a launch's timed steps share its process placement, allocator
state, clocks and neighbours, so their spread says little about what the next launch will measure.
- Across launches (2 or more): the launches' figures on the log scale, mean +- t(0.975, k-1) x sd / sqrt(k),
  exponentiated: a t-interval for the geometric mean, on the ratio scale that speeds are compared on.
  Two launches give a wide interval (t = 12.7): that is what two launches can tell.
- Within one launch (``launch_interval``): the worker's stopping rule (bench/worker/timing.py), the
  distribution-free order-statistic interval of the median on the effective number of steps (serial
  dependence counted). Below 6 effective steps it admits none, and the launch then has no interval: the
  report says "[no interval]" rather than give a narrower one that takes dependent steps as independent.
- Records from before the adaptive timing (no ``timing``): order statistics of the timed steps taken as
  independent, [x_(j), x_(k)] with j and k from the binomial(n, 1/2) distribution, coverage >= 95 %. Fewer
  than 6 steps admit no such pair; [min, max] is then given with the coverage it has (1 - 2 x 0.5^n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from bench.records import RunRecord
from bench.worker import timing

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    coverage: float  # the confidence the interval actually has (below CONFIDENCE only for very short series)


def median_interval(values, confidence: float = CONFIDENCE) -> Interval | None:
    """Order-statistic interval of the median of ``values``; None for an empty series."""
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    if n == 0:
        return None
    # [x_(c), x_(n-1-c)] (0-based) misses the median when at most c steps lie below it, or at most c above:
    # coverage 1 - 2 P(B <= c), B ~ binomial(n, 1/2). Take the largest c that keeps coverage >= confidence.
    alpha = 1 - confidence
    c = int(stats.binom.ppf(alpha / 2, n, 0.5))  # smallest c with P(B <= c) >= alpha / 2
    if stats.binom.cdf(c, n, 0.5) > alpha / 2:
        c -= 1
    c = max(c, 0)  # too few steps for the confidence asked: [min, max], with the coverage it has
    coverage = 1 - 2 * float(stats.binom.cdf(c, n, 0.5))
    return Interval(float(x[c]), float(x[n - 1 - c]), coverage)


def across_launches(values, confidence: float = CONFIDENCE) -> Interval | None:
    """t-interval on the log scale of per-launch figures (all > 0); None with fewer than 2 launches."""
    x = np.log(np.asarray(values, dtype=float))
    k = len(x)
    if k < 2 or not np.all(np.isfinite(x)):
        return None
    half = float(stats.t.ppf(0.5 + confidence / 2, k - 1)) * float(x.std(ddof=1)) / math.sqrt(k)
    centre = float(x.mean())
    return Interval(math.exp(centre - half), math.exp(centre + half), confidence)


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Two closed intervals share a point."""
    return a[0] <= b[1] and b[0] <= a[1]


def ratio(numerator: tuple[float, float, float], denominator: tuple[float, float, float],
          confidence: float = CONFIDENCE) -> Interval | None:
    """Interval of a / b from each figure's (value, low, high) interval, the two measured independently.

    On the log scale a ratio is a difference: its half-width is the two half-widths added in quadrature,
    laid around log(a / b) (normal approximation; each interval taken as symmetric on the log scale, which
    the across-launch intervals are and the order-statistic ones nearly are). None without both intervals.
    """
    (a, a_low, a_high), (b, b_low, b_high) = numerator, denominator
    values = (a, a_low, a_high, b, b_low, b_high)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values):
        return None
    half = math.hypot(math.log(a_high / a_low) / 2, math.log(b_high / b_low) / 2)
    centre = a / b
    return Interval(centre * math.exp(-half), centre * math.exp(half), confidence)


# Where a launch's interval comes from (``launch_interval_source``).
FROM_TIMING = "timing"  # the worker's, recorded as the stopping rule reached it
FROM_SERIAL = "timing rule on the slowest rank's steps"  # the worker recorded none: the same rule, recomputed here
NO_INTERVAL = "no interval (n_eff < 6)"  # the rule admits none: a capped cell with too few effective steps
FROM_INDEPENDENT = "order statistics, steps taken as independent (record from before adaptive timing)"


def launch_interval(record: RunRecord, times: list[float],
                     step: float) -> tuple[float | None, float | None, float | None, str]:
    """95 % interval of one launch's median step time (low, high, coverage, source); low and high None when
    the launch has none.

    A record with the worker's ``timing``: its interval where the rule reached one. The worker times each
    rank; the slowest rank sets the pace, so its relative interval is laid around the median recomputed
    here (per step the slowest rank), which it matches to within the ranks' skew. Where the worker has none
    (a cell stopped on a cap with fewer than 6 effective steps), the rule is applied again to the slowest
    rank's series (bench/worker/timing.py, serial dependence counted); none there either: no interval,
    rather than an order-statistic one that takes dependent steps as independent and reads far narrower.
    Records from before the adaptive timing: order statistics of the steps, taken as independent.
    """
    timings = [r.get("timing") for r in record.ranks]
    timed = bool(timings) and all(isinstance(t, dict) for t in timings)
    if timed and all(_positive(t.get("median_s")) and _positive(t.get("ci_low_s")) and _positive(t.get("ci_high_s"))
                     for t in timings):
        slowest = max(timings, key=lambda t: t["median_s"])
        return (step * slowest["ci_low_s"] / slowest["median_s"], step * slowest["ci_high_s"] / slowest["median_s"],
                float(slowest.get("confidence") or CONFIDENCE), FROM_TIMING)
    if timed:
        confidence = float(next((t["confidence"] for t in timings if _positive(t.get("confidence"))),
                                CONFIDENCE))
        rule = timing.median_interval(times, confidence, serial=True)
        if rule is None:
            return None, None, None, NO_INTERVAL
        return rule.low, rule.high, rule.coverage, FROM_SERIAL  # its median is ``step``: the same series
    interval = median_interval(times)
    return interval.low, interval.high, interval.coverage, FROM_INDEPENDENT


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0
