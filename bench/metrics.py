"""Derived figures, always recomputed from the raw per-rank, per-step records.

Definitions (the report states them):
- step time: wall time of one optimizer step, synchronised; per step the slowest rank counts; the
  median over timed steps is reported, with p10-p90 spread.
- throughput: tokens per step over all ranks / step time; per GPU = that / number of processes.
- speedup at N: throughput over a 1-process cell of the same model and training settings on the same
  kind of GPU (or CPU), against two baselines: the same strategy at 1 process, and the plain 1-process
  run (``single``, or ``ddp`` at 1 process, which wraps nothing); efficiency = speedup / N.
- model TFLOP/s and MFU: see bench/flops.py for the FLOP convention and the peak table.
- energy per token: NVML energy over the timed window / (tokens per step x timed steps).
"""

from __future__ import annotations

import json
from statistics import median

import numpy as np
import pandas as pd

from bench import flops
from bench.matrix import CellSettings
from bench.results import RunRecord

PLAIN_STRATEGIES = ("single", "ddp")  # at one process neither wraps the model: what a user runs today
# Throughput-like figures that are medians over repeats (one repeat = one fresh launch of the cell).
REPEAT_MEDIAN_COLUMNS = ("tokens_per_s", "tokens_per_s_per_gpu", "real_tokens_per_s", "step_time_s",
                         "joules_per_token", "power_mean_w")


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


def gpu_name(record: RunRecord) -> str | None:
    """The card the cell ran on, as NVML/torch name it; None on CPU."""
    for rank in record.ranks:
        if rank.get("gpu_name"):
            return rank["gpu_name"]
    per_gpu = (record.nvml or {}).get("per_gpu") or []
    if per_gpu and per_gpu[0].get("name"):
        return per_gpu[0]["name"]
    return record.env.get("gpu_model")


def figures(record: RunRecord) -> dict:
    """One row of derived figures for a record (empty figures for failed runs)."""
    cell = CellSettings.model_validate(record.settings)
    card = gpu_name(record)
    row = {
        "cell_id": record.cell_id, "repeat": record.repeat, "label": record.label, "status": record.status,
        "model": cell.model, "adapter": cell.adapter.type, "strategy": cell.strategy, "gpus": cell.gpus,
        "device": cell.device, "setting_key": cell.setting_key, "gpu_memory_gib": cell.gpu_memory_gib,
        "hardware": record.env.get("hardware", "unknown"), "gpu_model": card,
        # what must match for two cells to be compared: the card (1 GPU of a 1- or 8-GPU host alike) or the CPU
        "machine": card or record.env.get("hardware", "unknown"),
        "wall_s": record.wall_s, "first_step_s": record.first_step_s,
        "error": record.error.message.splitlines()[0][:120] if record.error and record.error.message else None,
    }
    row.update(_memory_figures(record))
    row.update(_prediction_figures(record))
    row.update(_flop_figures(record, card))
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
        "real_tokens_per_s": tokens_per_step(record, real=True) / step,
        "tokens_per_s_per_gpu": tokens / step / cell.gpus,
        # throughput spread from the step-time spread (slow steps give the low end)
        "tokens_per_s_p10": tokens / float(np.percentile(arr, 90)),
        "tokens_per_s_p90": tokens / float(np.percentile(arr, 10)),
        "tokens_per_s_per_gpu_p10": tokens / float(np.percentile(arr, 90)) / cell.gpus,
        "tokens_per_s_per_gpu_p90": tokens / float(np.percentile(arr, 10)) / cell.gpus,
        "samples_per_s": tokens / step / cell.train.seq_len,
        "final_loss": record.ranks[0]["steps"][-1]["loss"],
    })
    row.update(_energy_figures(record, tokens * len(arr)))
    return row


