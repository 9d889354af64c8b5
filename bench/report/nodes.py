"""Scaling across nodes, shown apart from scaling inside one node.

Inside one node (the ``gpus`` axis at ``nodes: 1``) ranks talk over the node's own links; across nodes
(the ``nodes`` axis at a fixed number of processes per node) over the network. The two are different
questions, so a matrix with cells of several nodes gets the ordinary scaling table of its one-node
cells and, beside it, this table: per processes-per-node, throughput per process at each node count and
the speedup over the same strategy at one node with as many processes per node (efficiency: speedup / nodes).
"""

from __future__ import annotations

import pandas as pd

from bench.report.metrics import THROUGHPUT
from bench.report.text import throughput_text, unit

NO_RECORD = "no record"


def has_several_nodes(df: pd.DataFrame) -> bool:
    return "nodes" in df.columns and bool((df["nodes"].fillna(1) > 1).any())


def one_node(group: pd.DataFrame) -> pd.DataFrame:
    return group[group["nodes"].fillna(1) == 1] if "nodes" in group.columns else group


def _across_text(row: pd.Series | None, base: pd.Series | None) -> str:
    if row is None:
        return NO_RECORD
    if row["status"] != "ok":
        return row["status"]
    if base is None or base["status"] != "ok":
        return "no 1-node run"
    speedup = row[THROUGHPUT] / base[THROUGHPUT]
    return f"{speedup:.2f}x ({speedup / row['nodes']:.0%})"


def node_scaling_table(group: pd.DataFrame) -> pd.DataFrame | None:
    """Rows: strategy and processes per node; columns per node count: tokens/s per process [95 % CI] and
    the speedup (efficiency) over 1 node. None when the group has no cell of several nodes."""
    if not has_several_nodes(group):
        return None
    u = unit(group["device"].iloc[0])
    counts = sorted(int(n) for n in group["nodes"].fillna(1).unique())
    rows = []
    for (strategy, per_node), mine in group.groupby(["strategy", "gpus"], sort=False):
        if not (mine["nodes"] > 1).any():
            continue  # a processes-per-node count measured on one node only: the within-node table has it
        out = {"strategy": strategy, f"{u}s per node": int(per_node)}
        at = {int(n): rows_.iloc[-1] for n, rows_ in mine.groupby("nodes")}
        for n in counts:
            row = at.get(n)
            out[f"{n} node(s): tok/s/{u} [95% CI]"] = throughput_text(row) if row is not None else NO_RECORD
            if n > 1:
                out[f"{n} node(s): vs 1 node"] = _across_text(row, at.get(1))
        rows.append(out)
    return pd.DataFrame(rows)
