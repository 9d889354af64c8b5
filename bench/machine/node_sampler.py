"""NVML sampling on every node of a multi-node job, and the merge of the nodes' samples into one record.

    python -m bench.machine.node_sampler OUT.json --gpus N --ranks DIR     (once per node, inside the job)

The batch script starts one per node beside the node's `accelerate launch` and sends it SIGTERM when the
launch returns (Slurm's own SIGTERM at a cancel or at its time limit ends it the same way). It writes
OUT.json at once, so that the file proves the node's sampler ran: state ``sampling``, or ``no_gpu`` with
the reason (no NVML on the node, the cell uses no GPU) and nothing more to do. At its end it writes the
summary of its cards (bench/machine/sampler.py's, over the timed window of every rank, read from the
shared ranks folder) with state ``done``.

``merge_node_samples`` turns the nodes' files into the record's ``nvml``: ``per_gpu`` over every card of
every node (each entry names its ``node`` and ``node_rank``), the energy of all of them, a trace with one
line per node's card, and ``per_node``: what each node's sampler did (a node without a file is
``missing``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

from bench.machine import gpu_state
from bench.machine.sampler import NvmlSampler

NODE_SAMPLES_FILE = "nvml-node-{node_rank}.json"
PARENT_CHECK_S = 1.0  # a sampler whose parent died without signalling it stops on its own
PER_NODE_KEYS = ("node_rank", "node", "hostname", "state", "available", "reason", "gpus", "started_at",
                 "ended_at")


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # the runner never reads half a file


def _rank_reports(rank_dir: Path) -> list[dict]:
    out = []
    for path in sorted(rank_dir.glob("rank*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # a rank killed while writing: its window is simply not known
    return out


def _node_identity(gpus: int) -> dict:
    node_id = os.environ.get("SLURM_NODEID", "")
    return {"node_rank": int(node_id) if node_id.isdigit() else None, "node": os.environ.get("SLURMD_NODENAME"),
            "hostname": socket.gethostname(), "gpus": gpus}


def no_gpu_reason(gpus: int) -> str | None:
    """Why this node samples nothing, or None when it has cards to sample."""
    if gpu_state.nvml() is None:
        return "no NVML on this node (no NVIDIA driver or no nvidia-ml-py): nothing to sample"
    if gpus == 0:
        return "the cell uses no GPU (device cpu)"
    if gpu_state.visible_count() == 0:
        return "NVML finds no visible GPU on this node"
    return None


def sample_node(out: Path, gpus: int, rank_dir: Path, stop: threading.Event) -> dict:
    """Sample this node's first ``gpus`` visible cards until ``stop`` is set (or the parent dies); write ``out``."""
    parent = os.getppid()
    head = {**_node_identity(gpus), "started_at": time.time()}
    if reason := no_gpu_reason(gpus):
        data = {**head, "state": "no_gpu", "available": False, "reason": reason, "ended_at": time.time()}
        _write(out, data)
        return data
    sampler = NvmlSampler(gpus)
    sampler.start()
    if not sampler.running:  # the cards could not be opened (the sampler warned why)
        data = {**head, "state": "no_gpu", "available": False, "reason": "NVML could not open the node's cards",
                "ended_at": time.time()}
        _write(out, data)
        return data
    _write(out, {**head, "state": "sampling", "available": True, "reason": None})
    while not stop.wait(PARENT_CHECK_S):
        if os.getppid() != parent:
            break
    summary = sampler.stop(_rank_reports(rank_dir))
    data = {**head, "state": "done", "available": True, "reason": None, "ended_at": time.time(), "summary": summary}
    _write(out, data)
    return data


# ---------------------------------------------------------------- merging the nodes' files

def read_node_samples(folder: Path, nodes: int) -> dict[int, dict | None]:
    """Node rank -> its sampler's file (None where the node left none)."""
    out: dict[int, dict | None] = {}
    for rank in range(nodes):
        path = folder / NODE_SAMPLES_FILE.format(node_rank=rank)
        try:
            out[rank] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            out[rank] = None
    return out


