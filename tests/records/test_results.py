"""Records: append-only, whole lines even from concurrent or killed writers, tolerant and strict loading;
and the failure classification's readings of launcher logs and kernel counters."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest

from bench.launch import failures
from bench.records import (MATRIX_COPY, SCHEMA_VERSION, RunRecord, SchemaError, append_record, check_writable,
                           latest_runs, load_records, runs_path, save_matrix_copy)


def make_record(cell_id: str = "abc", status: str = "ok", repeat: int = 0, **extra) -> RunRecord:
    return RunRecord(matrix="m", cell_id=cell_id, label=f"cell {cell_id}", repeat=repeat, settings={"gpus": 1},
                     status=status, started_at=1.0, wall_s=2.0, **extra)


# ---------------------------------------------------------------- appending and loading

def test_records_round_trip_in_order(tmp_path):
    for i, status in enumerate(["ok", "oom", "crash"]):
        append_record(tmp_path, make_record(f"c{i}", status, leftover_processes=[{"pid": 7, "name": "python"}]))
    records = load_records(tmp_path)
    assert [(r.cell_id, r.status) for r in records] == [("c0", "ok"), ("c1", "oom"), ("c2", "crash")]
    assert records[0].leftover_processes == [{"pid": 7, "name": "python"}]
    assert records[0].schema_version == SCHEMA_VERSION


def test_torn_last_line_is_skipped_with_a_warning_and_the_next_record_stays_whole(tmp_path):
    append_record(tmp_path, make_record("a"))
    whole = runs_path(tmp_path).read_bytes()
    with open(runs_path(tmp_path), "ab") as f:  # a writer killed mid-line
        f.write(make_record("torn").model_dump_json().encode()[:40])
    with pytest.warns(UserWarning, match=r"runs.jsonl:2: skipping a torn"):
        assert [r.cell_id for r in load_records(tmp_path)] == ["a"]
    append_record(tmp_path, make_record("b"))
    assert runs_path(tmp_path).read_bytes().startswith(whole)  # nothing written is ever rewritten
    with pytest.warns(UserWarning, match="torn"):
        assert [r.cell_id for r in load_records(tmp_path)] == ["a", "b"]


def _append_many(folder: str, worker: int, n: int) -> None:
    for i in range(n):
        append_record(Path(folder), make_record(f"w{worker}-{i}", error=None, command="x" * 5000))


def test_concurrent_writers_never_interleave_lines(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = runs_path(tmp_path).read_text().splitlines()
    assert len(lines) == 160
    assert all(json.loads(line)["command"] == "x" * 5000 for line in lines)  # every line whole


def test_record_from_a_newer_schema_is_refused_with_the_fix(tmp_path):
    append_record(tmp_path, make_record("a"))
    newer = json.loads(make_record("b").model_dump_json()) | {"schema_version": SCHEMA_VERSION + 1}
    with open(runs_path(tmp_path), "a") as f:
        f.write(json.dumps(newer) + "\n")
    with pytest.raises(SchemaError, match=r"runs.jsonl:2: written by a newer bench.*Fix: upgrade bench"):
        load_records(tmp_path)


def test_a_whole_line_that_is_not_a_record_is_an_error_not_silently_dropped(tmp_path):
    runs_path(tmp_path).write_text('{"schema_version": 1, "matrix": "m"}\n')
    with pytest.raises(SchemaError, match=r"runs.jsonl:1: not a run record"):
        load_records(tmp_path)


def test_latest_runs_keeps_the_last_record_of_each_run(tmp_path):
    records = [make_record("a", "interrupted"), make_record("b", "ok"), make_record("a", "ok"),
               make_record("a", "ok", repeat=1)]
    latest = latest_runs(records)
    assert [(r.cell_id, r.repeat, r.status) for r in latest] == [("a", 0, "ok"), ("b", 0, "ok"), ("a", 1, "ok")]


# ---------------------------------------------------------------- the matrix copy

def test_matrix_copy_is_the_newest_and_a_different_one_is_kept_beside(tmp_path):
    results = tmp_path / "results"
    matrix = tmp_path / "m.yaml"
    matrix.write_text("name: m\n# first\n")
    assert save_matrix_copy(matrix, results) is None  # new: nothing to say
    assert (results / MATRIX_COPY).read_text() == "name: m\n# first\n"
    assert save_matrix_copy(matrix, results) is None  # identical: left as it is, nothing kept beside
    assert sorted(p.name for p in results.iterdir()) == [MATRIX_COPY]
    os.utime(results / MATRIX_COPY, (1_700_000_000, 1_700_000_000))
    matrix.write_text("name: m\n# edited\n")
    note = save_matrix_copy(matrix, results)
    assert (results / MATRIX_COPY).read_text() == "name: m\n# edited\n"
    kept = [p for p in results.iterdir() if p.name != MATRIX_COPY]
    assert len(kept) == 1 and kept[0].read_text() == "name: m\n# first\n" and kept[0].name in note
    matrix.write_text("name: m\n# third\n")
    os.utime(results / MATRIX_COPY, (1_700_000_000, 1_700_000_000))  # the same stamp: a second name
    assert save_matrix_copy(matrix, results)
    assert sorted(p.read_text() for p in results.iterdir()) == [
        "name: m\n# edited\n", "name: m\n# first\n", "name: m\n# third\n"]


# ---------------------------------------------------------------- writable results folder

def test_check_writable_accepts_a_new_folder_under_a_writable_one(tmp_path):
    assert check_writable(tmp_path / "new" / "deeper") is None
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_check_writable_refuses_a_path_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    msg = check_writable(tmp_path / "file" / "results")
    assert msg and "which is a file" in msg and "--results" in msg


def test_check_writable_refuses_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a file" in check_writable(tmp_path / "file")


def test_check_writable_refuses_a_runs_file_that_is_a_folder(tmp_path):
    runs_path(tmp_path).mkdir()
    assert "cannot be appended to" in check_writable(tmp_path)


# ---------------------------------------------------------------- reading launcher logs

# What torchrun printed in a real run here (tests/worker_variants/fault_worker.py, rank 1 SIGKILLed, torch 2.13).
TORCHRUN_SUMMARY = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
======================================================
fault_worker FAILED
------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-27_19:26:01
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 3615)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 3615
------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-27_19:26:01
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 3616)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 3616
======================================================
"""


