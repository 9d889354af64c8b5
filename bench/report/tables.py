"""The report's tables: pandas DataFrames of display text, built from the per-cell figures of bench.report.metrics.

Every table cell is text so that a failed or skipped run shows its status (oom, timeout, predicted_oom,
...) instead of a blank or a zero; the CSV files next to the report carry the same text, and
``cells.csv`` the raw numbers. Every comparing table names each cell's precision policy; speedups are
against a 1-GPU baseline of the same policy, and a ratio across policies says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.report import flops, metrics, speedups, verdict
from bench.report.cautions import CLOCK_TOLERANCE, clock_warning, warnings_for  # noqa: F401 - the tables' warnings
from bench.report.text import (basis_text, duration, gib, interval_text, is_num, plain_text, policy, pooled_launches,
                               run_name, speedup_text, throughput_text, unit)
from bench.spec import TokenBudget

NO_RECORD = "no record"  # the folder holds no run of that cell: left out of the matrix, or not run (yet)
POLICY = "precision policy"


@dataclass(frozen=True)
class TableOptions:
    budget: TokenBudget | None = None
    compare: tuple[str, ...] = ()  # strategies for the head-to-head; empty = all
    compare_gpus: int | None = None  # process count for the head-to-head; None = 2, else the smallest above 1


# ---------------------------------------------------------------- grouping and warnings

def setting_groups(df: pd.DataFrame):
    """(machine, setting_key, title, rows) for each group of comparable cells, in the order first seen."""
    for (machine, key), group in df.groupby(["machine", "setting_key"], sort=False):
        yield machine, key, f"{metrics.setting_title(key)} on {machine}", group


# ---------------------------------------------------------------- verdict

INDISTINGUISHABLE = "indistinguishable from it (ratio to it [95% CI] holds 1)"


def verdict_table(group: pd.DataFrame) -> pd.DataFrame:
    """Per layout (processes, or nodes x processes per node): the fastest strategy that fits, those
    indistinguishable from it, the leanest."""
    u = unit(group["device"].iloc[0])
    found = verdict.verdicts(group)
    layout = u + "s" if all(v.nodes == 1 for v in found) else f"{u}s (nodes x {u}s per node across nodes)"
    rows = []
    for v in found:
        fastest = v.fastest
        rows.append({
            layout: v.layout,
            f"fastest that fits (tok/s/{u} [95% CI])": _verdict_entry(fastest) if fastest is not None else _no_fastest(v),
            INDISTINGUISHABLE: ("; ".join(f"{_verdict_entry(r)}, {_ratio_text(r, fastest)}" for r in v.indistinguishable)
                                or ("none" if fastest is not None else "-")),
            "lowest peak memory": _memory_entry(v.lowest_memory) if v.lowest_memory is not None else "-",
            "intervals from": _bases(v),
            "did not fit": "; ".join(f"{r['strategy']}: {_why_not(r)}" for r in v.not_fitting) or "-",
            "not measured": "; ".join(f"{r['strategy']}: {r['status']}" for r in v.not_measured) or "-",
            "mean SM clock MHz": _clock_range(verdict.at_layout(group, v.gpus, v.nodes)),
        })
    table = pd.DataFrame(rows)
    # The column only where something was stopped from outside: most reports have nothing to say in it.
    return table if any(v.not_measured for v in found) else table.drop(columns="not measured")


def _no_fastest(v: verdict.Verdict) -> str:
    """'none fits' only where something was measured not to; a layout whose cells were all stopped from
    outside (a deadline's interrupted launch) has no answer yet."""
    return "none fits" if v.not_fitting or not v.not_measured else "not measured yet"


def _verdict_entry(row: pd.Series) -> str:
    return f"{row['strategy']} ({policy(row)}): {row['real_tokens_per_s_per_gpu']:,.0f} {interval_text(row)}"


def _ratio_text(row: pd.Series, fastest: pd.Series) -> str:
    """'0.99x [0.97-1.01]' of the fastest; where a side has no interval, the overlap decided: say so."""
    ratio = verdict.ratio_to(row, fastest)
    value = row["real_tokens_per_s_per_gpu"] / fastest["real_tokens_per_s_per_gpu"]
    if ratio is None:
        return f"{value:.2f}x [no interval: the figures overlap]"
    return f"{value:.2f}x [{ratio.low:.2f}-{ratio.high:.2f}]"


def _memory_entry(row: pd.Series) -> str:
    column = verdict.memory_column(row["device"])
    what = "GiB reserved" if row["device"] == "cuda" else "GiB host RSS"
    speed = f"{row['real_tokens_per_s_per_gpu']:,.0f} {interval_text(row)}"
    return f"{row['strategy']} ({policy(row)}): {row[column]:.1f} {what}, {speed}"


def _why_not(row: pd.Series) -> str:
    if row["status"] != "ok":
        return row["status"]
    if failed := verdict.failed_launches(row):
        return failed
    return "over the cap" if is_num(row.get("gpu_memory_gib")) else "over the card"


def _bases(v: verdict.Verdict) -> str:
    rows = [r for r in (v.fastest, *v.indistinguishable, v.lowest_memory) if r is not None]
    bases = sorted({basis_text(r) for r in rows})
    if not bases:
        return "-"
    text = "; ".join(bases)
    if any(pooled_launches(r) == 1 for r in rows):
        text += " (within one launch: launch-to-launch variation not covered)"
    return text


def _clock_range(rows: pd.DataFrame) -> str:
    spread = metrics.clock_spread(rows)
    if spread is None:
        clocks = rows["sm_clock_mean_mhz"].dropna() if "sm_clock_mean_mhz" in rows.columns else []
        return f"{clocks.iloc[0]:.0f}" if len(clocks) else "n/a"
    text = f"{spread[0]:.0f}-{spread[1]:.0f}"
    return text + f" (differ {spread[1] / spread[0] - 1:.1%}: warning)" if clock_warning(rows) else text


# ---------------------------------------------------------------- scaling

def scaling_table(group: pd.DataFrame) -> pd.DataFrame:
    """Rows strategies; per process count: tokens/s per GPU with its interval, speedup against the same-policy
    1-GPU baseline, and the ratio to the plain 1-process run (labelled cross-policy where it is)."""
    u = unit(group["device"].iloc[0])
    plain = speedups.plain_baseline(group)
    plain_name = f"{plain['strategy']}@1" if plain is not None else "plain@1"
    rows = {}
    for strategy in dict.fromkeys(group["strategy"]):
        mine = group[group["strategy"] == strategy]
        out = {POLICY: policy(mine.iloc[-1])}
        for n in sorted(group["gpus"].unique()):
            cell = mine[mine["gpus"] == n]
            row = cell.iloc[-1] if len(cell) else None
            out[f"{n} {u}: tok/s/{u} [95% CI]"] = throughput_text(row) if row is not None else NO_RECORD
            if n > 1:
                out[f"{n} {u}: vs same-policy 1 {u}"] = speedup_text(row) if row is not None else NO_RECORD
            out[f"{n} {u}: vs {plain_name} (plain)"] = plain_text(row, plain) if row is not None else NO_RECORD
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
    """Each chosen strategy at N GPUs of one node beside its same-policy 1-GPU baseline; None when nothing
    compares. Cells over several nodes have the across-nodes table (report/nodes.py): N GPUs a node there is
    another layout, not another strategy at N."""
    n = compare_count(group, options.compare_gpus)
    if n is None:
        return None
    others = verdict.at_layout(group, n)
    if options.compare:
        others = others[others["strategy"].isin(options.compare)]
    if not len(others):
        return None
    pairs = [(row, speedups.same_policy_baseline(row, group)) for _, row in others.iterrows()]
    bases = {b["cell_id"]: b for _, b in pairs if b is not None}
    if not bases:
        return None
    rows = [head_to_head_row(b, b, options.budget) for b in bases.values()]
    rows += [head_to_head_row(row, base, options.budget) for row, base in pairs]
    return pd.DataFrame(rows)


def head_to_head_row(row: pd.Series, base: pd.Series | None, budget: TokenBudget | None) -> dict:
    ok = row["status"] == "ok"
    memory_col = verdict.memory_column(row["device"])
    memory_name = "peak reserved GiB" if row["device"] == "cuda" else "peak host RSS GiB"
    is_base = base is not None and row["cell_id"] == base["cell_id"]
    out = {
        "run": run_name(row), POLICY: policy(row),
        "baseline (same policy)": "(a baseline)" if is_base else (run_name(base) if base is not None else "none"),
        "step time s [95% CI]": step_time_text(row) if ok else row["status"],
        "step time p10-p90 of steps (within a launch)": (f"{row['step_time_p10_s']:.3g}-{row['step_time_p90_s']:.3g}"
                                                         if ok else row["status"]),
        f"tok/s/{unit(row['device'])} [95% CI]": throughput_text(row),
        "speedup vs baseline": "1.00x" if is_base and ok else speedup_text(row),
        memory_name: gib(row.get(memory_col), row["status"] if not ok else "n/a"),
    }
    if budget is not None:
        total = budget.tokens * budget.epochs
        out[f"time for {tokens_text(total)} tokens"] = (duration(total / row["real_tokens_per_s"]) if ok
                                                         else row["status"])
        out["baseline -> this"] = projection_text(row, base, total)
    return out


def step_time_text(row: pd.Series) -> str:
    """'1.3 [1.28-1.32]', or '[no interval]' where the launch's timing admitted none (n_eff < 6)."""
    low, high = row.get("step_time_ci_low_s"), row.get("step_time_ci_high_s")
    bounds = f"[{low:.3g}-{high:.3g}]" if is_num(low) and is_num(high) else "[no interval]"
    return f"{row['step_time_s']:.3g} {bounds}"


def projection_text(row: pd.Series, base: pd.Series | None, total_tokens: float) -> str:
    """'8 h 43 min -> 4 h 20 min': the same-policy baseline's time to train, then this run's."""
    if base is not None and row["cell_id"] == base["cell_id"]:
        return "(the baseline)"
    if row["status"] != "ok":
        return row["status"]
    if base is None:
        return "no same-policy baseline"
    return f"{duration(total_tokens / base['real_tokens_per_s'])} -> {duration(total_tokens / row['real_tokens_per_s'])}"


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


def training_peak_text(row: pd.Series) -> str:
    value = row.get("training_peak_reserved_gib")
    if is_num(value):
        return f"{value:.2f}"
    if row["device"] == "cpu":
        return "n/a (CPU)"
    return row["status"] if row["status"] != "ok" else "not recorded (older record)"


def memory_table(group: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, row in group.sort_values(["strategy", "gpus"], kind="stable").iterrows():
        failed = row["status"] if row["status"] != "ok" else "not reported"
        rows.append({
            "run": run_name(row), POLICY: policy(row), "status": row["status"],
            "torch peak allocated GiB": peak_with_spread(row, "allocated"),
            "torch peak reserved GiB (whole run)": peak_with_spread(row, "reserved"),
            "torch peak reserved GiB (training steps)": training_peak_text(row),
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


def _rate(row: pd.Series, column: str) -> str:
    ok = row["status"] == "ok"
    return f"{row[column]:.3g}" if ok and is_num(row.get(column)) else row["status"] if not ok else "n/a"


def efficiency_table(group: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, row in group.sort_values(["strategy", "gpus"], kind="stable").iterrows():
        rows.append({
            "run": run_name(row), POLICY: policy(row),
            "device": row["gpu_model"] if isinstance(row.get("gpu_model"), str) else "CPU",
            "attention length": f"{row['attention_length']:.0f}" if is_num(row.get("attention_length")) else "unknown",
            "model GFLOP/real token (causal)": (f"{row['model_flops_per_token'] / 1e9:.3g}"
                                                if is_num(row.get("model_flops_per_token")) else "unknown model shape"),
            "model TFLOP/s per GPU": _rate(row, "model_tflops_per_gpu"),
            "MFU (causal attn.)": mfu_text(row, "mfu"),
            "MFU (full attn.)": mfu_text(row, "mfu_full_attn"),
            "hardware TFLOP/s per GPU": _rate(row, "hardware_tflops_per_gpu"),
            "HFU (recompute, padding counted)": mfu_text(row, "hfu"),
            "peak used (source)": row.get("peak_source") if isinstance(row.get("peak_source"), str) else "none",
        })
    return pd.DataFrame(rows)


def peak_table() -> pd.DataFrame:
    """The whole peak table with its sources, printed once in the report."""
    return pd.DataFrame([{"GPU": p.model, "NVML name matches": p.pattern, "dense bf16 TFLOP/s": f"{p.tflops:g}",
                          "source": p.source} for p in flops.GPU_PEAKS])


# ---------------------------------------------------------------- energy and card state

def energy_table(group: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, row in group.sort_values(["strategy", "gpus"], kind="stable").iterrows():
        ok = row["status"] == "ok"
        missing = row["status"] if not ok else ("n/a (no NVML)" if not is_num(row.get("power_mean_w")) else "n/a")
        rows.append({
            "run": run_name(row), POLICY: policy(row),
            "mean power W (all GPUs)": f"{row['power_mean_w']:.0f}" if ok and is_num(row.get("power_mean_w")) else missing,
            "mean GPU util %": f"{row['util_mean_pct']:.0f}" if ok and is_num(row.get("util_mean_pct")) else missing,
            "energy J (timed steps)": f"{row['energy_timed_j']:.4g}" if ok and is_num(row.get("energy_timed_j")) else missing,
            "J per real token": f"{row['joules_per_token']:.3g}" if ok and is_num(row.get("joules_per_token")) else missing,
        })
    return pd.DataFrame(rows)


def throttle_text(row: pd.Series) -> str:
    seen = row.get("throttle_reasons_seen")
    seen = seen if isinstance(seen, str) else ""
    if is_num(row.get("throttled_share")):
        return f"{row['throttled_share']:.0%}" + (f" ({seen})" if seen else "")
    return f"unknown share (older record; seen: {seen})" if seen else "unknown share (older record; none seen)"


def host_text(row: pd.Series) -> str:
    """'41 / 0.3': the host's CPU time busy and stolen by the hypervisor over the timed window, in %."""
    if not is_num(row.get("host_busy_share")):
        return "n/a (older record)"
    stolen = f"{row['steal_share']:.1%}"[:-1] if is_num(row.get("steal_share")) else "n/a"
    return f"{row['host_busy_share']:.0%}"[:-1] + f" / {stolen}"


def steady_host_text(row: pd.Series) -> str:
    """'74 / 6,300': the share of timed steps on a slow host (%) and the real tokens/s per GPU over the others
    (bench/report/host_steady.py); records from before the per-step probe have neither."""
    if not is_num(row.get("host_slow_step_share")):
        return "n/a (older record)"
    steady = row.get("real_tokens_per_s_host_steady")
    per_gpu = f"{steady / row['processes']:,.0f}" if is_num(steady) else "too few steady steps"
    return f"{row['host_slow_step_share']:.0%}"[:-1] + f" / {per_gpu}"


def card_state_table(group: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, row in group.sort_values(["strategy", "gpus"], kind="stable").iterrows():
        measured = row["status"] == "ok" and is_num(row.get("sm_clock_mean_mhz"))
        missing = row["status"] if row["status"] != "ok" else "n/a (no NVML)"
        rows.append({
            "run": run_name(row), POLICY: policy(row),
            "mean SM clock MHz (timed window)": f"{row['sm_clock_mean_mhz']:.0f}" if measured else missing,
            "timed samples throttled (power/thermal)": throttle_text(row) if measured else missing,
            "card busy % (NVML util)": f"{row['util_mean_pct']:.0f}" if measured and is_num(row.get("util_mean_pct"))
            else missing,
            "host CPU busy / stolen %": host_text(row) if row["status"] == "ok" else row["status"],
            "host CPU probe ms": (f"{row['cpu_probe_ms']:.2f}" if is_num(row.get("cpu_probe_ms")) else "n/a (older record)")
            if row["status"] == "ok" else row["status"],
            "timed steps on a slow host % / tok/s per GPU on a steady host": steady_host_text(row)
            if row["status"] == "ok" else row["status"],
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
