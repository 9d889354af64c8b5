"""The report's plots (matplotlib, Agg backend): each one readable on its own, written as a PNG.

Every function takes the per-cell figures of one group, writes one file and returns its path, or None
when there is nothing to draw (no ok cell, no NVML trace ...), so that the report leaves the plot out.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402 - matplotlib's own dependency

from bench.report import metrics  # noqa: E402
from bench.report.tables import is_num, run_name, unit  # noqa: E402

DPI = 100  # small files: the HTML embeds every PNG


def _save(fig, path: Path) -> Path:
    """A PNG of 128 colours: a line plot needs no more, and the file is about a quarter of a full-colour one
    (the HTML report embeds every plot, and the committed reports travel with the tree)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    plt.close(fig)
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(colors=128).save(path, optimize=True)
    return path


def _wrap(title: str, width: int = 70) -> str:
    words, lines, line = title.split(), [], ""
    for w in words:
        if len(line) + len(w) > width:
            lines.append(line)
            line = ""
        line += (" " if line else "") + w
    return "\n".join(lines + [line])


def scaling_curves(group: pd.DataFrame, title: str, path: Path) -> Path | None:
    """Real tokens/s (all ranks) vs process count per strategy, 95 % interval bars, and a dotted ideal line
    from each strategy's own 1-process point (same strategy, same precision policy)."""
    ok = group[group["status"] == "ok"]
    if not len(ok):
        return None
    u = unit(group["device"].iloc[0])
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    counts = sorted(group["gpus"].unique())
    for strategy, rows in ok.groupby("strategy", sort=False):
        rows = rows.sort_values("gpus")
        y = rows[metrics.THROUGHPUT].to_numpy()
        bounds = [metrics.per_gpu_interval(r) or (r["real_tokens_per_s_per_gpu"],) * 2 for _, r in rows.iterrows()]
        lo = np.array([b[0] for b in bounds]) * rows["gpus"].to_numpy()
        hi = np.array([b[1] for b in bounds]) * rows["gpus"].to_numpy()
        yerr = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
        line = ax.errorbar(rows["gpus"], y, yerr=yerr, marker="o", capsize=3,
                           label=f"{strategy} ({rows['precision_policy'].iloc[0]})")
        one = rows[rows["gpus"] == 1]
        if len(one) and len(counts) > 1:
            ax.plot(counts, [float(one[metrics.THROUGHPUT].iloc[0]) * n for n in counts], ":", linewidth=0.8,
                    color=line[0].get_color())
    failed = group[group["status"] != "ok"]
    for k, (_, row) in enumerate(failed.iterrows()):  # failed cells: marked on the x axis with their status
        ax.annotate(f"{row['strategy']}: {row['status']}", (row["gpus"], 0), xytext=(0, 8 + 10 * (k % 4)),
                    textcoords="offset points", fontsize=7, color="firebrick", ha="center")
    ax.set_xticks(counts)
    ax.set_xlabel(f"number of {u}s")
    ax.set_ylabel("real tokens/s (all ranks), 95% CI")
    ax.set_ylim(bottom=0)
    ax.set_title(_wrap(f"Scaling (dotted: linear from the same strategy at 1): {title}"), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def node_scaling_curves(group: pd.DataFrame, title: str, path: Path) -> Path | None:
    """Across nodes: real tokens/s (all ranks) vs node count, one line per strategy and processes per node,
    95 % interval bars, a dotted ideal line from the same strategy at one node with as many processes per
    node. None without an ok cell of several nodes (inside one node is scaling_curves' plot)."""
    ok = group[(group["status"] == "ok") & group["nodes"].notna()]
    multi = ok.groupby(["strategy", "gpus"], sort=False).filter(lambda rows: bool((rows["nodes"] > 1).any()))
    if not len(multi):
        return None
    u = unit(group["device"].iloc[0])
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    counts = sorted(int(n) for n in group["nodes"].dropna().unique())
    for (strategy, per_node), rows in multi.groupby(["strategy", "gpus"], sort=False):
        rows = rows.sort_values("nodes")
        y = rows[metrics.THROUGHPUT].to_numpy(dtype=float)
        low = rows["real_tokens_per_s_ci_low"].fillna(rows[metrics.THROUGHPUT]).to_numpy(dtype=float)
        high = rows["real_tokens_per_s_ci_high"].fillna(rows[metrics.THROUGHPUT]).to_numpy(dtype=float)
        yerr = np.vstack([np.clip(y - low, 0, None), np.clip(high - y, 0, None)])
        line = ax.errorbar(rows["nodes"], y, yerr=yerr, marker="o", capsize=3,
                           label=f"{strategy}, {int(per_node)} {u}s per node")
        one = rows[rows["nodes"] == 1]
        if len(one):
            ax.plot(counts, [float(one[metrics.THROUGHPUT].iloc[0]) * n for n in counts], ":", linewidth=0.8,
                    color=line[0].get_color())
    ax.set_xticks(counts)
    ax.set_xlabel("number of nodes")
    ax.set_ylabel("real tokens/s (all ranks), 95% CI")
    ax.set_ylim(bottom=0)
    ax.set_title(_wrap(f"Scaling across nodes (dotted: linear from the same strategy at 1 node): {title}"),
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def memory_column(group: pd.DataFrame) -> tuple[str, str]:
    """What to draw as 'peak memory': torch reserved on GPU, host RSS on CPU (no device memory there)."""
    if group["device"].iloc[0] == "cuda":
        return "peak_reserved_gib", "peak torch reserved GiB (max over ranks)"
    return "host_rss_peak_gib", "peak host RSS GiB per process (max over ranks)"


def capacity_gib(group: pd.DataFrame) -> tuple[float | None, str]:
    caps = group["gpu_memory_gib"].dropna() if "gpu_memory_gib" in group else pd.Series(dtype=float)
    if len(caps):
        return float(caps.iloc[0]), f"cap {caps.iloc[0]:g} GiB"
    totals = group["gpu_total_gib"].dropna() if "gpu_total_gib" in group else pd.Series(dtype=float)
    if len(totals):
        return float(totals.max()), f"card {totals.max():.1f} GiB"
    return None, ""


def memory_bars(group: pd.DataFrame, title: str, path: Path) -> Path | None:
    """Peak memory per strategy (groups) and process count (bars), capacity line; failed bars say why."""
    column, label = memory_column(group)
    if column not in group.columns or group[column].isna().all():
        return None
    u = unit(group["device"].iloc[0])
    strategies = list(dict.fromkeys(group["strategy"]))
    counts = sorted(group["gpus"].unique())
    width = 0.8 / len(counts)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(strategies) + 2), 4.8))
    top = float(group[column].max())
    for j, n in enumerate(counts):
        xs, heights = [], []
        for i, strategy in enumerate(strategies):
            cell = group[(group["strategy"] == strategy) & (group["gpus"] == n)]
            if not len(cell):
                continue
            row = cell.iloc[-1]
            x = i + (j - (len(counts) - 1) / 2) * width
            value = row.get(column)
            if is_num(value):
                xs.append(x)
                heights.append(value)
            else:
                ax.text(x, top * 0.02, row["status"], rotation=90, ha="center", va="bottom", fontsize=8,
                        color="firebrick")
        ax.bar(xs, heights, width=width * 0.95, label=f"{n} {u}")
    cap, cap_label = capacity_gib(group)
    if cap is not None:
        ax.axhline(cap, color="firebrick", linestyle="--", linewidth=1, label=cap_label)
    ax.set_xticks(range(len(strategies)), strategies)
    ax.set_ylabel(label)
    ax.set_title(_wrap(f"Peak memory: {title}"), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def throughput_vs_memory(group: pd.DataFrame, title: str, path: Path) -> Path | None:
    """One labelled point per ok cell: the speed/memory trade-off; up and to the left is better."""
    column, label = memory_column(group)
    ok = group[(group["status"] == "ok")]
    if column not in ok.columns:
        return None
    ok = ok[ok[column].notna()]
    if not len(ok):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for gpus, rows in ok.groupby("gpus"):
        ax.scatter(rows[column], rows["real_tokens_per_s_per_gpu"], s=40, label=f"{gpus} {unit(rows['device'].iloc[0])}")
        for _, row in rows.iterrows():
            ax.annotate(run_name(row), (row[column], row["real_tokens_per_s_per_gpu"]), xytext=(4, 4),
                        textcoords="offset points", fontsize=7)
    cap, cap_label = capacity_gib(group)
    if cap is not None:
        ax.axvline(cap, color="firebrick", linestyle="--", linewidth=1, label=cap_label)
    ax.set_xlabel(label)
    ax.set_ylabel(f"real tokens/s per {unit(group['device'].iloc[0])}")
    ax.set_title(_wrap(f"Throughput vs peak memory: {title}"), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def nvml_trace(record_nvml: dict, started_at: float, title: str, path: Path) -> Path | None:
    """Memory used, power and utilisation over time, one line per GPU, the timed steps shaded."""
    trace = (record_nvml or {}).get("trace") or {}
    t = trace.get("t") or []
    gpus = trace.get("gpus") or {}
    if len(t) < 2 or not gpus:
        return None
    panels = [("mem_used_mib", "memory used GiB", 1 / 1024), ("power_w", "power W", 1.0),
              ("util_pct", "utilisation %", 1.0)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 7), sharex=True)
    window = _window_offsets(record_nvml, started_at, t)
    for ax, (key, label, scale) in zip(axes, panels):
        for index, series in gpus.items():
            values = series.get(key) or []
            n = min(len(values), len(t))
            if n:
                ax.plot(t[:n], np.asarray(values[:n], dtype=float) * scale, label=f"GPU {index}", linewidth=1)
        if window:
            ax.axvspan(*window, color="tab:green", alpha=0.12, label="timed steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    axes[-1].set_xlabel("seconds since sampling started")
    axes[0].set_title(_wrap(f"NVML trace: {title}"), fontsize=9)
    return _save(fig, path)


def _window_offsets(nvml: dict, started_at: float, t: list[float]) -> tuple[float, float] | None:
    """The timed window in trace time, if it can be placed (the trace counts from the sampler's start)."""
    window = nvml.get("timed_window")
    if not window:
        return None
    origin = nvml.get("started_at", started_at)
    lo, hi = window[0] - origin, window[1] - origin
    return (lo, hi) if t[0] - 1 <= lo < hi <= t[-1] + 1 else None


def prediction_errors(pred: pd.DataFrame, path: Path) -> Path | None:
    series = {label: pred[col].dropna() for col, label in
              (("current_error_pct", "current estimator"), ("error_pct", "at run time")) if col in pred}
    series = {label: s for label, s in series.items() if len(s)}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    everything = pd.concat(series.values())
    bins = np.linspace(min(everything.min(), -10), max(everything.max(), 10), 21)
    for (label, errors), color in zip(series.items(), ("tab:blue", "tab:gray")):
        ax.hist(errors, bins=bins, color=color, alpha=0.6, edgecolor="white",
                label=f"{label}: median {errors.median():+.1f}%, worst {errors.abs().max():.1f}%")
    ax.axvline(0, color="black", linewidth=1)
    for edge in (-10, 10):
        ax.axvline(edge, color="tab:red", linestyle=":", linewidth=1)
    ax.legend(fontsize=8)
    ax.set_xlabel("prediction error % ((predicted - measured) / measured, torch peak reserved)")
    ax.set_ylabel("cells")
    ax.set_title(f"Memory prediction error over {len(everything.index.unique())} cells (dotted: +-10% target)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)
