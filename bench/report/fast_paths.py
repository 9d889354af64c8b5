"""The fast paths side by side (issue 21): what Liger's kernels or torch.compile do to each strategy at each
process count, measured two ways and said which is which.

- Like for like: the fast path and the plain step at the same (numbered) micro-batch, the same everything
  else: the fast path's own effect.
- Each at its best: the plain step and the fast path each at its own largest fitting micro-batch
  (``train.micro_batch: auto``, the value the launch confirmed): what a user gets from switching it on
  and filling the card.

Cells are paired only within one machine and one setting apart from the three axes (``train.kernels``,
``train.compile``, ``train.micro_batch``), so the timing settings, cap, sequence and optimizer are equal.
A ratio is printed only between cells of the same precision policy and the same timing protocol (the
adaptive stopping rule, or the fixed steps of older records); otherwise both figures stand without one
and the row says why. The ratio's 95 % interval combines the two cells' intervals (bench/report/intervals.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import pandas as pd

from bench.report import intervals, metrics
from bench.report.cautions import compile_warning
from bench.report.render import Section, Table
from bench.report.text import gib, is_num, policy, throughput_text, unit

FAST_AXES = ("kernels", "compile", "micro_batch")
LIKE_FOR_LIKE = "same micro-batch (like for like)"
EACH_AT_BEST = "each at its best micro-batch (auto)"
NOTES = [
    "What each fast path (Liger's kernels: train.kernels; torch.compile: train.compile) does to each strategy "
    "at each process count, against the plain step of the same strategy, setting and machine. "
    f"'{LIKE_FOR_LIKE}': both at the matrix's numbered micro-batch, the fast path's own effect. "
    f"'{EACH_AT_BEST}': each at the largest micro-batch that fit it (train.micro_batch: auto, the value its "
    "launch confirmed, shown beside it): what switching the path on and filling the card gives.",
    "Throughput: real tokens/s per GPU (per process on CPU) [95 % interval] (launches). Ratio: fast path over "
    "plain [95 % interval]: the two intervals combined on the log scale (half-widths in quadrature, the "
    "cells measured independently). Fast path applied: the modules Liger replaced in the built model, and "
    "torch.compile's compile seconds (torch's own count, in the warm-up: apart from the step times; a "
    "warning where some fell inside the timed steps). An auto cell's micro-batch names the estimator's "
    "proposal and the launches that confirmed it (status per micro-batch tried). A ratio is given only "
    "between cells of the same precision policy and "
    "timing protocol; otherwise the row says why and gives none. Memory: torch peak reserved (the worst "
    "launch; host RSS on CPU), the fast path's as a share of the plain step's.",
]


@dataclass(frozen=True)
class Comparison:
    """One row: a strategy at a process count, a fast path against the plain step, compared one way."""

    strategy: str
    processes: int
    fast_path: str
    compared: str  # LIKE_FOR_LIKE or EACH_AT_BEST
    plain: pd.Series | None
    fast: pd.Series | None
    ratio: intervals.Interval | None = None
    ratio_value: float | None = None
    no_ratio: str | None = None  # why there is none
    memory_share: float | None = None  # fast path's peak memory / the plain step's


# ---------------------------------------------------------------- the axes in a setting key

def _setting(key: str) -> dict:
    return json.loads(key)


def base_key(setting_key: str) -> str:
    """The setting without the fast-path axes: cells with equal base keys are paired."""
    s = _setting(setting_key)
    for axis in FAST_AXES:
        s["train"].pop(axis, None)
    return json.dumps(s, sort_keys=True)


def fast_path(setting_key: str) -> str | None:
    """'kernels liger', 'torch.compile', both joined by '+', or None for the plain step (absent in old records)."""
    t = _setting(setting_key)["train"]
    parts = [f"kernels {t['kernels']}" if t.get("kernels", "none") != "none" else None,
             "torch.compile" if t.get("compile") else None]
    return " + ".join(p for p in parts if p) or None


def micro_batch_setting(setting_key: str):
    """The matrix's micro-batch: a number, or 'auto'."""
    return _setting(setting_key)["train"]["micro_batch"]


