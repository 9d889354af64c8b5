"""Speedups against like-for-like baselines (issue 16): never a ratio that mixes precision policies unnamed.

Speedup at N: throughput over a 1-process cell of the same model and training settings, on the same kind of GPU
(or CPU) and under the same precision policy: the same strategy at 1 first, else a plain run of that policy,
else another strategy of its family, else any 1-process cell of that policy. The ratio to the plain 1-process
run (``single``/``ddp``) is kept beside it and flagged when the policies differ (DeepSpeed's bf16 mode against
autocast at one GPU is a precision difference, not parallelism).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench import strategies
from bench.report.metrics import THROUGHPUT, processes, strategy_answers


def answer(row: pd.Series, question: str):
    """One of ANSWERS for a row: its column, or, in a frame made without it, asked of the strategy by name."""
    if question in row.index:
        return row[question]
    return strategy_answers(strategies.of_record(row["strategy"], None))[question]


def answers(frame: pd.DataFrame, question: str) -> pd.Series:
    """``answer`` for every row of ``frame``."""
    if question in frame.columns:
        return frame[question]
    return frame["strategy"].map(lambda name: strategy_answers(strategies.of_record(name, None))[question])


def plain_baseline(group: pd.DataFrame) -> pd.Series | None:
    """The plain 1-process run of a setting group (what a user runs today), ok or not; None if absent."""
    ones = group[(processes(group) == 1) & answers(group, "plain").astype(bool)]
    if not len(ones):
        return None
    ok = ones[ones["status"] == "ok"]
    # prefer `single` (no wrapper at all), then ddp at 1, each only if it ran
    pick = ok if len(ok) else ones
    return pick.sort_values("strategy", key=lambda s: ~answers(pick, "unwrapped").astype(bool), kind="stable").iloc[0]


def same_policy_baseline(row: pd.Series, group: pd.DataFrame) -> pd.Series | None:
    """The ok 1-process cell of ``row``'s precision policy it is measured against; None if there is none.

    Order: the same strategy at 1; a plain run (single/ddp) of that policy; another strategy of its framework
    (DeepSpeed against DeepSpeed at one GPU); any other 1-process cell of that policy, by name.
    """
    ones = group[(processes(group) == 1) & (group["status"] == "ok")]
    if "precision_policy" in ones.columns:
        ones = ones[ones["precision_policy"] == row.get("precision_policy")]
    if not len(ones):
        return None
    rank = np.select([ones["strategy"] == row["strategy"], answers(ones, "plain").astype(bool),
                      answers(ones, "framework") == answer(row, "framework")], [0, 1, 2], default=3)
    order = ones.assign(_rank=rank).sort_values(["_rank", "strategy"], kind="stable")
    return ones.loc[order.index[0]]


def add_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """Speedup and efficiency against the same-policy 1-process baseline (named in ``baseline``), the
    same strategy at 1, and the plain 1-process run (``plain_cross_policy`` where its policy differs)."""
    df = df.copy()
    for col in ("speedup", "efficiency", "speedup_vs_same_1", "efficiency_vs_same_1", "speedup_vs_plain_1",
                "efficiency_vs_plain_1"):
        df[col] = np.nan
    df["baseline"] = None
    df["plain_cross_policy"] = None
    if THROUGHPUT not in df.columns:  # nothing ran ok anywhere
        return df
    for _key, group in df.groupby(["machine", "setting_key"], sort=False):
        ok = group[group["status"] == "ok"]
        plain = plain_baseline(group)
        plain_ok = plain is not None and plain["status"] == "ok"
        for idx, row in ok.iterrows():
            if (base := same_policy_baseline(row, group)) is not None:
                df.loc[idx, "speedup"] = row[THROUGHPUT] / base[THROUGHPUT]
                df.loc[idx, "baseline"] = f"{base['strategy']} x1"
            if base is not None and base["strategy"] == row["strategy"]:
                df.loc[idx, "speedup_vs_same_1"] = df.loc[idx, "speedup"]
            if plain_ok:
                df.loc[idx, "speedup_vs_plain_1"] = row[THROUGHPUT] / plain[THROUGHPUT]
                df.loc[idx, "plain_cross_policy"] = row.get("precision_policy") != plain.get("precision_policy")
        for which in ("", "_vs_same_1", "_vs_plain_1"):
            df.loc[ok.index, f"efficiency{which}"] = df.loc[ok.index, f"speedup{which}"] / processes(ok)
    return df