def _memory_figures(record: RunRecord) -> dict:
    """Peaks over ranks (torch, host) and over GPUs (NVML); kept for failed runs too (an OOM's NVML peak)."""
    out = {}
    rss = [r["host_rss_peak_bytes"] for r in record.ranks if r.get("host_rss_peak_bytes")]
    if rss:
        out["host_rss_peak_gib"] = max(rss) / 2**30
    alloc = [r["torch_peak_allocated_bytes"] for r in record.ranks if "torch_peak_allocated_bytes" in r]
    reserved = [r["torch_peak_reserved_bytes"] for r in record.ranks if "torch_peak_reserved_bytes" in r]
    if alloc:
        out.update({"peak_allocated_gib": max(alloc) / 2**30,
                    "peak_allocated_rank_spread_gib": (max(alloc) - min(alloc)) / 2**30})
    if reserved:
        out.update({"peak_reserved_gib": max(reserved) / 2**30,
                    "peak_reserved_rank_spread_gib": (max(reserved) - min(reserved)) / 2**30})
    traffic = [r["host_device_traffic"] for r in record.ranks
               if isinstance(r.get("host_device_traffic"), dict) and "htod_s" in r["host_device_traffic"]]
    if traffic:  # offloading strategies: one profiled step per rank (bench/transfers.py); the slowest rank
        worst = max(traffic, key=lambda t: t["htod_s"] + t["dtoh_s"])
        out.update({"host_device_copy_s": worst["htod_s"] + worst["dtoh_s"],
                    "host_device_gib": (worst["htod_bytes"] + worst["dtoh_bytes"]) / 2**30,
                    "profiled_step_s": worst["step_s"]})
    totals = [r["gpu_total_bytes"] for r in record.ranks if r.get("gpu_total_bytes")]
    per_gpu = (record.nvml or {}).get("per_gpu") or []
    nvml_peaks = [g["mem_used_peak_bytes"] for g in per_gpu if g.get("mem_used_peak_bytes") is not None]
    if nvml_peaks:
        out["nvml_peak_used_gib"] = max(nvml_peaks) / 2**30
    totals += [g["mem_total_bytes"] for g in per_gpu if g.get("mem_total_bytes")]
    if totals:
        out["gpu_total_gib"] = max(totals) / 2**30
    return out


def _prediction_figures(record: RunRecord) -> dict:
    out = {}
    if (current := _current_prediction_gib(record)) is not None:
        out["current_predicted_reserved_gib"] = current
    pred = record.prediction or {}
    if pred.get("peak_reserved_gib") is None:
        return out
    return {**out, "predicted_reserved_gib": float(pred["peak_reserved_gib"]), "predicted_fits": pred.get("fits"),
            "predicted_estimator_version": pred.get("estimator_version"),
            "predicted_capacity_gib": pred.get("capacity_gib"),
            "predicted_device_total_gib": pred.get("device_total_gib")}  # compared with NVML used


def _current_prediction_gib(record: RunRecord) -> float | None:
    """What the estimator predicts now for the same GPU cell, by the path `bench estimate-check` takes.

    A record keeps the prediction made when it ran, never rewritten; the estimator improves after
    measurements, so the report shows both and holds the current one to account.
    """
    from bench.estimate_check import predict_for_record

    try:
        prediction = predict_for_record(record)
    except Exception:  # noqa: BLE001 - an unpredictable cell (unreadable user config) just has no figure
        return None
    return prediction.peak_reserved_gib if prediction else None


def _energy_figures(record: RunRecord, timed_tokens: float) -> dict:
    nvml = record.nvml or {}
    per_gpu = nvml.get("per_gpu") or []
    out = {}
    powers = [g["power_mean_w"] for g in per_gpu if g.get("power_mean_w") is not None]
    if powers:
        out["power_mean_w"] = float(sum(powers))  # all GPUs of the cell together
    utils = [g["util_mean_pct"] for g in per_gpu if g.get("util_mean_pct") is not None]
    if utils:
        out["util_mean_pct"] = float(np.mean(utils))
    energy = nvml.get("energy_timed_j")
    if energy is None and per_gpu and all(g.get("energy_timed_j") is not None for g in per_gpu):
        energy = sum(g["energy_timed_j"] for g in per_gpu)
    if energy is not None and timed_tokens:
        out["energy_timed_j"] = float(energy)
        out["joules_per_token"] = float(energy) / timed_tokens
    return out