# ---------------------------------------------------------------- pairing

def _memory(row: pd.Series) -> float | None:
    value = row.get("peak_reserved_gib") if row["device"] == "cuda" else row.get("host_rss_peak_gib")
    return float(value) if is_num(value) else None


def _protocol(row: pd.Series) -> str:
    """How the cell was timed: the adaptive stopping rule (its stop reason recorded) or fixed steps."""
    return "adaptive timing" if isinstance(row.get("timing_stop_reason"), str) else "fixed steps (older record)"


def _figure(row: pd.Series) -> tuple[float, float, float]:
    low, high = metrics.per_gpu_interval(row) or (float("nan"), float("nan"))
    return float(row["real_tokens_per_s_per_gpu"]), low, high


def compare(strategy: str, processes: int, name: str, compared: str,
            plain: pd.Series | None, fast: pd.Series | None) -> Comparison:
    """The ratio of ``fast`` over ``plain`` where the two may be compared; otherwise why not."""
    base = Comparison(strategy, processes, name, compared, plain, fast)
    if plain is None or fast is None:
        return _with(base, no_ratio=f"no {'plain' if plain is None else name} cell")
    if plain["status"] != "ok" or fast["status"] != "ok":
        which = [f"{side} {row['status']}" for side, row in (("plain", plain), (name, fast)) if row["status"] != "ok"]
        return _with(base, no_ratio=", ".join(which))
    if policy(plain) != policy(fast):
        return _with(base, no_ratio=f"precision policies differ ({policy(plain)} vs {policy(fast)})")
    if _protocol(plain) != _protocol(fast):
        return _with(base, no_ratio=f"timing protocols differ ({_protocol(plain)} vs {_protocol(fast)})")
    a, b = _figure(fast), _figure(plain)
    mem_plain, mem_fast = _memory(plain), _memory(fast)
    share = mem_fast / mem_plain if mem_plain and mem_fast is not None else None
    return _with(base, ratio=intervals.ratio(a, b), ratio_value=a[0] / b[0], memory_share=share)


def _with(c: Comparison, **changes) -> Comparison:
    return replace(c, **changes)


def comparisons(group: pd.DataFrame) -> list[Comparison]:
    """Every row of one machine's base setting: per strategy, process count and fast path, like for like at
    each numbered micro-batch both ran, then each at its best (auto)."""
    group = group.assign(_fast=group["setting_key"].map(fast_path),
                         _mb=group["setting_key"].map(lambda k: str(micro_batch_setting(k))))
    out = []
    keys = [k for k in ("strategy", "nodes", "gpus") if k in group.columns]  # 2 nodes x 1 apart from 1 x 2
    for _key, cells in group.groupby(keys, sort=False):
        strategy, processes = cells["strategy"].iloc[0], int(metrics.processes(cells).iloc[0])
        plain = cells[cells["_fast"].isna()]
        for name in dict.fromkeys(cells["_fast"].dropna()):
            fast = cells[cells["_fast"] == name]
            for mb in sorted(set(plain["_mb"]) & set(fast["_mb"]) - {"auto"}, key=int):
                out.append(compare(strategy, processes, name, LIKE_FOR_LIKE, _one(plain, mb), _one(fast, mb)))
            if "auto" in set(plain["_mb"]) | set(fast["_mb"]):
                out.append(compare(strategy, processes, name, EACH_AT_BEST,
                                   _one(plain, "auto"), _one(fast, "auto")))
    return out


def _one(cells: pd.DataFrame, mb: str) -> pd.Series | None:
    match = cells[cells["_mb"] == mb]
    return match.iloc[-1] if len(match) else None


def groups(df: pd.DataFrame):
    """(title, rows) per machine and base setting holding both a plain and a fast-path cell."""
    if "setting_key" not in df.columns or not len(df):
        return
    df = df.assign(_base=df["setting_key"].map(base_key), _fast=df["setting_key"].map(fast_path))
    for (machine, key), group in df.groupby(["machine", "_base"], sort=False):
        if group["_fast"].isna().any() and group["_fast"].notna().any():
            yield f"{_title(group['setting_key'].iloc[0])} on {machine}", group.drop(columns=["_base", "_fast"])


