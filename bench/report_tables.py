"""The report's tables: pandas DataFrames of display text, built from the per-cell figures of bench.metrics.

Every table cell is text so that a failed or skipped run shows its status (oom, timeout, predicted_oom,
...) instead of a blank or a zero; the CSV files next to the report carry the same text, and
``cells.csv`` the raw numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench import flops, metrics
from bench.matrix import TokenBudget

NO_RECORD = "no record"  # the folder holds no run of that cell: left out of the matrix, or not run (yet)


@dataclass(frozen=True)
class TableOptions:
    budget: TokenBudget | None = None
    compare: tuple[str, ...] = ()  # strategies for the head-to-head; empty = all
    compare_gpus: int | None = None  # process count for the head-to-head; None = 2, else the smallest above 1


# ---------------------------------------------------------------- small formatters

def is_num(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not (isinstance(value, float) and math.isnan(value))


def unit(device: str) -> str:
    return "GPU" if device == "cuda" else "proc"


def run_name(row: pd.Series) -> str:
    return f"{row['strategy']} x{row['gpus']} {unit(row['device'])}"


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


def throughput_text(row: pd.Series) -> str:
    """tokens/s per GPU with its spread: ± half the p10-p90 range of timed steps, and the repeats' range."""
    if row["status"] != "ok":
        return row["status"]
    value = row["tokens_per_s_per_gpu"]
    text = f"{value:,.0f}"
    lo, hi = row.get("tokens_per_s_per_gpu_p10"), row.get("tokens_per_s_per_gpu_p90")
    if is_num(lo) and is_num(hi):
        text += f" ±{(hi - lo) / 2 / value:.0%}"
    if row.get("repeats_ok", 1) > 1 and is_num(row.get("tokens_per_s_per_gpu_repeat_min")):
        text += (f" ({row['repeats_ok']} runs {row['tokens_per_s_per_gpu_repeat_min']:,.0f}"
                 f"-{row['tokens_per_s_per_gpu_repeat_max']:,.0f})")
    return text


def speedup_text(row: pd.Series, which: str, base: pd.Series | None) -> str:
    """'1.85x (93%)'; the run's own status if it failed; why there is no number otherwise."""
    if row["status"] != "ok":
        return row["status"]
    value = row.get(f"speedup_vs_{which}_1")
    if is_num(value):
        return f"{value:.2f}x ({row[f'efficiency_vs_{which}_1']:.0%})"
    if base is None:
        return "no 1-proc baseline" if row["device"] == "cpu" else "no 1-GPU baseline"
    return f"baseline {base['status']}"


# ---------------------------------------------------------------- grouping

def setting_groups(df: pd.DataFrame):
    """(machine, setting_key, title, rows) for each group of comparable cells, in the order first seen."""
    for (machine, key), group in df.groupby(["machine", "setting_key"], sort=False):
        yield machine, key, f"{metrics.setting_title(key)} on {machine}", group


# ---------------------------------------------------------------- scaling

def scaling_table(group: pd.DataFrame) -> pd.DataFrame:
    """Rows strategies, per process count: tokens/s per GPU, speedup vs the same strategy at 1 and vs plain 1."""
    u = unit(group["device"].iloc[0])
    plain = metrics.plain_baseline(group)
    plain_name = f"{plain['strategy']}@1" if plain is not None else "plain@1"
    ones = group[group["gpus"] == 1].set_index("strategy")
    rows = {}
    for strategy in dict.fromkeys(group["strategy"]):
        out = {}
        for n in sorted(group["gpus"].unique()):
            cell = group[(group["strategy"] == strategy) & (group["gpus"] == n)]
            row = cell.iloc[-1] if len(cell) else None
            out[f"{n} {u}: tok/s/{u}"] = throughput_text(row) if row is not None else NO_RECORD
            if n > 1:
                own = ones.loc[strategy] if strategy in ones.index else None
                own = own.iloc[-1] if isinstance(own, pd.DataFrame) else own
                out[f"{n} {u}: vs same strategy@1"] = (speedup_text(row, "same", own) if row is not None
                                                        else NO_RECORD)
            out[f"{n} {u}: vs {plain_name}"] = speedup_text(row, "plain", plain) if row is not None else NO_RECORD
        rows[strategy] = out
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "strategy"
    return table.reset_index()


