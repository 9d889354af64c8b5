"""The figure a launch gives on a steady host: the median step time over its steps timed at the host's fast pace.

On the H200 machines (Firecracker microVMs) each vCPU runs Python at one of two paces, ~2x apart, in spells of
seconds to a minute that come from outside the guest: an idle guest shows them on every vCPU, and our own busy
threads beside a vCPU do not bring them on (benchmarks/host_pace.py, results/host-pace-h200). A step that waits
on the host (ZeRO-3 and FSDP LoRA cells, cards 70-85 % busy) runs at the spell's pace, so two launches of one cell
differ by how much of their window fell in slow spells: 5-22 % in issue 16's llama8b pairs, where the cards'
own work agreed within 0.4 %. The median over all steps is what the machine gave and stays the headline; the
host-steady figure is the one that should repeat between launches and machines, for regressions and a like-for-like
comparison of strategies.

Each timed step carries the light probe's reading taken just before it (``host_pace_ms``, bench/worker/cpu_probe.py)
and the rank's ``host.host_pace_ms_end`` closes the last one, so step i lies between reading i and reading i + 1.
A step ran on a slow host when either of its readings, on any rank (the slowest rank sets a step), is more than
``SLOW_RATIO`` times the launch's fastest reading. What it cannot see: a launch whose host was slow throughout
(its fastest reading is then slow too and nothing is left out) and a spell shorter than one step.
"""

from __future__ import annotations

import numpy as np

SLOW_RATIO = 1.4  # the two paces read ~2x apart; also the cut for the probes around the window (cautions.py)
MIN_STEADY_STEPS = 5  # fewer steps on a steady host give no median worth comparing


def rank_brackets(rank: dict) -> list[float] | None:
    """Per timed step of one rank, the slower of the readings before and after it; None where the rank report
    has no readings (records from before the per-step probe)."""
    timed = [s for s in rank.get("steps", []) if s.get("phase") == "timed"]
    readings = [s.get("host_pace_ms") for s in timed] + [(rank.get("host") or {}).get("host_pace_ms_end")]
    if not timed or any(not isinstance(r, (int, float)) for r in readings):
        return None
    return [max(readings[i], readings[i + 1]) for i in range(len(timed))]


def step_paces(ranks: list[dict]) -> list[float] | None:
    """Per timed step, the slowest rank's bracket (the steps every rank timed); None without readings."""
    per_rank = [rank_brackets(r) for r in ranks]
    if not per_rank or any(p is None for p in per_rank):
        return None
    n = min(len(p) for p in per_rank)
    return [max(p[i] for p in per_rank) for i in range(n)]


def figures(ranks: list[dict], times: list[float]) -> dict:
    """``host_slow_step_share`` (steps on a slow host / timed steps), ``host_pace_fastest_ms``, ``host_steady_steps``
    and ``step_time_host_steady_s`` (median of the others; absent below ``MIN_STEADY_STEPS``); {} without readings.
    A card-bound cell's steps do not wait on the host: for it the share says where the host was, not what it cost.
    ``times``: the slowest rank's step times (bench/report/metrics.timed_step_times)."""
    paces = step_paces(ranks)
    if paces is None or not times:
        return {}
    n = min(len(paces), len(times))
    pace, step = np.asarray(paces[:n]), np.asarray(times[:n])
    fastest = float(pace.min())
    steady = pace <= SLOW_RATIO * fastest
    out = {"host_slow_step_share": float(1 - steady.mean()), "host_pace_fastest_ms": fastest,
           "host_steady_steps": int(steady.sum())}
    if steady.sum() >= MIN_STEADY_STEPS:
        out["step_time_host_steady_s"] = float(np.median(step[steady]))
    return out
