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

from conftest import REPO, WORKER_VARIANTS, bench, write_matrix

from bench.launch import runner
from bench.records import load_records

FAULTY = "tiny-llama full ddp x2proc"
HEALTHY = "tiny-llama full ddp x1proc"
pytestmark = pytest.mark.launch_aside  # DDP cells only (tests/conftest.py: launch lanes)

# One matrix, one fault per cell (cells told apart by train.seed): the faults must not stop the others.
FAULT_PLAN = {
    "1": {"fault": "oom", "rank": 1},
    "2": {"fault": "kill", "rank": 1, "signal": "SIGKILL"},
    "3": {"fault": "kill", "rank": 0, "signal": "SIGSEGV"},  # a 1-process cell: accelerate's simple launcher
    "4": {"fault": "stuck", "rank": 1},
    "5": {"fault": "host_oom", "rank": 1},
    "6": {"fault": "orphan", "rank": 0},
}


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


def _memory_cgroup(folder: Path, limit_bytes: int) -> Path | None:
    """A fresh cgroup-v1 memory group with a small limit, or None where we may not make one."""
    group = Path("/sys/fs/cgroup/memory") / f"bench-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        (group / "memory.swappiness").write_text("0")  # no way out through swap
    except OSError:
        return None
    return group


@pytest.fixture(scope="module")
def faulted(tmp_path_factory) -> dict:
    """Run the fault matrix once: {seed: record}, plus the bench output and folder."""
    folder = tmp_path_factory.mktemp("faults")
    group = _memory_cgroup(folder, 64 * 2**20)
    seeds = [1, 2, 4, 6] + ([5] if group else [])
    matrix = write_matrix(folder, "f", gpus=2, grid={"seed": seeds}, include=[{"seed": 3, "gpus": 1}],
                          limits={"collective_timeout_s": 10, "hang_s": 120})
    env = {"BENCH_FAULT_PLAN": json.dumps(FAULT_PLAN), "BENCH_FAULT_CGROUP": str(group or "")}
    try:
        proc = bench("run", str(matrix), "--results", str(folder / "results"), "--worker", "fault_worker", env=env)
    finally:
        if group:
            group.rmdir()
    records = load_records(folder / "results")
    by_seed = {}
    for r in records:
        assert r.settings["train"]["seed"] not in by_seed, "one record per cell"
        by_seed[r.settings["train"]["seed"]] = r
    return {"proc": proc, "by_seed": by_seed, "folder": folder, "matrix": matrix, "cgroup": group}


def test_a_matrix_of_failing_cells_completes_with_exit_0_and_no_process_left(faulted):
    proc = faulted["proc"]
    assert proc.returncode == 0, f"failures are results\n{proc.stdout}\n{proc.stderr}"
    assert sorted(faulted["by_seed"]) == sorted([1, 2, 3, 4, 6] + ([5] if faulted["cgroup"] else []))
    assert faulted["by_seed"][6].status == "ok"  # a healthy cell ran, after all the failures
    assert_no_process_left(faulted["folder"])


def test_oom_on_rank_1_only_is_oom_of_rank_1(faulted):
    record = faulted["by_seed"][1]
    assert record.status == "oom", record.error
    assert record.error.rank == 1
    assert "OutOfMemoryError" in record.error.message
    assert record.leftover_processes == []


def test_rank_killed_by_sigkill_without_host_oom_is_a_crash_of_that_rank(faulted):
    record = faulted["by_seed"][2]
    assert record.status == "crash", record.error  # not "oom": the kernel's OOM-kill counters did not move
    assert record.error.rank == 1
    assert "SIGKILL" in record.error.message


def test_single_process_rank_killed_by_sigsegv_is_a_crash_of_rank_0(faulted):
    record = faulted["by_seed"][3]
    assert record.label == HEALTHY  # the one-process cell
    assert record.status == "crash", record.error
    assert record.error.rank == 0 and "SIGSEGV" in record.error.message


def test_rank_stuck_so_its_peer_times_out_in_a_collective_is_a_hang_of_the_stuck_rank(faulted):
    # Rank 1 stops in step 1; rank 0 waits in the gradient all-reduce until the 10 s gloo timeout.
    record = faulted["by_seed"][4]
    assert record.status == "hang", record.error
    assert record.error.rank == 1, record.error.message  # the stuck one, not the one that timed out
    assert "collective" in record.error.message
    assert record.wall_s < 100  # the collective timeout ended it, not the 120 s hang watchdog


