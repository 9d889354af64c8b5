"""The verdict: per setting group and process count, which strategy to use.

- fastest: the highest launch-median real-token throughput among the cells that fit (status ok, no launch
  failed for the cell's own reasons (oom, crash, hang, timeout, unsupported: a cell that runs one time in
  three is no answer; an interrupted launch is the operator's deadline and does not count), and the peak
  neither over the cap nor over the card);
- indistinguishable from it: the other fitting cells whose 95 % throughput interval overlaps the fastest's
  (across launches when a cell has 2+, else within its one launch, which leaves launch-to-launch variation
  out: the table says which);
- lowest peak memory: the fitting cell with the smallest peak (torch reserved on GPU, the worst launch;
  host RSS on CPU), with its throughput.
Each strategy runs under its own precision policy here (what a user would run), and the policy is named.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from bench.report import intervals, metrics


@dataclass(frozen=True)
class Verdict:
    gpus: int
    fastest: pd.Series | None
    indistinguishable: list[pd.Series]
    lowest_memory: pd.Series | None
    not_fitting: list[pd.Series]  # ran and failed, or over the cap/card


def memory_column(device: str) -> str:
    return "peak_reserved_gib" if device == "cuda" else "host_rss_peak_gib"


def fits(row: pd.Series) -> bool:
    """Ran ok in every launch that did not stop for an outside reason, and stayed within the cap (torch
    reserved) and the card (NVML used)."""
    if row["status"] != "ok" or failed_launches(row):
        return False
    cap, reserved = row.get("gpu_memory_gib"), row.get("peak_reserved_gib")
    if _num(cap) and _num(reserved) and reserved > cap:
        return False
    total, used = row.get("gpu_total_gib"), row.get("nvml_peak_used_gib")
    return not (_num(total) and _num(used) and used > total)


def failed_launches(row: pd.Series) -> str | None:
    """'oom in 1 of 3 launches' where some of the cell's launches failed for its own reasons
    (bench/report/repeats.py); None otherwise."""
    value = row.get("failed_launches")
    return value if isinstance(value, str) and value else None


def _num(value) -> bool:
    return isinstance(value, (int, float)) and value == value  # NaN is not a figure


def interval(row: pd.Series) -> tuple[float, float]:
    """The cell's throughput interval; a cell without one is the point of its median."""
    return metrics.per_gpu_interval(row) or (row["real_tokens_per_s_per_gpu"],) * 2


def decide(group: pd.DataFrame, gpus: int) -> Verdict:
    rows = group[group["gpus"] == gpus]
    fitting = [row for _, row in rows.iterrows() if fits(row) and _num(row.get(metrics.THROUGHPUT))]
    not_fitting = [row for _, row in rows.iterrows() if not fits(row)]
    if not fitting:
        return Verdict(gpus, None, [], None, not_fitting)
    fastest = max(fitting, key=lambda r: r[metrics.THROUGHPUT])
    best = interval(fastest)
    close = [r for r in fitting if r["cell_id"] != fastest["cell_id"] and intervals.overlap(interval(r), best)]
    close.sort(key=lambda r: -r[metrics.THROUGHPUT])
    column = memory_column(fastest["device"])
    measured = [r for r in fitting if _num(r.get(column))]
    lowest = min(measured, key=lambda r: (r[column], -r[metrics.THROUGHPUT])) if measured else None
    return Verdict(gpus, fastest, close, lowest, not_fitting)


def verdicts(group: pd.DataFrame) -> list[Verdict]:
    return [decide(group, int(n)) for n in sorted(group["gpus"].unique())]
