"""Derived figures, always recomputed from the raw per-rank, per-step records.

Definitions (the report states them):
- step time: wall time of one optimizer step, synchronised; per step the slowest rank counts; the
  median over timed steps is reported, with p10-p90 spread.
- throughput: tokens per step over all ranks / step time; per GPU = that / number of processes.
- speedup at N: throughput over the 1-process cell's of the same model and training settings;
  efficiency = speedup / N.
"""

from __future__ import annotations

import json
from statistics import median

import numpy as np
import pandas as pd

from bench.matrix import CellSettings
from bench.results import RunRecord

PLAIN_STRATEGIES = ("single", "ddp")  # at one process neither wraps the model: what a user runs today


def timed_step_times(record: RunRecord) -> list[float]:
    """Per timed step, the slowest rank's time."""
    per_rank = [[s["time_s"] for s in r["steps"] if s["phase"] == "timed"] for r in record.ranks]
    if not per_rank or not all(per_rank):
        return []
    n = min(len(p) for p in per_rank)
    return [max(p[i] for p in per_rank) for i in range(n)]


def tokens_per_step(record: RunRecord, real: bool = False) -> float:
    key = "real_tokens" if real else "tokens"
    per_rank = [[s[key] for s in r["steps"] if s["phase"] == "timed"] for r in record.ranks]
    return float(sum(median(p) for p in per_rank if p))


def figures(record: RunRecord) -> dict:
    """One row of derived figures for a record (empty figures for failed runs)."""
    cell = CellSettings.model_validate(record.settings)
    row = {
        "cell_id": record.cell_id, "repeat": record.repeat, "label": record.label, "status": record.status,
        "model": cell.model, "adapter": cell.adapter.type, "strategy": cell.strategy, "gpus": cell.gpus,
        "device": cell.device, "setting_key": cell.setting_key, "gpu_memory_gib": cell.gpu_memory_gib,
        "hardware": record.env.get("hardware", "unknown"), "gpu_model": record.env.get("gpu_model"),
        "wall_s": record.wall_s, "first_step_s": record.first_step_s,
        "error": record.error.message.splitlines()[0][:120] if record.error else None,
    }
    times = timed_step_times(record)
    if record.status != "ok" or not times:
        return row
    tokens = tokens_per_step(record)
    arr = np.asarray(times)
    step = float(np.median(arr))
    row.update({
        "step_time_s": step,
        "step_time_p10_s": float(np.percentile(arr, 10)),
        "step_time_p90_s": float(np.percentile(arr, 90)),
        "step_time_cv": float(arr.std() / arr.mean()) if len(arr) > 1 else 0.0,
        "timed_steps": len(arr),
        "tokens_per_step": tokens,
        "real_tokens_per_step": tokens_per_step(record, real=True),
        "tokens_per_s": tokens / step,
        "tokens_per_s_per_gpu": tokens / step / cell.gpus,
        # throughput spread from the step-time spread (slow steps give the low end)
        "tokens_per_s_p10": tokens / float(np.percentile(arr, 90)),
        "tokens_per_s_p90": tokens / float(np.percentile(arr, 10)),
        "samples_per_s": tokens / step / cell.train.seq_len,
        "host_rss_peak_gib": max(r.get("host_rss_peak_bytes", 0) for r in record.ranks) / 2**30,
        "final_loss": record.ranks[0]["steps"][-1]["loss"],
    })
    alloc = [r["torch_peak_allocated_bytes"] for r in record.ranks if "torch_peak_allocated_bytes" in r]
    reserved = [r["torch_peak_reserved_bytes"] for r in record.ranks if "torch_peak_reserved_bytes" in r]
    if alloc:
        row.update({"peak_allocated_gib": max(alloc) / 2**30, "peak_reserved_gib": max(reserved) / 2**30,
                    "peak_allocated_rank_spread_gib": (max(alloc) - min(alloc)) / 2**30,
                    "gpu_total_gib": record.ranks[0].get("gpu_total_bytes", 0) / 2**30})
    return row


def frame(records: list[RunRecord]) -> pd.DataFrame:
    return pd.DataFrame([figures(r) for r in records])


def latest_per_cell(df: pd.DataFrame) -> pd.DataFrame:
    """Several runs of one cell (retries) -> the last one; repeats are averaged by aggregate_repeats."""
    return df.groupby(["cell_id", "repeat"], sort=False).tail(1)


def aggregate_repeats(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: median throughput over ok repeats; status ok if any repeat was ok."""
    df = latest_per_cell(df)
    rows = []
    for _, group in df.groupby("cell_id", sort=False):
        ok = group[group["status"] == "ok"]
        row = (ok if len(ok) else group).iloc[-1].to_dict()
        if len(ok) > 1:
            for col in ("tokens_per_s", "tokens_per_s_per_gpu", "step_time_s"):
                row[col] = float(ok[col].median())
            row["repeats_ok"] = len(ok)
            row["tokens_per_s_repeat_cv"] = float(ok["tokens_per_s"].std() / ok["tokens_per_s"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def add_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """Speedup and efficiency against (a) the same strategy at 1 process, (b) the plain 1-process run."""
    df = df.copy()
    for col in ("speedup_vs_same_1", "efficiency_vs_same_1", "speedup_vs_plain_1", "efficiency_vs_plain_1"):
        df[col] = np.nan
    for (_hw, _key), group in df.groupby(["hardware", "setting_key"], sort=False):
        ok = group[group["status"] == "ok"]
        ones = ok[ok["gpus"] == 1]
        plain = ones[ones["strategy"].isin(PLAIN_STRATEGIES)]
        plain_tps = float(plain["tokens_per_s"].iloc[0]) if len(plain) else np.nan
        for idx, row in ok.iterrows():
            same = ones[ones["strategy"] == row["strategy"]]
            if len(same):
                df.loc[idx, "speedup_vs_same_1"] = row["tokens_per_s"] / float(same["tokens_per_s"].iloc[0])
            df.loc[idx, "speedup_vs_plain_1"] = row["tokens_per_s"] / plain_tps
        df.loc[ok.index, "efficiency_vs_same_1"] = df.loc[ok.index, "speedup_vs_same_1"] / ok["gpus"]
        df.loc[ok.index, "efficiency_vs_plain_1"] = df.loc[ok.index, "speedup_vs_plain_1"] / ok["gpus"]
    return df


def setting_title(setting_key: str) -> str:
    """A short human title for a setting group: model, adapter, sequence and batch shape."""
    s = json.loads(setting_key)
    t, a = s["train"], s["adapter"]
    adapter = "full fine-tune" if a["type"] == "none" else f"{a['type'].upper()} r={a['r']}"
    cap = f", capped at {s['gpu_memory_gib']:g} GiB" if s.get("gpu_memory_gib") else ""
    ckpt = ", grad ckpt" if t["grad_checkpointing"] else ""
    return (f"{s['model']} {adapter}, seq {t['seq_len']} x mb {t['micro_batch']} x ga {t['grad_accum']}, "
            f"{t['precision']}, {t['optimizer']}{ckpt}{cap} [{s['device']}]")
