"""Derived figures, always recomputed from the raw per-rank, per-step records.

Definitions (the report states them):
- step time: wall time of one optimizer step, synchronised; per step the slowest rank counts; a launch's
  figure is the median over its timed steps, with the 95 % interval of that median (the worker's stopping
  rule, serial dependence counted, where the record has ``timing``: none when the rule admits none; order
  statistics of steps taken as independent in older records: bench/report/intervals.py).
- launches are the unit: a cell's figure is the median over its ok launches (repeats), with a 95 %
  t-interval of the launch figures on the log scale (2+ launches); one launch keeps its within-launch
  interval and says so. The p10-p90 spread of the steps stays a separate, named figure.
- throughput: real (non-padding) tokens per step over all data-parallel replicas / step time; per GPU = that /
  number of processes. The ranks of a tensor- or context-parallel group (tp x cp of them) share one batch, so
  a batch counts once per group, never once per rank; the FLOPs of MFU are then counted once too.
  ``tokens_per_s`` counts every computed token, padding included (what HFU uses).
- speedup at N: against a like-for-like 1-process baseline (bench/report/speedups.py).
- model TFLOP/s and MFU: see bench/report/flops.py for the FLOP convention and the peak table.
- energy per token: NVML energy over the timed window / (real tokens per step x timed steps).
- card state: mean SM clock over the timed window (mean over the cell's GPUs) and the share of timed
  samples under a power or thermal throttle (the most throttled GPU); older records keep only which
  reasons were seen, not how often.
"""

from __future__ import annotations

import json
from statistics import median

import numpy as np
import pandas as pd

from bench import strategies
from bench.machine import sampler
from bench.records import RunRecord
from bench.report import flops, host_steady, intervals
from bench.spec import CellSettings
from bench.strategies.precision import policy_for

# What the baselines ask of each row's strategy (bench/strategies/strategy.py), kept as columns: plain PyTorch
# (at one process nothing wraps the model: what a user runs today), of those the runs without any wrapper
# (preferred as the baseline), and the framework (a strategy of the same one is the next best baseline).
ANSWERS = ("plain", "unwrapped", "framework")
THROUGHPUT = "real_tokens_per_s"  # the headline: real (non-padding) tokens


def timed_step_times(record: RunRecord) -> list[float]:
    """Per timed step, the slowest rank's time; none when a rank report holds no per-step times (the check
    then leaves the launch out of its timing instead of failing on it)."""
    per_rank = [[s["time_s"] for s in r.get("steps", []) if s["phase"] == "timed"] for r in record.ranks]
    if not per_rank or not all(per_rank):
        return []
    n = min(len(p) for p in per_rank)
    return [max(p[i] for p in per_rank) for i in range(n)]


def tokens_per_step(record: RunRecord, real: bool = False) -> float:
    """Tokens of one step over all data-parallel replicas (median per rank; the tp x cp ranks of a group each
    report the batch they share, so the sum over ranks is divided by tp x cp: records without the degrees have
    1); ``real``: without padding (a step that does not say how many were real had none: synthetic data)."""
    key = "real_tokens" if real else "tokens"
    per_rank = [[s.get(key, s["tokens"]) for s in r["steps"] if s["phase"] == "timed"] for r in record.ranks]
    group = record.settings.get("tp", 1) * record.settings.get("cp", 1)
    return float(sum(median(p) for p in per_rank if p)) / group


def gpu_name(record: RunRecord) -> str | None:
    """The card the cell ran on, as NVML/torch name it; None on CPU."""
    for rank in record.ranks:
        if rank.get("gpu_name"):
            return rank["gpu_name"]
    per_gpu = (record.nvml or {}).get("per_gpu") or []
    if per_gpu and per_gpu[0].get("name"):
        return per_gpu[0]["name"]
    return record.env.get("gpu_model")


def precision_policy(record: RunRecord, cell: CellSettings) -> str:
    """The policy the ranks reported, else the one bench.strategies.precision assigns the cell (failed, older records)."""
    for rank in record.ranks:
        if rank.get("precision_policy"):
            return rank["precision_policy"]
    try:
        return policy_for(cell).name
    except Exception:  # noqa: BLE001 - an unreadable user config: say so rather than guess
        return "unknown"