# ---------------------------------------------------------------- head-to-head

def compare_count(group: pd.DataFrame, wanted: int | None) -> int | None:
    counts = sorted(n for n in group["gpus"].unique() if n > 1)
    if wanted is not None:
        return wanted if wanted in counts else None
    return 2 if 2 in counts else (counts[0] if counts else None)


def head_to_head(group: pd.DataFrame, options: TableOptions) -> pd.DataFrame | None:
    """The plain 1-GPU run against each chosen strategy at N GPUs; None when the group has nothing to compare."""
    plain = metrics.plain_baseline(group)
    n = compare_count(group, options.compare_gpus)
    if plain is None or n is None:
        return None
    others = group[group["gpus"] == n]
    if options.compare:
        others = others[others["strategy"].isin(options.compare)]
    if not len(others):
        return None
    rows = [head_to_head_row(plain, plain, options.budget)]
    rows += [head_to_head_row(row, plain, options.budget) for _, row in others.iterrows()]
    return pd.DataFrame(rows)


def head_to_head_row(row: pd.Series, plain: pd.Series, budget: TokenBudget | None) -> dict:
    ok = row["status"] == "ok"
    memory_col = "peak_reserved_gib" if row["device"] == "cuda" else "host_rss_peak_gib"
    memory_name = "peak reserved GiB" if row["device"] == "cuda" else "peak host RSS GiB"
    out = {
        "run": run_name(row),
        "step time s (p10-p90)": (f"{row['step_time_s']:.3g} ({row['step_time_p10_s']:.3g}-{row['step_time_p90_s']:.3g})"
                                  if ok else row["status"]),
        "tokens/s (all)": f"{row['tokens_per_s']:,.0f}" if ok else row["status"],
        f"tok/s/{unit(row['device'])}": throughput_text(row),
        f"speedup vs {run_name(plain)}": speedup_text(row, "plain", plain),
        memory_name: gib(row.get(memory_col), row["status"] if not ok else "n/a"),
    }
    if budget is not None:
        total = budget.tokens * budget.epochs
        out[f"time for {tokens_text(total)} tokens"] = (duration(total / row["real_tokens_per_s"]) if ok
                                                         else row["status"])
        out["plain -> this"] = projection_text(row, plain, total)
    return out


def projection_text(row: pd.Series, plain: pd.Series, total_tokens: float) -> str:
    """'1 h 40 min -> 52 min': the plain run's time to train, then this run's."""
    if row["cell_id"] == plain["cell_id"]:
        return "(the baseline)"
    if row["status"] != "ok":
        return row["status"]
    if plain["status"] != "ok":
        return f"baseline {plain['status']}"
    return f"{duration(total_tokens / plain['real_tokens_per_s'])} -> {duration(total_tokens / row['real_tokens_per_s'])}"


