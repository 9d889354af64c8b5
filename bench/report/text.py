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


def basis_text(row: pd.Series) -> str:
    """Where the interval comes from: '3 launches', or '1 launch' (within it: launch-to-launch left out)."""
    if row.get("repeats_ok", 1) > 1:
        return f"{row['repeats_ok']} launches"
    coverage = row.get("step_time_ci_coverage")
    if is_num(coverage) and coverage < 0.95:
        return f"1 launch, {row.get('timed_steps', 0):.0f} steps: {coverage:.0%} CI"
    return "1 launch"


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
