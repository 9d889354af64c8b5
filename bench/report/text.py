"""A figure as the report writes it: numbers, durations, intervals and speedups as text a reader says aloud.

Shared by the tables (bench/report/tables.py), the plots and the all-cells table; a status (oom, timeout,
...) stands where a failed run has no figure.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bench.report import metrics


def is_num(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not (isinstance(value, float) and math.isnan(value))


def unit(device: str) -> str:
    return "GPU" if device == "cuda" else "proc"


def run_name(row: pd.Series) -> str:
    return f"{row['strategy']} x{row['gpus']} {unit(row['device'])}"


def policy(row: pd.Series) -> str:
    value = row.get("precision_policy")
    return value if isinstance(value, str) else "unknown"


def duration(seconds: float) -> str:
    """1 h 40 min, 52 min, 3.2 s, 2 d 4 h: as one would say it."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def gib(value, missing: str) -> str:
    return f"{value:.2f}" if is_num(value) else missing


def _count(row: pd.Series, key: str, default: int) -> int:
    value = row.get(key)
    return int(value) if is_num(value) else default


def pooled_launches(row: pd.Series) -> int:
    """How many launches the cell's figure and interval are over (the ok ones at one micro-batch)."""
    return _count(row, "repeats_pooled", _count(row, "repeats_ok", 1))


def basis_text(row: pd.Series) -> str:
    """Where the interval comes from: '3 launches', '1 launch' (within it: launch-to-launch left out), and
    where some launches failed '1 of 3 launches ok' (the failures are listed where the verdict is)."""
    pooled, ok = pooled_launches(row), _count(row, "repeats_ok", 1)
    launched = _count(row, "repeats", ok)
    text = f"{ok} of {launched} launches ok" if launched > ok else f"{ok} launch{'es' if ok > 1 else ''}"
    if ok > pooled:
        text += f", {pooled} pooled ({ok - pooled} at another micro-batch)"
    coverage = row.get("step_time_ci_coverage")
    if pooled == 1 and is_num(coverage) and coverage < 0.95:
        text += f", {row.get('timed_steps', 0):.0f} steps: {coverage:.0%} CI"
    return text


def interval_text(row: pd.Series) -> str:
    """'[7,077-7,433]': the 95 % interval of tokens/s per GPU (per process on CPU)."""
    bounds = metrics.per_gpu_interval(row)
    return f"[{bounds[0]:,.0f}-{bounds[1]:,.0f}]" if bounds else "[no interval]"


def throughput_text(row: pd.Series) -> str:
    """Real tokens/s per GPU, its 95 % interval and what the interval is across, e.g. '7,381 [7,077-7,433] (1 launch)'."""
    if row["status"] != "ok":
        return row["status"]
    return f"{row['real_tokens_per_s_per_gpu']:,.0f} {interval_text(row)} ({basis_text(row)})"


def speedup_text(row: pd.Series) -> str:
    """Against the same-policy 1-GPU baseline: '2.01x (100%)', naming the baseline where it is another strategy."""
    if row["status"] != "ok":
        return row["status"]
    value = row.get("speedup")
    if not is_num(value):
        return f"no 1-{unit(row['device'])} baseline in {policy(row)}"
    text = f"{value:.2f}x ({row['efficiency']:.0%})"
    return text if row.get("baseline") == f"{row['strategy']} x1" else f"{text} vs {row['baseline']}"


def plain_text(row: pd.Series, plain: pd.Series | None) -> str:
    """Against the plain 1-process run; labelled cross-policy where the policies differ."""
    if row["status"] != "ok":
        return row["status"]
    if plain is None:
        return "no plain 1-proc run" if row["device"] == "cpu" else "no plain 1-GPU run"
    if plain["status"] != "ok":
        return f"baseline {plain['status']}"
    text = f"{row['speedup_vs_plain_1']:.2f}x ({row['efficiency_vs_plain_1']:.0%})"
    if row.get("plain_cross_policy"):
        text += f" cross-policy: {policy(row)} vs {policy(plain)}"
    return text