def test_launcher_failures_from_torchrun_summary_ignores_the_teardown_sigterm():
    exits = failures.launcher_failures(TORCHRUN_SUMMARY)
    assert {(e.rank, e.exitcode, e.pid) for e in exits} == {(0, -15, 3615), (1, -9, 3616)}
    dead = failures.killed_by_signal(exits)
    assert (dead.rank, dead.signal) == (1, signal.SIGKILL)


def test_launcher_failures_from_accelerate_single_process_launcher():
    text = "subprocess.CalledProcessError: Command '['python', '-m', 'w']' died with <Signals.SIGSEGV: 11>."
    assert failures.killed_by_signal(failures.launcher_failures(text)).signal == signal.SIGSEGV
    text = "subprocess.CalledProcessError: Command '['python']' returned non-zero exit status 3."
    assert failures.launcher_failures(text) == [failures.RankExit(0, 3)]
    assert failures.killed_by_signal(failures.launcher_failures(text)) is None


def test_nccl_watchdog_lines_name_the_waiting_ranks():
    text = ("[rank0]:[E1218 20:27:21.426415540 ProcessGroupNCCL.cpp:629] [Rank 0] Watchdog caught collective "
            "operation timeout: WorkNCCL(SeqNum=1, OpType=BROADCAST, Timeout(ms)=600000) ran for 600081 ms\n")
    assert list(failures.nccl_watchdog_timeouts(text)) == [0]


def test_oom_kill_counters_read_the_kernel():
    counters = failures.oom_kill_counters()
    if not Path("/proc/vmstat").read_text().count("oom_kill "):
        pytest.skip("this kernel does not count OOM kills in /proc/vmstat")
    assert isinstance(counters["/proc/vmstat"], int)


def test_sigkill_is_host_oom_only_when_a_kernel_counter_rose():
    dead = failures.RankExit(1, -9, pid=os.getpid())
    calm = failures.Outcome(oom_kills_before={"/proc/vmstat": 3}, oom_kills_after={"/proc/vmstat": 3})
    status, error = failures._signal_death(calm, dead, "")
    # dmesg may be readable here: our own pid was never OOM-killed, so it cannot say otherwise
    assert (status, error.rank, error.signal) == ("crash", 1, "SIGKILL")
    rose = failures.Outcome(oom_kills_before={"/proc/vmstat": 3}, oom_kills_after={"/proc/vmstat": 4})
    status, error = failures._signal_death(rose, dead, "")
    assert status == "oom" and "OOM killer" in error.message and error.rank == 1
