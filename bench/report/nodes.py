"""Scaling across nodes, shown apart from scaling inside one node.

Inside one node (the ``gpus`` axis at ``nodes: 1``) ranks talk over the node's own links; across nodes
(the ``nodes`` axis at a fixed number of processes per node) over the network. The two are different
questions, so a matrix with cells of several nodes gets the ordinary scaling table of its one-node
cells and, beside it, this table: per processes-per-node, throughput per process at each node count and
the speedup over the same strategy at one node with as many processes per node (efficiency: speedup / nodes).

``node_table``: each multi-node cell's nodes as their own fingerprints and samplers describe them (network
settings, NICs, InfiniBand, what NVML sampled), and what is not the same on every node.
"""

from __future__ import annotations

import pandas as pd

from bench.machine.node_env import differences
from bench.records import RunRecord
from bench.report.metrics import THROUGHPUT
from bench.report.text import policy, throughput_text, unit

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
        # like for like (issue 16): the policy is named, as in every table; a strategy keeps its policy at any
        # node count, so the speedup over 1 node is within one policy
        out = {"strategy": strategy, "precision policy": policy(mine.iloc[-1]), f"{u}s per node": int(per_node)}
        at = {int(n): rows_.iloc[-1] for n, rows_ in mine.groupby("nodes")}
        for n in counts:
            row = at.get(n)
            out[f"{n} node(s): tok/s/{u} [95% CI]"] = throughput_text(row) if row is not None else NO_RECORD
            if n > 1:
                out[f"{n} node(s): vs 1 node"] = _across_text(row, at.get(1))
        rows.append(out)
    return pd.DataFrame(rows)


def _differ_text(nodes: list[dict]) -> str:
    diff = differences(nodes)
    return "; ".join(f"{key}: " + ", ".join(f"{node}={value}" for node, value in values.items())
                     for key, values in diff.items()) or "no"


def _sampler_text(record: RunRecord) -> str:
    per_node = (record.nvml or {}).get("per_node")
    if not per_node:
        return "not run" if record.slurm else ""
    return ", ".join(f"{n.get('node') or n.get('node_rank')}: {n.get('state')}"
                     + (f" ({len(n.get('gpu_indices') or [])} GPUs)" if n.get("state") == "done" else "")
                     for n in per_node)


def node_table(records: list[RunRecord]) -> pd.DataFrame | None:
    """One row per cell of several nodes (its latest run): the nodes, the first node's network settings, NICs
    and InfiniBand ports, each node's NVML sampler, and the keys whose values differ between nodes. None
    when no record has several nodes' fingerprints."""
    latest = {r.cell_id: r for r in records if len(r.env.get("nodes") or []) > 1}
    rows = []
    for record in latest.values():
        nodes = record.env["nodes"]
        first = nodes[0]
        ib = [f"{d['name']}/{p['port']} {p.get('state')} {p.get('rate')}" for d in first.get("infiniband") or []
              for p in d.get("ports", [])]
        rows.append({"cell": record.label, "status": record.status,
                     "nodes": ", ".join(str(n.get("slurm_node") or n.get("hostname")) for n in nodes),
                     "network env (first node)": " ".join(f"{k}={v}" for k, v in (first.get("network_env") or {}).items())
                     or "none set",
                     "NICs (first node)": ", ".join(first.get("nics") or [i["name"] for i in first.get("interfaces", [])]),
                     "InfiniBand (first node)": ", ".join(ib) or "none",
                     "NVML sampler per node": _sampler_text(record),
                     "nodes differ": _differ_text(nodes)})
    return pd.DataFrame(rows) if rows else None