def tokens_text(count: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= factor:
            return f"{count / factor:g}{suffix}"
    return f"{count:g}"


# ---------------------------------------------------------------- memory

def capacity_text(row: pd.Series) -> str:
    if is_num(row.get("gpu_memory_gib")):
        card = f" of {row['gpu_total_gib']:.1f}" if is_num(row.get("gpu_total_gib")) else ""
        return f"{row['gpu_memory_gib']:g} (cap{card})"
    if is_num(row.get("gpu_total_gib")):
        return f"{row['gpu_total_gib']:.1f} (card)"
    return "n/a (CPU)" if row["device"] == "cpu" else "unknown"


def peak_with_spread(row: pd.Series, kind: str) -> str:
    """Max over ranks, with the spread over ranks when it is large (>10% and >0.25 GiB: uneven sharding)."""
    value = row.get(f"peak_{kind}_gib")
    if not is_num(value):
        return "n/a (CPU)" if row["device"] == "cpu" else row["status"] if row["status"] != "ok" else "not reported"
    spread = row.get(f"peak_{kind}_rank_spread_gib")
    text = f"{value:.2f}"
    if is_num(spread) and spread > 0.25 and spread > 0.1 * value:
        text += f" (ranks differ by {spread:.2f})"
    return text


def memory_table(group: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, row in group.sort_values(["strategy", "gpus"], kind="stable").iterrows():
        failed = row["status"] if row["status"] != "ok" else "not reported"
        rows.append({
            "run": run_name(row), "status": row["status"],
            "torch peak allocated GiB": peak_with_spread(row, "allocated"),
            "torch peak reserved GiB": peak_with_spread(row, "reserved"),
            "NVML peak used GiB per GPU (max)": gib(row.get("nvml_peak_used_gib"),
                                                     "n/a (no NVML)" if row["device"] == "cpu" else failed),
            "host RSS GiB (max over ranks)": gib(row.get("host_rss_peak_gib"), failed),
            "capacity GiB": capacity_text(row),
        })
        if is_num(row.get("host_device_copy_s")):
            rows[-1]["host<->device copies per step"] = copies_text(row)
    table = pd.DataFrame(rows)
    if "host<->device copies per step" in table:
        table["host<->device copies per step"] = table["host<->device copies per step"].fillna("-")
    return table


def copies_text(row) -> str:
    """e.g. '23.9 ms of 1.30 s, 1.03 GiB': ms and MiB where s and GiB would round a small model's copies to 0."""
    copy_s, size = row["host_device_copy_s"], row["host_device_gib"]
    time_text = f"{copy_s:.2f} s" if copy_s >= 1 else f"{copy_s * 1e3:.3g} ms"
    size_text = f"{size:.2f} GiB" if size >= 0.1 else f"{size * 1024:.1f} MiB"
    return f"{time_text} of {row['profiled_step_s']:.2f} s, {size_text}"


# ---------------------------------------------------------------- efficiency

def mfu_text(row: pd.Series, column: str) -> str:
    if row["status"] != "ok":
        return row["status"]
    if is_num(row.get(column)):
        value = row[column]
        return f"{value:.1%}" if value >= 0.001 else f"{value * 100:.2g}%"  # tiny models: keep two digits
    if row["device"] == "cpu":
        return "n/a (CPU: no peak figure)"
    name = row["gpu_model"] if isinstance(row.get("gpu_model"), str) else "an unnamed GPU"
    return f"n/a (no peak figure for {name})"


def efficiency_table(group: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, row in group.sort_values(["strategy", "gpus"], kind="stable").iterrows():
        ok = row["status"] == "ok"
        rows.append({
            "run": run_name(row),
            "device": row["gpu_model"] if isinstance(row.get("gpu_model"), str) else "CPU",
            "model GFLOP/token": (f"{row['model_flops_per_token'] / 1e9:.3g}"
                                  if is_num(row.get("model_flops_per_token")) else "unknown model shape"),
            "model TFLOP/s per GPU": f"{row['model_tflops_per_gpu']:.3g}" if ok and is_num(row.get("model_tflops_per_gpu")) else row["status"] if not ok else "n/a",
            "MFU": mfu_text(row, "mfu"),
            "hardware TFLOP/s per GPU": f"{row['hardware_tflops_per_gpu']:.3g}" if ok and is_num(row.get("hardware_tflops_per_gpu")) else row["status"] if not ok else "n/a",
            "HFU (recompute counted)": mfu_text(row, "hfu"),
            "peak used (source)": row.get("peak_source") if isinstance(row.get("peak_source"), str) else "none",
        })
    return pd.DataFrame(rows)


def peak_table() -> pd.DataFrame:
    """The whole peak table with its sources, printed once in the report."""
    return pd.DataFrame([{"GPU": p.model, "NVML name matches": p.pattern, "dense bf16 TFLOP/s": f"{p.tflops:g}",
                          "source": p.source} for p in flops.GPU_PEAKS])


# ---------------------------------------------------------------- energy

def energy_table(group: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, row in group.sort_values(["strategy", "gpus"], kind="stable").iterrows():
        ok = row["status"] == "ok"
        missing = row["status"] if not ok else ("n/a (no NVML)" if not is_num(row.get("power_mean_w")) else "n/a")
        rows.append({
            "run": run_name(row),
            "mean power W (all GPUs)": f"{row['power_mean_w']:.0f}" if ok and is_num(row.get("power_mean_w")) else missing,
            "mean GPU util %": f"{row['util_mean_pct']:.0f}" if ok and is_num(row.get("util_mean_pct")) else missing,
            "energy J (timed steps)": f"{row['energy_timed_j']:.4g}" if ok and is_num(row.get("energy_timed_j")) else missing,
            "J per token": f"{row['joules_per_token']:.3g}" if ok and is_num(row.get("joules_per_token")) else missing,
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- prediction

def prediction_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Numbers: predicted and measured peak reserved per GPU cell with a prediction, error in percent.

    CPU cells are left out: the prediction is of GPU memory, which a CPU run does not measure.
    """
    if "predicted_reserved_gib" not in df.columns and "current_predicted_reserved_gib" not in df.columns:
        return pd.DataFrame()
    df = df.copy()
    for col in ("predicted_reserved_gib", "current_predicted_reserved_gib"):
        if col not in df.columns:
            df[col] = np.nan
    predicted = df["predicted_reserved_gib"].notna() | df["current_predicted_reserved_gib"].notna()
    have = df[predicted & (df["device"] == "cuda")].copy()
    for col in ("peak_reserved_gib", "nvml_peak_used_gib", "predicted_device_total_gib"):
        if col not in have.columns:
            have[col] = np.nan
    # a failed run's peaks are where it died, not its requirement: no error figure for it
    ok = have["status"] == "ok"
    have["measured_reserved_gib"] = have["peak_reserved_gib"].where(ok)
    have["nvml_peak_used_gib"] = have["nvml_peak_used_gib"].where(ok)
    have["error_pct"] = (have["predicted_reserved_gib"] - have["measured_reserved_gib"]) / have["measured_reserved_gib"] * 100
    have["current_error_pct"] = ((have["current_predicted_reserved_gib"] - have["measured_reserved_gib"])
                                 / have["measured_reserved_gib"] * 100)
    have["device_error_pct"] = ((have["predicted_device_total_gib"].astype(float) - have["nvml_peak_used_gib"])
                                / have["nvml_peak_used_gib"] * 100)
    return have


def measured_text(value, row: pd.Series) -> str:
    if is_num(value):
        return f"{value:.2f}"
    return f"not measured ({row['status']})" if row["status"] != "ok" else "not reported"


def run_time_version(row: pd.Series) -> str:
    """The estimator version that made the stored prediction; records from before versions were stored
    predate version 2."""
    if not is_num(row.get("predicted_reserved_gib")):
        return "-"
    version = row.get("predicted_estimator_version")
    return f"v{int(version)}" if is_num(version) else "v1 (before versions)"


def prediction_table(pred: pd.DataFrame) -> pd.DataFrame:
    from bench.estimate import ESTIMATOR_VERSION

    rows = []
    for _, row in pred.iterrows():
        device_total = row["predicted_device_total_gib"]
        rows.append({
            "machine": row["machine"], "run": row["label"], "status": row["status"],
            "predicted at run time GiB": (f"{row['predicted_reserved_gib']:.2f}" if is_num(row["predicted_reserved_gib"])
                                          else "not predicted"),
            "run-time estimator": run_time_version(row),
            "measured GiB": measured_text(row["measured_reserved_gib"], row),
            "error %": f"{row['error_pct']:+.1f}" if is_num(row["error_pct"]) else "n/a",
            f"current estimator (v{ESTIMATOR_VERSION}) GiB": (f"{row['current_predicted_reserved_gib']:.2f}"
                                                             if is_num(row["current_predicted_reserved_gib"]) else "n/a"),
            "current error %": f"{row['current_error_pct']:+.1f}" if is_num(row["current_error_pct"]) else "n/a",
            "predicted NVML GiB": f"{device_total:.2f}" if is_num(device_total) else "not predicted",
            "NVML used GiB": measured_text(row["nvml_peak_used_gib"], row),
            "NVML error %": f"{row['device_error_pct']:+.1f}" if is_num(row["device_error_pct"]) else "n/a",
            "predicted to fit": {True: "yes", False: "no"}.get(row.get("predicted_fits"), "unknown"),
        })
    return pd.DataFrame(rows)
