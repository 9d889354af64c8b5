"""Failures are results: faults injected through the real launch path, one matrix per fault.

Each test runs `bench run --worker fault_worker` (real accelerate launch, real gloo ranks, real model)
with a fault chosen by BENCH_FAULT, then asserts the recorded status and rank, that the other cells of
the matrix still ran, and that no process of any cell is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, TESTS, bench, write_matrix

from bench.results import load_records

FAULTY = "tiny-llama full ddp x2proc"  # BENCH_FAULT_RANK=1 hits only the 2-process cells
HEALTHY = "tiny-llama full ddp x1proc"


def run_faulty(tmp_path: Path, fault: str, *, limits: dict | None = None, gpus=(2, 1), **env) -> dict[str, list]:
    matrix = write_matrix(tmp_path, "f", grid={"strategy": ["ddp"], "gpus": list(gpus)}, limits=limits or {})
    proc = bench("run", str(matrix), "--results", str(tmp_path / "results"), "--worker", "fault_worker",
                 env={"BENCH_FAULT": fault, **env})
    assert proc.returncode == 0, f"failures are results, exit 0 expected\n{proc.stdout}\n{proc.stderr}"
    assert_no_process_left(tmp_path)
    by_label: dict[str, list] = {}
    for r in load_records(tmp_path / "results"):
        by_label.setdefault(r.label, []).append(r)
    return by_label


def processes_mentioning(path: Path) -> list[psutil.Process]:
    """Live processes whose command line names a file under ``path`` (every launch names its cell folder)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and str(path) in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


def assert_no_process_left(path: Path) -> None:
    left = processes_mentioning(path)
    assert not left, f"processes left after the matrix: {[(p.pid, p.cmdline()) for p in left]}"


def only_record(by_label: dict, label: str):
    assert len(by_label.get(label, [])) == 1, f"one record of {label} expected, got {by_label}"
    return by_label[label][0]


def assert_healthy_cell_ran(by_label: dict) -> None:
    record = only_record(by_label, HEALTHY)
    assert record.status == "ok", record.error
    assert record.leftover_processes == []


# ---------------------------------------------------------------- faults in a rank

def test_oom_on_rank_1_only_is_oom_of_rank_1(tmp_path):
    by_label = run_faulty(tmp_path, "oom")
    record = only_record(by_label, FAULTY)
    assert record.status == "oom"
    assert record.error.rank == 1
    assert "OutOfMemoryError" in record.error.message
    assert record.leftover_processes == []
    assert_healthy_cell_ran(by_label)


def test_rank_stuck_so_its_peer_times_out_in_a_collective_is_a_hang(tmp_path):
    # Rank 1 stops at step 1; rank 0 waits in the gradient all-reduce until the 5 s gloo timeout.
    by_label = run_faulty(tmp_path, "stuck", limits={"collective_timeout_s": 5, "hang_s": 120})
    record = only_record(by_label, FAULTY)
    assert record.status == "hang", record.error
    assert record.error.rank == 1, record.error.message  # the stuck one, not the one that timed out
    assert "collective" in record.error.message
    assert record.wall_s < 100  # the collective timeout ended it, not the 120 s hang watchdog
    assert_healthy_cell_ran(by_label)


def test_rank_killed_by_sigkill_without_host_oom_is_a_crash_of_that_rank(tmp_path):
    by_label = run_faulty(tmp_path, "kill", BENCH_FAULT_SIGNAL="SIGKILL")
    record = only_record(by_label, FAULTY)
    assert record.status == "crash", record.error  # not "oom": the kernel's OOM-kill counter did not move
    assert record.error.rank == 1
    assert "SIGKILL" in record.error.message
    assert_healthy_cell_ran(by_label)


def test_rank_killed_by_sigsegv_is_a_crash_of_that_rank(tmp_path):
    by_label = run_faulty(tmp_path, "kill", BENCH_FAULT_SIGNAL="SIGSEGV", BENCH_FAULT_RANK="0", gpus=(1, 2))
    record = only_record(by_label, HEALTHY)  # the 1-process cell dies too: its only rank is rank 0
    assert record.status == "crash" and record.error.rank == 0 and "SIGSEGV" in record.error.message
    record = only_record(by_label, FAULTY)
    assert record.status == "crash" and record.error.rank == 0 and "SIGSEGV" in record.error.message


def _memory_cgroup(tmp_path: Path, limit_bytes: int) -> Path | None:
    """A fresh cgroup-v1 memory group with a small limit, or None where we may not make one."""
    root = Path("/sys/fs/cgroup/memory")
    group = root / f"bench-test-{os.getpid()}-{tmp_path.name}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        (group / "memory.swappiness").write_text("0")  # no way out through swap
    except OSError:
        return None
    return group


def test_rank_killed_by_the_kernel_oom_killer_is_oom(tmp_path):
    """A real kernel OOM kill: rank 1 joins a memory cgroup capped at 64 MiB and allocates past it."""
    group = _memory_cgroup(tmp_path, 64 * 2**20)
    if group is None:
        pytest.skip("cannot create a cgroup-v1 memory group here (needs root and the v1 memory controller)")
    try:
        by_label = run_faulty(tmp_path, "host_oom", BENCH_FAULT_CGROUP=str(group))
    finally:
        group.rmdir()
    record = only_record(by_label, FAULTY)
    assert record.status == "oom", record.error
    assert record.error.rank == 1
    assert "OOM killer" in record.error.message
    assert_healthy_cell_ran(by_label)