def test_rank_killed_by_the_kernel_oom_killer_is_oom(faulted):
    """A real kernel OOM kill: rank 1 joins a memory cgroup capped at 64 MiB and allocates past it."""
    if not faulted["cgroup"]:
        pytest.skip("cannot create a cgroup-v1 memory group here (needs root and the v1 memory controller)")
    record = faulted["by_seed"][5]
    assert record.status == "oom", record.error
    assert record.error.rank == 1
    assert "OOM killer" in record.error.message


def test_process_that_escapes_the_launch_is_killed_and_recorded(faulted):
    record = faulted["by_seed"][6]
    assert record.status == "ok"  # the training step itself was fine
    assert len(record.leftover_processes) == 1, record.leftover_processes
    orphan = record.leftover_processes[0]
    assert "time.sleep(600)" in orphan["cmdline"]
    assert not psutil.pid_exists(orphan["pid"]) or psutil.Process(orphan["pid"]).status() == psutil.STATUS_ZOMBIE
    assert "killed 1 process(es) left by this cell" in faulted["proc"].stdout


def test_resume_skips_deterministic_failures_unless_retry_failed(faulted):
    args = ["run", str(faulted["matrix"]), "--results", str(faulted["folder"] / "results"), "--only", "seed=1"]
    again = bench(*args, "--worker", "fault_worker", env={"BENCH_FAULT_PLAN": json.dumps(FAULT_PLAN)})
    assert again.returncode == 0 and "nothing to run" in again.stdout, again.stdout + again.stderr
    retry = bench(*args, "--retry-failed")  # the real worker this time: the cell now runs to ok
    assert retry.returncode == 0, retry.stdout + retry.stderr
    seed1 = [r.status for r in load_records(faulted["folder"] / "results") if r.settings["train"]["seed"] == 1]
    assert seed1 == ["oom", "ok"]


def run_faulty(tmp_path: Path, fault: str, *, limits: dict | None = None, gpus=(2, 1), train: dict | None = None,
               **env) -> dict[str, list]:
    matrix = write_matrix(tmp_path, "f", grid={"strategy": ["ddp"], "gpus": list(gpus)}, limits=limits or {},
                          **({"train": train} if train else {}))
    proc = bench("run", str(matrix), "--results", str(tmp_path / "results"), "--worker", "fault_worker",
                 env={"BENCH_FAULT": fault, **env})
    assert proc.returncode == 0, f"failures are results, exit 0 expected\n{proc.stdout}\n{proc.stderr}"
    assert_no_process_left(tmp_path)
    by_label: dict[str, list] = {}
    for r in load_records(tmp_path / "results"):
        by_label.setdefault(r.label, []).append(r)
    return by_label


def only_record(by_label: dict, label: str):
    assert len(by_label.get(label, [])) == 1, f"one record of {label} expected, got {by_label}"
    return by_label[label][0]


# ---------------------------------------------------------------- the watchdog and the process tree

# Each cell of the timeout test waits this long. A tiny cell reaches its first step 5-8 s after launch on 2
# shared cores (first_step_s of these records), so the start-up allowance below it keeps 2.5x headroom.
TIMEOUT_S = 20


def test_cell_timeout_records_timeout_for_every_cell(tmp_path):
    # bench refuses a timeout_s shorter than startup_s + train.timing.max_timed_s (tested in
    # test_bad_input), so the timeout is reached the way a real cell reaches it: a step that never ends
    # (every rank sleeps in its first timed step), within the start-up allowance and before hang_s.
    by_label = run_faulty(tmp_path, "slow", limits={"timeout_s": TIMEOUT_S, "startup_s": TIMEOUT_S - 1, "hang_s": 120},
                          train={"timing": {"max_steps": 3, "max_timed_s": 1}},
                          BENCH_FAULT_RANK="all", BENCH_FAULT_SLEEP_S="600")
    for label in (FAULTY, HEALTHY):
        record = only_record(by_label, label)
        assert record.status == "timeout", record.error
        assert "limits.timeout_s" in record.error.message
        assert record.first_step_s is not None  # it timed out in the step, not in start-up
        assert record.wall_s < TIMEOUT_S + runner.TERM_GRACE_S + 15


def test_hang_with_ranks_that_ignore_sigterm_ends_in_sigkill_of_the_whole_tree(tmp_path):
    # torchrun starts each rank in a session of its own: signalling the launcher's group alone would
    # leave these ranks running. The runner must find them and SIGKILL them after the grace period.
    by_label = run_faulty(tmp_path, "ignore_term", limits={"hang_s": 4, "collective_timeout_s": 300},
                          BENCH_FAULT_RANK="all", gpus=(2,))
    record = only_record(by_label, FAULTY)
    assert record.status == "hang", record.error
    assert "limits.hang_s" in record.error.message
    assert record.first_step_s is not None  # it hung in the steps, where the fault is, not in start-up
    log = (Path(record.cell_dir) / "launch.log").read_text()
    assert log.count("ignores SIGTERM") == 2  # both ranks really refused SIGTERM: only SIGKILL ended them
    assert record.wall_s >= runner.TERM_GRACE_S