def strategy_answers(strategy: strategies.Strategy | None) -> dict:
    """The row's ANSWERS (and its family label, as records spell it) from the strategy; unknown: none."""
    if strategy is None:
        return {"plain": False, "unwrapped": False, "framework": "unknown", "family": "unknown"}
    return {"plain": strategy.is_plain, "unwrapped": strategy.single_process, "framework": strategy.framework,
            "family": strategy.family}


def strategy_label(cell: CellSettings) -> str:
    """The strategy as tables name it, with its tensor and context degrees ("fsdp2+tp2", "tp2")."""
    if cell.tp == 1 and cell.cp == 1:
        return cell.strategy
    try:
        return strategies.for_cell(cell).label
    except Exception:  # noqa: BLE001 - an unreadable user config: its name and the degrees
        return cell.strategy_label


def figures(record: RunRecord) -> dict:
    """One row of derived figures for a record (one launch); empty figures for failed runs."""
    cell = CellSettings.model_validate(record.settings)
    card = gpu_name(record)
    row = {
        "cell_id": record.cell_id, "repeat": record.repeat, "label": record.label, "status": record.status,
        "results_folder": (record.model_extra or {}).get("results_folder"),  # set by the report's loader
        "model": cell.model, "adapter": cell.adapter.type, "strategy": strategy_label(cell), "gpus": cell.gpus,
        # tensor and context degrees (1 in records from before them); dp: the data-parallel replicas they leave
        "tp": cell.tp, "cp": cell.cp, "dp": max(1, cell.processes // (cell.tp * cell.cp)),
        # gpus: processes per node; nodes: machines (1 in records from before multi-node cells); processes: all ranks
        "nodes": cell.nodes, "processes": cell.processes,
        # the strategy it ran: its kept degrees, its name, or an older record's family label
        **strategy_answers(strategies.of_record(cell.strategy, record.strategy_info)), "precision_policy": precision_policy(record, cell),
        "device": cell.device, "setting_key": cell.setting_key, "gpu_memory_gib": cell.gpu_memory_gib,
        "hardware": record.env.get("hardware", "unknown"), "gpu_model": card,
        # what must match for two cells to be compared: the card (1 GPU of a 1- or 8-GPU host alike) or the CPU
        "machine": card or record.env.get("hardware", "unknown"),
        "wall_s": record.wall_s, "first_step_s": record.first_step_s,
        "micro_batch": micro_batch_used(record, cell), "micro_batch_auto": cell.train.micro_batch == "auto",
        "error": record.error.message.splitlines()[0][:120] if record.error and record.error.message else None,
    }
    row.update(_memory_figures(record))
    row.update(_prediction_figures(record))
    row.update(_card_figures(record))
    row.update(_window_figures(record))
    row.update(host_figures(record))
    row.update(_auto_batch_figures(record))
    times = timed_step_times(record)
    if record.status != "ok" or not times:
        row.update(_flop_figures(record, card, None, None))
        return row
    tokens, real = tokens_per_step(record), tokens_per_step(record, real=True)
    arr = np.asarray(times)
    step = float(np.median(arr))
    low, high, coverage, source = intervals.launch_interval(record, times, step)
    row.update({
        "step_time_s": step,
        "step_time_ci_low_s": _or_nan(low), "step_time_ci_high_s": _or_nan(high),
        "step_time_ci_coverage": _or_nan(coverage),
        "launch_interval_source": source,
        "step_time_p10_s": float(np.percentile(arr, 10)),
        "step_time_p90_s": float(np.percentile(arr, 90)),
        "step_time_cv": float(arr.std() / arr.mean()) if len(arr) > 1 else 0.0,
        "timed_steps": len(arr),
        "tokens_per_step": tokens,
        "real_tokens_per_step": real,
        "tokens_per_s": tokens / step,
        "tokens_per_s_per_gpu": tokens / step / cell.processes,
        "real_tokens_per_s": real / step,
        "real_tokens_per_s_per_gpu": real / step / cell.processes,
        # the slow end of the step-time interval gives the low end of the throughput interval (NaN: none)
        "real_tokens_per_s_ci_low": real / high if high else np.nan,
        "real_tokens_per_s_ci_high": real / low if low else np.nan,
        "samples_per_s": real / step / cell.train.seq_len,
        "final_loss": record.ranks[0]["steps"][-1]["loss"],
    })
    row.update(_timing_figures(record))
    row.update(_host_steady_figures(record, times, real))
    # sequences of one step: one micro-batch per data-parallel replica (a tensor/context group shares it)
    sequences = max(1, cell.processes // (cell.tp * cell.cp)) * micro_batch_used(record, cell) * cell.train.grad_accum
    row.update(_flop_figures(record, card, real / sequences, tokens / sequences))
    row.update(_energy_figures(record, real * len(arr)))
    return row


def micro_batch_used(record: RunRecord, cell: CellSettings) -> int | None:
    """The micro-batch the cell ran: its number, or for ``auto`` the one the probe chose (None if none fit)."""
    if cell.train.micro_batch != "auto":
        return cell.train.micro_batch
    return (getattr(record, "micro_batch_auto", None) or {}).get("chosen")


def _or_nan(value: float | None) -> float:
    return np.nan if value is None else value


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def host_figures(record: RunRecord) -> dict:
    """The host over the timed window (bench/worker/host_window.py; absent in records from before it): the
    share of its CPU time stolen by the hypervisor and busy, and the CPU probe's time (bench/worker/cpu_probe.py,
    the mean of before and after the window), the worst rank's."""
    hosts = [{**r["host"], "cpu_probe_ms": _mean_probe(r["host"])} for r in record.ranks
             if isinstance(r.get("host"), dict)]
    out = {}
    for key in ("steal_share", "host_busy_share", "cpu_probe_ms"):
        values = [h[key] for h in hosts if isinstance(h.get(key), (int, float))]
        if values:
            out[key] = float(max(values))
    return out


def _mean_probe(host: dict) -> float | None:
    probes = [host.get(k) for k in ("cpu_probe_ms_before", "cpu_probe_ms_after")]
    return sum(probes) / 2 if all(isinstance(v, (int, float)) for v in probes) else None


def _window_figures(record: RunRecord) -> dict:
    """What each rank recorded about its timed window and fast paths (absent in records from before them):
    collections inside the window (``gc``; should be 0), timed steps whose optimizer update fp16's loss scaler
    skipped (``optimizer_skipped``; should be 0), whether steps that should have updated the weights left the
    optimizer without state (``optimizer_updated_nothing``; should be false), compile seconds in the warm-up and
    inside the timed steps (``compile``; should be none), and how many modules Liger replaced (``kernels``); worst
    rank."""
    out = {}
    gcs = [r["gc"]["collections_in_window"] for r in record.ranks
           if isinstance(r.get("gc"), dict) and r["gc"].get("collections_in_window") is not None]
    if gcs:
        out["gc_collections_in_window"] = int(max(gcs))
    nothing = [r["optimizer_updated_nothing"] for r in record.ranks if r.get("optimizer_updated_nothing") is not None]
    if nothing:
        out["optimizer_updated_nothing"] = any(nothing)
    skips = [r["optimizer_skipped"]["timed"] for r in record.ranks if isinstance(r.get("optimizer_skipped"), dict)]
    if skips:
        out["optimizer_skipped_in_window"] = int(max(skips))
    compiles = [r["compile"] for r in record.ranks if isinstance(r.get("compile"), dict)]
    if compiles:
        out["compile_s"] = float(max(c.get("compile_s") or 0.0 for c in compiles))
        out["compile_s_in_timed_steps"] = float(max(c.get("compile_s_in_timed_steps") or 0.0 for c in compiles))
        out["compiled_in_timed_steps"] = any(bool(c.get("compiled_in_timed_steps")) for c in compiles)
    liger = [r["kernels"]["liger_modules"] for r in record.ranks
             if isinstance(r.get("kernels"), dict) and isinstance(r["kernels"].get("liger_modules"), dict)]
    if liger:
        out["liger_modules"] = int(max(sum(found.values()) for found in liger))
    return out


def _auto_batch_figures(record: RunRecord) -> dict:
    """An auto cell's probe: the estimator's proposal, every launch's micro-batch and status in launch order
    ('8 oom -> 6 ok', a climb '19 ok -> 23 ok -> 25 oom') and why the search stopped (absent before the climb)."""
    auto = getattr(record, "micro_batch_auto", None)
    if not isinstance(auto, dict):
        return {}
    trail = " -> ".join(f"{t.get('mb')} {t.get('status')}" + (" (reused)" if t.get("reused_from_repeat") is not None
                                                                else "") for t in auto.get("trail") or [])
    return {"micro_batch_proposed": auto.get("proposed"), "micro_batch_trail": trail or None,
            "micro_batch_stopped": auto.get("stopped")}


def _host_steady_figures(record: RunRecord, times: list[float], real: float) -> dict:
    """The launch on a steady host (bench/report/host_steady.py; absent in records from before the per-step probe)."""
    out = host_steady.figures(record.ranks, times)
    if "step_time_host_steady_s" in out:
        out["real_tokens_per_s_host_steady"] = real / out["step_time_host_steady_s"]
    return out


def _timing_figures(record: RunRecord) -> dict:
    """Why the adaptive timing stopped (absent in records from before it)."""
    timings = [r["timing"] for r in record.ranks if isinstance(r.get("timing"), dict)]
    if not timings:
        return {}
    reasons = sorted({str(t.get("stop_reason")) for t in timings if t.get("stop_reason")})
    return {"timing_stop_reason": ", ".join(reasons) if reasons else None}


def _card_figures(record: RunRecord) -> dict:
    """Mean SM clock over the timed window and the share of timed samples under a power/thermal throttle."""
    per_gpu = (record.nvml or {}).get("per_gpu") or []
    clocks = [g["sm_clock_mean_mhz"] for g in per_gpu if _positive(g.get("sm_clock_mean_mhz"))]
    if not clocks:
        return {}
    seen = sorted({name for g in per_gpu for name in g.get("throttle_reasons") or []
                   if name in sampler.THROTTLE_REASONS})
    shares = [g.get("throttled_share") for g in per_gpu]
    out = {"sm_clock_mean_mhz": float(np.mean(clocks)), "throttle_reasons_seen": ", ".join(seen)}
    if all(isinstance(v, (int, float)) for v in shares):  # older records: the union of reasons only
        out["throttled_share"] = float(max(shares))
    return out


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
    for kind in ("allocated", "reserved"):  # the timed steps alone, build and prepare left out (newer records)
        training = [r[f"training_peak_{kind}_bytes"] for r in record.ranks
                    if _positive(r.get(f"training_peak_{kind}_bytes"))]
        if training:
            out[f"training_peak_{kind}_gib"] = max(training) / 2**30
    traffic = [r["host_device_traffic"] for r in record.ranks
               if isinstance(r.get("host_device_traffic"), dict) and "htod_s" in r["host_device_traffic"]]
    if traffic:  # offloading strategies: one profiled step per rank (bench/worker/transfers.py); the slowest rank
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
    from bench.estimate import predict_for_record

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


def _flop_figures(record: RunRecord, card: str | None, real_length: float | None,
                  computed_length: float | None) -> dict:
    """FLOPs per real token at the real mean sequence length (causal headline, full matrix beside it), and
    per computed token at the computed (padded) length for HFU; the configured seq_len without steps."""
    count = flops.flops_for_settings(record.settings, causal=True, seq_len=real_length)
    if count is None:
        return {}
    full = flops.flops_for_settings(record.settings, causal=False, seq_len=real_length)
    computed = flops.flops_for_settings(record.settings, causal=True, seq_len=computed_length)
    out = {"model_flops_per_token": count.model_per_token, "model_flops_per_token_full_attn": full.model_per_token,
           "hardware_flops_per_token": computed.hardware_per_token,
           "attention_length": real_length if real_length is not None else float(record.settings["train"]["seq_len"])}
    peak = flops.gpu_peak(card)
    if peak:
        out.update({"peak_tflops": peak.tflops, "peak_source": f"{peak.model}: {peak.tflops:g} TFLOP/s, {peak.source}"})
    return out


def add_flop_rates(df: pd.DataFrame) -> pd.DataFrame:
    """Model TFLOP/s per GPU and MFU on real tokens (causal, and full-matrix attention); hardware TFLOP/s
    and HFU on every computed token (padding included), all from the launch-median throughput."""
    df = df.copy()
    for col in ("model_flops_per_token", "model_flops_per_token_full_attn", "hardware_flops_per_token",
                "peak_tflops", "tokens_per_s_per_gpu", "real_tokens_per_s_per_gpu"):
        if col not in df.columns:
            df[col] = np.nan
    df["model_tflops_per_gpu"] = df["real_tokens_per_s_per_gpu"] * df["model_flops_per_token"] / 1e12
    df["hardware_tflops_per_gpu"] = df["tokens_per_s_per_gpu"] * df["hardware_flops_per_token"] / 1e12
    df["mfu"] = df["model_tflops_per_gpu"] / df["peak_tflops"]
    full_attn_tflops = df["real_tokens_per_s_per_gpu"] * df["model_flops_per_token_full_attn"] / 1e12
    df["mfu_full_attn"] = full_attn_tflops / df["peak_tflops"]
    df["hfu"] = df["hardware_tflops_per_gpu"] / df["peak_tflops"]
    return df


def frame(records: list[RunRecord]) -> pd.DataFrame:
    return pd.DataFrame([figures(r) for r in records])


def per_gpu_interval(row) -> tuple[float, float] | None:
    """The cell's 95 % throughput interval, per GPU (per process on CPU); None without one."""
    low, high = row.get("real_tokens_per_s_ci_low"), row.get("real_tokens_per_s_ci_high")
    if not (_positive(low) and _positive(high)):
        return None
    n = row.get("processes", row["gpus"])
    return low / n, high / n


def processes(frame: pd.DataFrame) -> pd.Series:
    """Ranks of each row: nodes x processes per node (frames made without a processes column: gpus)."""
    return frame["processes"] if "processes" in frame.columns else frame["gpus"]


def clock_spread(rows: pd.DataFrame) -> tuple[float, float] | None:
    """(lowest, highest) mean SM clock among the ok rows that have one; None with fewer than two."""
    if "sm_clock_mean_mhz" not in rows.columns:
        return None
    clocks = rows.loc[rows["status"] == "ok", "sm_clock_mean_mhz"].dropna()
    return (float(clocks.min()), float(clocks.max())) if len(clocks) > 1 else None


def setting_title(setting_key: str, mb: str | None = None) -> str:
    """A short human title for a setting group: model, adapter, sequence and batch shape (``mb``: the
    micro-batch text, for a title over several micro-batches)."""
    s = json.loads(setting_key)
    t, a = s["train"], s["adapter"]
    adapter = "full fine-tune" if a["type"] == "none" else f"{a['type'].upper()} r={a['r']}"
    cap = f", capped at {s['gpu_memory_gib']:g} GiB" if s.get("gpu_memory_gib") else ""
    ckpt = ", grad ckpt" if t["grad_checkpointing"] else ""
    fast = "".join([f", kernels {t['kernels']}" if t.get("kernels", "none") != "none" else "",
                    ", torch.compile" if t.get("compile") else "",
                    ", ranks pinned to cores" if s.get("cpu_affinity", "none") != "none" else ""])  # absent in older records
    # an auto group compares each strategy at its own best micro-batch; a number, all at the same one
    mb = mb or ("mb auto (each strategy at its largest fitting micro-batch)" if t["micro_batch"] == "auto"
                else f"mb {t['micro_batch']} (same micro-batch for all)")
    return (f"{s['model']} {adapter}, seq {t['seq_len']} x {mb} x ga {t['grad_accum']}, "
            f"{t['precision']}, {t['optimizer']}{ckpt}{fast}{cap} [{s['device']}]")