def _flop_figures(record: RunRecord, card: str | None) -> dict:
    count = flops.flops_for_settings(record.settings)
    if count is None:
        return {}
    out = {"model_flops_per_token": count.model_per_token, "hardware_flops_per_token": count.hardware_per_token}
    peak = flops.gpu_peak(card)
    if peak:
        out.update({"peak_tflops": peak.tflops, "peak_source": f"{peak.model}: {peak.tflops:g} TFLOP/s, {peak.source}"})
    return out


def add_flop_rates(df: pd.DataFrame) -> pd.DataFrame:
    """Model/hardware TFLOP/s per GPU and MFU/HFU from the (repeat-median) throughput."""
    df = df.copy()
    for col in ("model_flops_per_token", "hardware_flops_per_token", "peak_tflops", "tokens_per_s_per_gpu"):
        if col not in df.columns:
            df[col] = np.nan
    df["model_tflops_per_gpu"] = df["tokens_per_s_per_gpu"] * df["model_flops_per_token"] / 1e12
    df["hardware_tflops_per_gpu"] = df["tokens_per_s_per_gpu"] * df["hardware_flops_per_token"] / 1e12
    df["mfu"] = df["model_tflops_per_gpu"] / df["peak_tflops"]
    df["hfu"] = df["hardware_tflops_per_gpu"] / df["peak_tflops"]
    return df


def frame(records: list[RunRecord]) -> pd.DataFrame:
    return pd.DataFrame([figures(r) for r in records])


def latest_per_cell(df: pd.DataFrame) -> pd.DataFrame:
    """Several runs of one cell (retries) -> the last one; repeats are averaged by aggregate_repeats."""
    return df.groupby(["machine", "cell_id", "repeat"], sort=False).tail(1)


def aggregate_repeats(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell and machine: median figures over ok repeats with their min-max; ok if any repeat was.

    A cell id does not name the machine: the same matrix run on two kinds of GPU gives two cells here.
    """
    df = latest_per_cell(df)
    rows = []
    for _, group in df.groupby(["machine", "cell_id"], sort=False):
        ok = group[group["status"] == "ok"]
        row = (ok if len(ok) else group).iloc[-1].to_dict()
        row["repeats"] = len(group)
        row["repeats_ok"] = len(ok)
        if len(ok) > 1:
            for col in REPEAT_MEDIAN_COLUMNS:
                if col in ok.columns:
                    row[col] = float(ok[col].median())
            tps = ok["tokens_per_s_per_gpu"]
            row["tokens_per_s_per_gpu_repeat_min"] = float(tps.min())
            row["tokens_per_s_per_gpu_repeat_max"] = float(tps.max())
            row["tokens_per_s_repeat_cv"] = float(tps.std() / tps.mean())
        rows.append(row)
    return pd.DataFrame(rows)


def plain_baseline(group: pd.DataFrame) -> pd.Series | None:
    """The plain 1-process run of a setting group (what a user runs today), ok or not; None if absent."""
    ones = group[(group["gpus"] == 1) & group["strategy"].isin(PLAIN_STRATEGIES)]
    if not len(ones):
        return None
    ok = ones[ones["status"] == "ok"]
    # prefer `single` (no wrapper at all), then ddp at 1, each only if it ran
    return (ok if len(ok) else ones).sort_values("strategy", key=lambda s: s != "single").iloc[0]


def add_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """Speedup and efficiency against (a) the same strategy at 1 process, (b) the plain 1-process run."""
    df = df.copy()
    for col in ("speedup_vs_same_1", "efficiency_vs_same_1", "speedup_vs_plain_1", "efficiency_vs_plain_1"):
        df[col] = np.nan
    if "tokens_per_s" not in df.columns:  # nothing ran ok anywhere
        return df
    for _key, group in df.groupby(["machine", "setting_key"], sort=False):
        ok = group[group["status"] == "ok"]
        ones = ok[ok["gpus"] == 1]
        plain = plain_baseline(group)
        plain_tps = float(plain["tokens_per_s"]) if plain is not None and plain["status"] == "ok" else np.nan
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