# ---------------------------------------------------------------- Ctrl-C and resume

def _start_bench(args: list[str], env: dict) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER_VARIANTS), str(REPO)]), "COLUMNS": "200", **env}
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
    matrix = write_matrix(tmp_path, "r", grid={"gpus": [1, 2]}, include=[{"seed": 1, "gpus": 1}])
    results = tmp_path / "results"
    args = ["run", str(matrix), "--results", str(results), "--worker", "fault_worker"]
    # Rank 1 exists only in the second cell: it sleeps there in step 1, so Ctrl-C comes mid-step.
    proc = _start_bench(args, {"BENCH_FAULT": "slow", "BENCH_FAULT_RANK": "1", "BENCH_FAULT_SLEEP_S": "600"})
    runs = results / "runs.jsonl"
    _wait_for(lambda: len(_lines(runs)) == 1, 120, "the first cell's record")
    beats = results / "cells"
    _wait_for(lambda: any(json.loads(p.read_text()).get("step") == 1 for p in beats.glob("*/ranks/heartbeat1.json")),
              120, "rank 1 of the second cell in step 1")
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends to bench
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "Resume with" in out and f"--results {results}" in out.replace("\n", " ")
    assert_no_process_left(tmp_path)
    first = [json.loads(line) for line in _lines(runs)]
    assert [r["status"] for r in first] == ["ok", "interrupted"]
    assert first[1]["settings"]["gpus"] == 2 and first[1]["leftover_processes"] == []

    # A writer killed mid-line leaves a torn line; loading skips it, appending ends it first.
    with open(runs, "a") as f:
        f.write('{"schema_version": 1, "matrix": "r", "cell_')
    proc = bench(*args)  # no fault this time
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


# ---------------------------------------------------------------- on GPUs (the lead's machine)

def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def assert_gpus_released(record) -> None:
    """NVML's process list after the cell holds no process of it (None only where NVML is absent)."""
    assert record.leftover_gpu_processes is not None, "NVML should be readable on a GPU machine"
    assert not [p for p in record.leftover_gpu_processes if p["ours"]], record.leftover_gpu_processes


@pytest.mark.gpu
@pytest.mark.skipif(cuda_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_faults_oom_kill_and_stuck_nccl_collective(tmp_path):
    plan = {"1": {"fault": "kill", "rank": 1, "signal": "SIGKILL"}, "2": {"fault": "stuck", "rank": 1}}
    matrix = write_matrix(tmp_path, "g", device="cuda", gpus=2, grid={"seed": [0, 1, 2]},
                          include=[{"seed": 3, "gpus": 1, "gpu_memory_gib": 0.05,
                                    "train": {"micro_batch": 64, "seq_len": 2048}}],
                          train={"precision": "bf16"}, limits={"collective_timeout_s": 20, "hang_s": 300})
    proc = bench("run", str(matrix), "--results", str(tmp_path / "results"), "--worker", "fault_worker", "--force",
                 env={"BENCH_FAULT_PLAN": json.dumps(plan)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_no_process_left(tmp_path)
    by_seed = {r.settings["train"]["seed"]: r for r in load_records(tmp_path / "results")}
    assert by_seed[0].status == "ok", by_seed[0].error
    assert (by_seed[1].status, by_seed[1].error.rank) == ("crash", 1) and "SIGKILL" in by_seed[1].error.message
    assert (by_seed[2].status, by_seed[2].error.rank) == ("hang", 1), by_seed[2].error
    assert by_seed[2].wall_s < 250  # NCCL's shortened timeout ended it, not the 300 s hang watchdog
    assert by_seed[3].status == "oom", by_seed[3].error  # a real CUDA OOM under a 0.05 GiB cap
    for record in by_seed.values():
        assert_gpus_released(record)


def test_root_cause_lines_of_a_log_whose_last_line_is_the_error(tmp_path):
    """srun's last words ("srun: error: n1: task 0: Terminated") end a Slurm job's log."""
    from bench.launch.failures import root_cause_lines

    log = tmp_path / "launch.log"
    log.write_text("step 1\nsrun: error: n2: task 1: Terminated\nsrun: error: n1: task 0: Terminated\n")
    assert root_cause_lines(log).splitlines() == ["step 1", "srun: error: n2: task 1: Terminated",
                                                  "srun: error: n1: task 0: Terminated"]
