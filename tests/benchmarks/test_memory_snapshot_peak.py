"""benchmarks/memory_snapshot_peak.py on a snapshot written out by hand in torch's format (segments at the end,
device_traces since recording began); the real snapshots are written on GPU (tests/gpu/test_memory_snapshot_gpu.py)."""

from __future__ import annotations

import importlib.util
import pickle

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("memory_snapshot_peak", REPO / "benchmarks" / "memory_snapshot_peak.py")
msp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(msp)

MIB = 2**20


def seg(stream, total, live, pending=0, device=0):
    return {"device": device, "stream": stream, "total_size": total * MIB,
            "blocks": [{"size": live * MIB, "state": "active_allocated"},
                       {"size": pending * MIB, "state": "active_pending_free"},
                       {"size": (total - live - pending) * MIB, "state": "inactive"}]}


def ev(action, size, stream=0):
    return {"action": action, "size": size * MIB, "stream": stream, "addr": 0}


# Before recording: one 20 MiB segment on stream 0 with 10 MiB allocated. Then: a 100 MiB segment and an
# 80 MiB tensor in it; a 40 MiB segment on side stream 7 (the peak: 160 MiB reserved); the 80 MiB tensor freed
# while another stream still uses it (record_stream: out of allocated_bytes at once, reusable at its
# free_completed) and a 30 MiB tensor on stream 7; both freed, the side segment released; a 5 MiB tensor into
# cached memory at the end, and a 4 MiB one freed the same way as the 80 MiB one, still pending at the end.
EVENTS = [
    ev("segment_alloc", 100), ev("alloc", 80), ev("segment_alloc", 40, 7),
    ev("free_requested", 80), ev("alloc", 30, 7), ev("free_completed", 80),
    ev("free_requested", 30, 7), ev("free_completed", 30, 7), ev("segment_free", 40, 7),
    ev("alloc", 5), ev("alloc", 4), ev("free_requested", 4),
]
SNAPSHOT = {
    "segments": [seg(0, 20, 10), seg(0, 100, 5, pending=4)],
    "device_traces": [EVENTS],
}


def test_the_peak_and_each_streams_share_of_it_are_rebuilt_from_the_events():
    peak = msp.at_peak(SNAPSHOT)
    assert peak["reserved"] == 160 * MIB and peak["allocated"] == 90 * MIB
    assert peak["peak_allocated"] == 90 * MIB  # torch's allocated_bytes: not 120, the 80 MiB left at its request
    assert peak["event"] == {"index": 2, "action": "segment_alloc", "size": 40 * MIB, "stream": 7}
    assert peak["streams"][0] == {"reserved": 120 * MIB, "allocated": 90 * MIB, "free": 30 * MIB}
    assert peak["streams"][7]["reserved"] == 40 * MIB and peak["streams"][7]["allocated"] == 0  # not yet used
    text = msp.render(peak)
    assert "reserved peak 0.16 GiB" in text and "| 7 | 0.04 | 0.00 | 0.04 |" in text


def test_a_ranks_own_device_is_read_by_default():
    rank1 = {"segments": [seg(0, 20, 10, device=1), seg(0, 100, 5, pending=4, device=1)],
             "device_traces": [[], EVENTS]}
    assert msp.at_peak(rank1)["device"] == 1 and msp.at_peak(rank1) == {**msp.at_peak(SNAPSHOT), "device": 1}
    assert msp.at_peak(rank1, device=0)["events"] == 0


def test_the_command_reads_a_pickle_and_refuses_anything_else(tmp_path, capsys):
    good = tmp_path / "memory-snapshot-rank0.pickle"
    good.write_bytes(pickle.dumps(SNAPSHOT))
    assert msp.main([str(good)]) == 0 and "reserved peak" in capsys.readouterr().out
    bad = tmp_path / "bad.pickle"
    bad.write_bytes(b"not a pickle")
    assert msp.main([str(bad)]) == 2 and "memory-snapshot-rank<k>.pickle" in capsys.readouterr().err


@pytest.mark.parametrize("env, expect", [(None, None), ("1", {"written": False, "why": "not a CUDA rank"})])
def test_the_worker_takes_no_snapshot_on_cpu_and_says_why_when_asked(monkeypatch, tmp_path, env, expect):
    import torch

    from bench.worker import memory_snapshot

    if env:
        monkeypatch.setenv(memory_snapshot.ENV, env)
    else:
        monkeypatch.delenv(memory_snapshot.ENV, raising=False)

    def step():
        return {"loss": 0.0}

    wrapped = memory_snapshot.from_env(step, 3, torch.device("cpu"), tmp_path, 0)
    assert wrapped is step
    assert memory_snapshot.describe(wrapped, 3, torch.device("cpu")) == expect
    assert memory_snapshot.unavailable(0, torch.device("cuda")).startswith("no warm-up step")


def test_the_flag_reaches_every_launch(tmp_path):
    from conftest import bench

    proc = bench("run", "matrices/smoke.yaml", "--dry-run", "--memory-snapshot", "--results", str(tmp_path / "r"),
                 check=True)
    launches = [line for line in proc.stdout.splitlines() if "accelerate.commands.launch" in line]
    assert launches and all("BENCH_MEMORY_SNAPSHOT=1" in line for line in launches)
