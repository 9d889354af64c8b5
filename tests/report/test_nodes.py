"""Scaling across nodes is shown apart from scaling inside one node (bench/report/nodes.py)."""

from __future__ import annotations

import math

import pandas as pd

from bench.report import nodes, plots
from bench.report.metrics import THROUGHPUT


def _row(strategy: str, per_node: int, n_nodes: int, tokens_per_s: float, status: str = "ok",
         policy: str = "autocast") -> dict:
    procs = per_node * n_nodes
    return {"strategy": strategy, "gpus": per_node, "nodes": n_nodes, "processes": procs, "device": "cuda",
            "precision_policy": policy,
            "status": status, THROUGHPUT: tokens_per_s, "real_tokens_per_s_per_gpu": tokens_per_s / procs,
            "real_tokens_per_s_ci_low": math.nan, "real_tokens_per_s_ci_high": math.nan, "interval_basis": "1 launch"}


def test_across_nodes_is_measured_against_one_node_at_the_same_gpus_per_node():
    group = pd.DataFrame([_row("ddp", 1, 1, 100.0), _row("ddp", 4, 1, 360.0), _row("ddp", 4, 2, 630.0),
                          _row("zero2", 4, 2, 0.0, status="crash", policy="pure")])
    table = nodes.node_scaling_table(group)
    assert list(table["precision policy"]) == ["autocast", "pure"]  # every table names the policy (issue 16)
    assert list(table["strategy"]) == ["ddp", "zero2"]  # ddp at 1 GPU per node ran on one node only: not here
    ddp = table.iloc[0]
    assert ddp["GPUs per node"] == 4
    assert ddp["2 node(s): vs 1 node"] == "1.75x (88%)"  # 630 / 360, over 2 nodes
    assert table.iloc[1]["2 node(s): vs 1 node"] == "crash"
    assert table.iloc[1]["1 node(s): tok/s/GPU [95% CI]"] == "no record"
    assert list(nodes.one_node(group)["processes"]) == [1, 4]  # the within-node table keeps the gpus axis


def test_the_across_nodes_plot_draws_each_strategy_and_gpus_per_node_that_ran_on_several_nodes(tmp_path):
    group = pd.DataFrame([_row("ddp", 1, 1, 100.0), _row("ddp", 4, 1, 360.0), _row("ddp", 4, 2, 630.0),
                          _row("zero2", 4, 1, 300.0), _row("zero2", 4, 2, 0.0, status="crash")])
    path = plots.node_scaling_curves(group, "tiny", tmp_path / "across.png")
    assert path == tmp_path / "across.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Only one-node cells, or no ok cell of several nodes: nothing to draw across nodes.
    assert plots.node_scaling_curves(group[group["nodes"] == 1], "tiny", tmp_path / "one.png") is None
    assert plots.node_scaling_curves(group[group["strategy"] == "zero2"], "tiny", tmp_path / "crash.png") is None
    assert not (tmp_path / "one.png").exists()


def test_one_node_records_and_old_records_get_no_across_table():
    assert nodes.node_scaling_table(pd.DataFrame([_row("ddp", 2, 1, 10.0)])) is None
    old = pd.DataFrame([_row("ddp", 2, 1, 10.0)]).drop(columns=["nodes", "processes"])
    assert not nodes.has_several_nodes(old) and len(nodes.one_node(old)) == 1


def _record(cell_id: str, env_nodes: list[dict], nvml: dict | None = None):
    from bench.records import RunRecord

    return RunRecord(matrix="m", cell_id=cell_id, label=f"tiny ddp x2 2nodes {cell_id}", settings={}, status="ok",
                     env={"host": "login", "nodes": env_nodes}, nvml=nvml, started_at=0.0, wall_s=1.0,
                     slurm={"job_id": 1})


def test_the_node_table_shows_each_node_and_names_what_differs():
    def node(name: str, driver: str, ifname: str) -> dict:
        return {"slurm_node": name, "hostname": name, "driver": driver, "network_env": {"NCCL_SOCKET_IFNAME": ifname},
                "nics": ["eth0", "ib0"], "infiniband": [{"name": "mlx5_0", "ports": [
                    {"port": "1", "state": "4: ACTIVE", "rate": "400 Gb/sec"}]}]}

    sampled = {"per_node": [{"node": "n1", "state": "done", "gpu_indices": [0, 1]},
                            {"node": "n2", "state": "no_gpu"}]}
    same = _record("a", [node("n1", "550", "ib0"), node("n2", "550", "ib0")], sampled)
    differ = _record("b", [node("n1", "550", "ib0"), node("n2", "535", "eth0")])
    local = _record("c", [node("n1", "550", "ib0")])  # one node: not in the table
    table = nodes.node_table([same, differ, local])
    assert list(table["nodes"]) == ["n1, n2", "n1, n2"]
    assert table.iloc[0]["nodes differ"] == "no"
    assert table.iloc[0]["NVML sampler per node"] == "n1: done (2 GPUs), n2: no_gpu"
    assert table.iloc[0]["InfiniBand (first node)"] == "mlx5_0/1 4: ACTIVE 400 Gb/sec"
    assert table.iloc[0]["network env (first node)"] == "NCCL_SOCKET_IFNAME=ib0"
    assert table.iloc[1]["nodes differ"] == ("driver: n1=550, n2=535; "
                                             "network_env: n1={'NCCL_SOCKET_IFNAME': 'ib0'}, n2={'NCCL_SOCKET_IFNAME': 'eth0'}")
    assert table.iloc[1]["NVML sampler per node"] == "not run"
    assert nodes.node_table([local]) is None and nodes.node_table([]) is None