def _title(setting_key: str) -> str:
    s = _setting(setting_key)
    s["train"].update(kernels="none", compile=False)
    return metrics.setting_title(json.dumps(s), mb="mb as each row says")


# ---------------------------------------------------------------- text

def _mb_text(row: pd.Series | None) -> str:
    """'mb 4', or for an auto cell 'mb 6 (auto: proposed 8, 8 oom -> 6 ok)': the estimator's proposal and
    the launches that confirmed it (the trail of the launch shown)."""
    if row is None or not is_num(row.get("micro_batch")):
        return "mb ?"
    text = f"mb {row['micro_batch']:.0f}"
    if not row.get("micro_batch_auto"):
        return text
    probe = [f"proposed {row['micro_batch_proposed']:.0f}" if is_num(row.get("micro_batch_proposed")) else None,
             row.get("micro_batch_trail") if isinstance(row.get("micro_batch_trail"), str) else None]
    return f"{text} (auto{': ' + ', '.join(p for p in probe if p) if any(probe) else ''})"


def applied_text(row: pd.Series | None) -> str:
    """What the fast path's launch recorded: Liger's modules, torch.compile's seconds (warm-up, and any inside
    the timed steps, which the step times then include); '-' for a plain step or no record."""
    if row is None:
        return "-"
    parts = []
    if is_num(row.get("liger_modules")):
        parts.append(f"{row['liger_modules']:.0f} modules replaced by Liger")
    if is_num(row.get("compile_s")):
        parts.append(f"compiled in {row['compile_s']:.1f} s (warm-up, apart from step time)")
    if row.get("compiled_in_timed_steps") and is_num(row.get("compile_s_in_timed_steps")):
        parts.append(f"warning: {row['compile_s_in_timed_steps']:.1f} s compiling inside timed steps")
    return "; ".join(parts) or ("not recorded" if row["status"] == "ok" else "-")


def _side(row: pd.Series | None) -> str:
    return "no record" if row is None else f"{throughput_text(row)}, {_mb_text(row)}"


def ratio_text(c: Comparison) -> str:
    if c.no_ratio:
        return f"no ratio: {c.no_ratio}"
    if c.ratio is None:
        return f"{c.ratio_value:.2f}x [no interval]"
    return f"{c.ratio_value:.2f}x [{c.ratio.low:.2f}-{c.ratio.high:.2f}]"


def _memory_text(c: Comparison) -> str:
    sides = [gib(_memory(r), r["status"]) if r is not None else "no record" for r in (c.plain, c.fast)]
    share = f" ({c.memory_share:.0%})" if c.memory_share is not None else ""
    return f"{sides[0]} -> {sides[1]}{share}"


def table(rows: list[Comparison], device: str) -> pd.DataFrame:
    u = unit(device)
    return pd.DataFrame([{
        "strategy": f"{c.strategy} x{c.processes} {u}",
        "precision policy": policy(c.fast if c.fast is not None else c.plain),
        "fast path": c.fast_path,
        "compared at": c.compared,
        f"plain: tok/s/{u} [95% CI]": _side(c.plain),
        f"fast path: tok/s/{u} [95% CI]": _side(c.fast),
        "fast path applied": applied_text(c.fast),
        "fast / plain tok/s [95% CI]": ratio_text(c),
        "peak memory GiB plain -> fast (share)": _memory_text(c),
    } for c in rows])


def section(df: pd.DataFrame) -> Section | None:
    """The report's section; None when no setting holds both a plain and a fast-path cell."""
    found = list(groups(df))
    if not found:
        return None
    out = Section("Fast paths: like for like and each at its best", list(NOTES))
    for i, (title, group) in enumerate(found, 1):
        out.items.append(Table(f"fast_paths_{i}", title, table(comparisons(group), group["device"].iloc[0]),
                               [w for w in (compile_warning(group),) if w]))
    return out
