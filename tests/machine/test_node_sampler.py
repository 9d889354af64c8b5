"""Each node's NVML sampler (bench/machine/node_sampler.py) and the merge of the nodes' files into a record.

On this CPU machine NVML is absent: the real module, run as the batch script runs it, must say so at once.
Sampling itself runs on the fake NVML of test_sampler.py (the real one: tests/gpu/, on a GPU machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.machine import gpu_state, node_sampler
from bench.machine.node_sampler import merge_node_samples, sample_node
from bench.machine.sampler import GpuTrace, summarise
from conftest import REPO
from test_sampler import FakeNvml


def test_a_node_without_a_card_to_sample_writes_its_file_at_once_and_says_why(tmp_path):
    out = tmp_path / "nvml-node-1.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLURM_NODEID": "1", "SLURMD_NODENAME": "n2"}
    proc = subprocess.run([sys.executable, "-m", "bench.machine.node_sampler", str(out), "--gpus", "0",
                           "--ranks", str(tmp_path / "ranks")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert (data["node_rank"], data["node"], data["state"], data["available"]) == (1, "n2", "no_gpu", False)
    assert data["reason"]  # no NVML here; on a GPU machine: the cell uses no GPU


@pytest.fixture
def fake_nvml(monkeypatch):
    lib = FakeNvml(count=2)
    monkeypatch.setattr(gpu_state, "nvml", lambda: lib)
    return lib


def test_a_sampling_node_stops_when_told_and_writes_its_cards_over_the_ranks_window(tmp_path, fake_nvml, monkeypatch):
    monkeypatch.setenv("SLURM_NODEID", "0")
    monkeypatch.setenv("SLURMD_NODENAME", "n1")
    monkeypatch.setenv("BENCH_SAMPLER_INTERVAL_S", "0.01")
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    out = tmp_path / "nvml-node-0.json"
    stop = threading.Event()
    thread = threading.Thread(target=sample_node, args=(out, 2, ranks, stop))
    thread.start()
    deadline = time.time() + 10
    while not (out.exists() and json.loads(out.read_text())["state"] == "sampling"):
        assert time.time() < deadline, "the sampler wrote no 'sampling' file"
        time.sleep(0.02)
    t0 = time.time()
    time.sleep(0.3)
    (ranks / "rank0.json").write_text(json.dumps({"rank": 0, "timed_window": [t0, time.time()]}))
    stop.set()
    thread.join(timeout=10)
    data = json.loads(out.read_text())
    assert data["state"] == "done" and data["node"] == "n1"
    summary = data["summary"]
    assert [g["index"] for g in summary["per_gpu"]] == [0, 1]
    assert summary["timed_window"][0] == pytest.approx(t0)
    assert summary["energy_timed_j"] == pytest.approx(2 * 300 * 0.3, rel=0.3)  # two cards at 300 W for ~0.3 s


def _summary(started: float, watts: float, node_gpus: int = 2) -> dict:
    traces = []
    for index in range(node_gpus):
        tr = GpuTrace(index, "Fake H100", 80 << 30)
        for i in range(11):
            tr.t.append(started + i * 0.1)
            tr.mem_used.append((index + 1) << 30)
            tr.util.append(90.0)
            tr.power_w.append(watts)
            tr.energy_mj.append(i * 0.1 * watts * 1000)
            tr.sm_clock_mhz.append(1980.0)
            tr.reasons.append(0)
        traces.append(tr)
    return summarise(traces, 0.1, started, (started + 0.2, started + 0.8))


def test_the_merge_covers_every_card_of_every_node_and_names_each_nodes_sampler(tmp_path):
    start = 1000.0
    files = {0: {"node_rank": 0, "node": "n1", "hostname": "a", "state": "done", "available": True,
                 "summary": _summary(start, 300.0)},
             1: {"node_rank": 1, "node": "n2", "hostname": "b", "state": "done", "available": True,
                 "summary": _summary(start + 0.05, 200.0)},
             2: {"node_rank": 2, "node": "n3", "hostname": "c", "state": "no_gpu", "available": False,
                 "reason": "no NVML on this node"}}
    for rank, data in files.items():
        (tmp_path / node_sampler.NODE_SAMPLES_FILE.format(node_rank=rank)).write_text(json.dumps(data))
    merged = merge_node_samples(tmp_path, nodes=4, node_names=["n1", "n2", "n3", "n4"])
    assert [(n["node"], n["state"]) for n in merged["per_node"]] == [
        ("n1", "done"), ("n2", "done"), ("n3", "no_gpu"), ("n4", "missing")]
    assert merged["nodes_sampled"] == ["n1", "n2"]
    assert [(g["node"], g["node_rank"], g["index"]) for g in merged["per_gpu"]] == [
        ("n1", 0, 0), ("n1", 0, 1), ("n2", 1, 0), ("n2", 1, 1)]
    assert merged["energy_timed_j"] == pytest.approx(2 * 300 * 0.6 + 2 * 200 * 0.6)
    assert sorted(merged["trace"]["gpus"]) == ["n1:0", "n1:1", "n2:0", "n2:1"]
    assert merged["trace"]["gpus"]["n2:1"]["power_w"][0] == 200.0
    assert "no NVML" in merged["per_node"][2]["reason"] and "no sampler file" in merged["per_node"][3]["reason"]