# ---------------------------------------------------------------- the watchdog and the process tree

def test_one_second_cell_timeout_records_timeout_for_every_cell(tmp_path):
    by_label = run_faulty(tmp_path, "", limits={"timeout_s": 1})
    for label in (FAULTY, HEALTHY):
        record = only_record(by_label, label)
        assert record.status == "timeout", record.error
        assert "limits.timeout_s" in record.error.message
        assert record.wall_s < 60


def test_hang_with_ranks_that_ignore_sigterm_ends_in_sigkill_of_the_whole_tree(tmp_path):
    # torchrun starts each rank in a session of its own: signalling the launcher's group alone would
    # leave these ranks running. The runner must find them and SIGKILL them after the grace period.
    by_label = run_faulty(tmp_path, "ignore_term", limits={"hang_s": 4, "collective_timeout_s": 300},
                          BENCH_FAULT_RANK="all", gpus=(2,))
    record = only_record(by_label, FAULTY)
    assert record.status == "hang", record.error
    assert "limits.hang_s" in record.error.message


def test_process_that_escapes_the_launch_is_killed_and_recorded(tmp_path):
    by_label = run_faulty(tmp_path, "orphan", BENCH_FAULT_RANK="0", gpus=(1,))
    record = only_record(by_label, HEALTHY)
    assert record.status == "ok"  # the training step itself was fine
    assert len(record.leftover_processes) == 1, record.leftover_processes
    orphan = record.leftover_processes[0]
    assert "time.sleep(600)" in orphan["cmdline"]
    assert not psutil.pid_exists(orphan["pid"]) or psutil.Process(orphan["pid"]).status() == psutil.STATUS_ZOMBIE


# ---------------------------------------------------------------- Ctrl-C and resume

def _start_bench(args: list[str], env: dict) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "COLUMNS": "200", **env}
    return subprocess.Popen([sys.executable, "-m", "bench.cli", *args], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_sigint_mid_matrix_records_interrupted_then_resume_completes_without_duplicates(tmp_path):
    matrix = write_matrix(tmp_path, "r", grid={"strategy": ["ddp"], "gpus": [1, 2]},
                          include=[{"strategy": "zero1", "gpus": 1}])
    results = tmp_path / "results"
    args = ["run", str(matrix), "--results", str(results), "--worker", "fault_worker"]
    # Every rank sleeps 4 s in step 1, so the second cell is surely mid-step when Ctrl-C comes.
    env = {"BENCH_FAULT": "slow", "BENCH_FAULT_RANK": "all", "BENCH_FAULT_SLEEP_S": "4"}
    proc = _start_bench(args, env)
    runs = results / "runs.jsonl"
    _wait_for(lambda: len(_lines(runs)) == 1, 120, "the first cell's record")
    second_cell = results / "cells"
    _wait_for(lambda: any(p.name.startswith("heartbeat") for p in second_cell.glob("*/ranks/*")
                          if json.loads(_lines(runs)[0])["cell_id"] not in str(p)), 60, "the second cell's heartbeat")
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends to bench
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "Resume with" in out and f"--results {results}" in out.replace("\n", " ")
    assert_no_process_left(tmp_path)
    first = [json.loads(line) for line in _lines(runs)]
    assert [r["status"] for r in first] == ["ok", "interrupted"]

    # A writer killed mid-line leaves a torn line; loading skips it, appending ends it first.
    with open(runs, "a") as f:
        f.write('{"schema_version": 1, "matrix": "r", "cell_')
    proc = bench(*args, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming: 1 run(s) already recorded" in proc.stdout
    assert "torn" in proc.stderr
    assert_no_process_left(tmp_path)
    with pytest.warns(UserWarning, match="torn"):
        records = load_records(results)
    assert [r.status for r in records] == ["ok", "interrupted", "ok", "ok"]  # nothing rewritten, nothing lost
    ok_ids = [r.cell_id for r in records if r.status == "ok"]
    assert len(ok_ids) == len(set(ok_ids)) == 3  # every cell ran to ok exactly once
    assert records[1].cell_id in ok_ids  # the interrupted cell was run again


def test_resume_skips_deterministic_failures_unless_retry_failed(tmp_path):
    by_label = run_faulty(tmp_path, "oom", gpus=(2,))
    assert only_record(by_label, FAULTY).status == "oom"
    matrix = tmp_path / "f.yaml"
    again = bench("run", str(matrix), "--results", str(tmp_path / "results"), "--worker", "fault_worker")
    assert again.returncode == 0 and "nothing to run" in again.stdout
    retry = bench("run", str(matrix), "--results", str(tmp_path / "results"), "--retry-failed")
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert [r.status for r in load_records(tmp_path / "results")] == ["oom", "ok"]
    assert_no_process_left(tmp_path)