def _node_entry(rank: int, data: dict | None, name: str | None) -> dict:
    if data is None:
        return {"node_rank": rank, "node": name, "state": "missing", "available": None,
                "reason": "no sampler file: the node's sampler did not start (or the node never ran its command)"}
    summary = data.get("summary") or {}
    entry = {k: data.get(k) for k in PER_NODE_KEYS}
    if data.get("state") == "sampling":  # started, never wrote its end: killed before the launch returned
        entry["reason"] = "the sampler started but was killed before it could write its summary"
    return {**entry, "gpu_indices": summary.get("gpu_indices", []), "achieved_hz": summary.get("achieved_hz"),
            "energy_timed_j": summary.get("energy_timed_j"), "errors": summary.get("errors", [])}


def merge_traces(summaries: list[tuple[str, dict]]) -> dict:
    """One trace over every node's cards, on the time axis of the first node's trace: each node's series is
    interpolated at those moments from its own clock (its ``started_at`` + t). Keys: ``<node>:<index>``."""
    import numpy as np  # here: the sampler itself runs on every node with the standard library and pynvml only

    traced = [(node, s) for node, s in summaries if len((s.get("trace") or {}).get("t") or []) >= 2]
    if not traced:
        return {"t": [], "gpus": {}}
    base = traced[0][1]
    base_t = np.asarray(base["trace"]["t"], dtype=float)
    at = base["started_at"] + base_t
    gpus = {}
    for node, summary in traced:
        own = summary["started_at"] + np.asarray(summary["trace"]["t"], dtype=float)
        for index, series in summary["trace"]["gpus"].items():
            gpus[f"{node}:{index}"] = {key: [round(float(v), 1) for v in np.interp(at, own[:len(values)], values)]
                                       for key, values in series.items() if len(values) >= 2}
    return {"t": [round(float(t), 3) for t in base_t], "gpus": gpus}


def merge_node_samples(folder: Path, nodes: int, node_names: list[str] | None = None) -> dict:
    """The record's ``nvml`` for a cell of ``nodes`` nodes, from their sampler files in ``folder``;
    ``node_names`` (by node rank, from the job's node list) names the nodes that left no file."""
    found = read_node_samples(folder, nodes)
    names = list(node_names or [])
    per_node = [_node_entry(rank, data, names[rank] if rank < len(names) else None) for rank, data in found.items()]
    sampled = {rank: d for rank, d in found.items() if d and d.get("summary")}
    summaries = [(str(d.get("node") or rank), d["summary"]) for rank, d in sampled.items()]
    per_gpu = [{**g, "node": str(d.get("node") or rank), "node_rank": rank}
               for rank, d in sampled.items() for g in d["summary"].get("per_gpu", [])]
    energies = [g.get("energy_timed_j") for g in per_gpu]
    first = summaries[0][1] if summaries else {}
    return {
        "per_node": per_node,
        "nodes_sampled": [n["node"] for n in per_node if n["state"] == "done"],
        "interval_s": first.get("interval_s"),
        "started_at": first.get("started_at"),  # the merged trace's t = 0 (the first sampled node's start)
        "timed_window": first.get("timed_window"),
        "per_gpu": per_gpu,
        "energy_timed_j": sum(energies) if energies and all(e is not None for e in energies) else None,
        "trace": merge_traces(summaries),
        "errors": [f"{node}: {e}" for node, s in summaries for e in s.get("errors", [])],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.machine.node_sampler", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="this node's sampler file (nvml-node-<node rank>.json)")
    parser.add_argument("--gpus", type=int, required=True, help="cards of this node the cell uses (0 on CPU)")
    parser.add_argument("--ranks", type=Path, required=True, help="the cell's ranks folder (the timed window)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sample_node(args.out, args.gpus, args.ranks, stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
