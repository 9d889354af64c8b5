"""A cell's launches pooled into one row: fresh launches are the unit of repetition.

- The figure is the median over the cell's ok launches, with the 95 % t-interval of the launch figures on
  the log scale (bench/report/intervals.py) when there are 2 or more; memory is the worst launch's.
- Failed launches stay visible: ``failed_launches`` says which statuses and how many ("oom in 1 of 3
  launches") for failures of the cell's own (``OWN_FAILURES``); a cell with one does not fit in the verdict,
  however fast its ok launches were. An interrupted launch (Ctrl-C or SIGTERM: the operator's deadline),
  a busy GPU or a cancelled job says nothing about the cell and is only counted.
- ``micro_batch: auto``: each launch may confirm a different micro-batch, and a median over launches of
  different batch sizes is the figure of no configuration. Only the launches at the micro-batch the first
  ok launch chose are pooled (later repeats reuse that one: bench/launch/auto_batch.py); the others are left
  out and counted in ``repeats_other_micro_batch``, and ``micro_batch_note`` says so.
"""

from __future__ import annotations

import pandas as pd

from bench.report import intervals
from bench.report.metrics import THROUGHPUT, processes

# Figures that are medians over launches (one repeat = one fresh launch of the cell).
MEDIAN_COLUMNS = ("tokens_per_s", "tokens_per_s_per_gpu", "real_tokens_per_s", "real_tokens_per_s_per_gpu",
                  "step_time_s", "joules_per_token", "power_mean_w", "util_mean_pct", "sm_clock_mean_mhz",
                  "throttled_share", "energy_timed_j", "compile_s", "steal_share", "host_busy_share",
                  "cpu_probe_ms", "real_tokens_per_s_host_steady", "step_time_host_steady_s", "host_slow_step_share")
# Memory: the worst launch, since it is what has to fit; what should be 0 in the timed window, likewise.
MAX_COLUMNS = ("peak_allocated_gib", "peak_reserved_gib", "training_peak_allocated_gib",
               "training_peak_reserved_gib", "nvml_peak_used_gib", "host_rss_peak_gib", "gc_collections_in_window",
               "optimizer_skipped_in_window", "optimizer_updated_nothing",
               "compile_s_in_timed_steps", "compiled_in_timed_steps")
# Launch failures that are the cell's own: it does not reliably run. Not `interrupted` (the operator stopped
# bench), `busy` (another tenant), `cancelled` (the scheduler), `skipped` or `predicted_oom` (not launched).
OWN_FAILURES = ("oom", "crash", "hang", "timeout", "unsupported")


def latest_per_cell(df: pd.DataFrame) -> pd.DataFrame:
    """Several runs of one cell and repeat in one results folder (retries) -> the last one; repeats, and the
    launches of other folders (other runs of the matrix), are pooled by aggregate_repeats."""
    keys = ["machine", "results_folder", "cell_id", "repeat"] if "results_folder" in df.columns else \
        ["machine", "cell_id", "repeat"]
    return df.groupby(keys, sort=False, dropna=False).tail(1)


def aggregate_repeats(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell and machine: median figures over ok launches with their 95 % interval; ok if any was.

    A cell id does not name the machine: the same matrix run on two kinds of GPU gives two cells here.
    """
    df = latest_per_cell(df)
    rows = []
    for _, group in df.groupby(["machine", "cell_id"], sort=False):
        ok, other_mb = same_micro_batch(group[group["status"] == "ok"])
        row = (ok if len(ok) else group).iloc[-1].to_dict()
        row.update(repeats=len(group), repeats_ok=len(ok) + len(other_mb), repeats_pooled=len(ok),
                   repeats_other_micro_batch=len(other_mb), failed_launches=failed_launches(group),
                   micro_batch_note=micro_batch_note(ok, other_mb))
        if len(ok) > 1:
            row.update(_across_launches(ok))
        elif len(ok) == 1:
            row["interval_basis"] = "1 launch"
        rows.append(row)
    return pd.DataFrame(rows)


def same_micro_batch(ok: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the ok launches at the pooled micro-batch, the ok launches at another one).

    Pooled: the micro-batch most ok launches ran at, on a tie the largest. Within one run that is the first
    launch's choice, which later repeats reuse (unless most of them ran out of memory there and stepped down:
    then what fits reliably); between runs of one matrix (a report of several folders) a tie goes to the best
    fit found, e.g. a later run's climb over an earlier run's first proposal, whatever the folders' order."""
    if not len(ok) or "micro_batch" not in ok.columns:
        return ok, ok.iloc[:0]
    counts = ok["micro_batch"].value_counts(dropna=False)
    tied = [mb for mb, n in counts.items() if n == counts.max()]
    pooled = max(tied, key=lambda mb: float("-inf") if mb != mb else mb)  # NaN (none chosen) only when alone
    same = ok["micro_batch"] == pooled if pooled == pooled else ok["micro_batch"].isna()
    return ok[same], ok[~same]


def failed_launches(group: pd.DataFrame) -> str | None:
    """'oom in 1 of 3 launches; crash in 1 of 3 launches' for the cell's own failures; None without any."""
    counts = group["status"].value_counts()
    parts = [f"{status} in {counts[status]} of {len(group)} launches" for status in OWN_FAILURES if status in counts]
    return "; ".join(parts) or None


def micro_batch_note(pooled: pd.DataFrame, other: pd.DataFrame) -> str | None:
    if not len(other):
        return None
    left = ", ".join(f"{mb:g}" if mb == mb else "none" for mb in other["micro_batch"])
    return (f"launches chose different micro-batches: {len(pooled)} at {pooled['micro_batch'].iloc[0]:g} (the most "
            f"launches', on a tie the largest) pooled, {len(other)} at {left} left out")


def _across_launches(ok: pd.DataFrame) -> dict:
    """Median over the launches; the 95 % t-interval of their figures on the log scale (bench/report/intervals.py)."""
    out = {col: float(ok[col].median()) for col in MEDIAN_COLUMNS if col in ok.columns and ok[col].notna().any()}
    out.update({col: float(ok[col].max()) for col in MAX_COLUMNS if col in ok.columns and ok[col].notna().any()})
    gpus = int(processes(ok).iloc[0])
    tps = ok[THROUGHPUT].to_numpy(dtype=float)
    if (through := intervals.across_launches(tps)) is not None:
        out.update({"real_tokens_per_s_ci_low": through.low, "real_tokens_per_s_ci_high": through.high})
    if (step := intervals.across_launches(ok["step_time_s"].to_numpy(dtype=float))) is not None:
        out.update({"step_time_ci_low_s": step.low, "step_time_ci_high_s": step.high,
                    "step_time_ci_coverage": step.coverage})
    out.update({"interval_basis": f"{len(ok)} launches", "launch_interval_source": "across launches",
                "real_tokens_per_s_repeat_min": float(tps.min()), "real_tokens_per_s_repeat_max": float(tps.max()),
                "real_tokens_per_s_repeat_cv": float(tps.std(ddof=1) / tps.mean()),
                "timed_steps": int(ok["timed_steps"].min())})  # the shortest launch
    out["real_tokens_per_s_per_gpu"] = out[THROUGHPUT] / gpus
    return out
