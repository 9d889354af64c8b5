"""bench.launch.slurm against a real Slurm cluster: two nodes n1, n2 on this host (`.ci/slurm-cluster.sh start`).

Without a cluster these tests skip with the reason; under CI=true they fail instead, so that a cluster
that did not come up cannot pass CI silently.

Slurm's own time limit is not tested here: it counts in whole minutes and slurmctld checks it every
30 s, so a 1-minute job ends TIMEOUT after about 90 s (measured: 87 s). bench's own limit, which cancels
the job, is tested here; a whole cell past Slurm's limit once, marked slow, in test_slurm_runs.py: its job
is submitted by this module's cluster fixture and waited for at the end of the session.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from bench.launch.slurm import (SlurmJob, SlurmOptions, accelerate_node_command, bench_status, failed_nodes, job_info,
                                queue_state, read_node_ends, render_batch_script, write_batch_script)

from conftest import REPO, SLURM_TIME_LIMIT_TEST, WORKER_VARIANTS, require_slurm_cluster

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def cluster(request) -> None:
    require_slurm_cluster()
    if any(item.originalname == SLURM_TIME_LIMIT_TEST for item in request.session.items):
        # Submitted now, with the first Slurm test; its test runs last and waits for it (tests/conftest.py).
        request.getfixturevalue("slurm_time_limit_run")


def _script(folder: Path, node_command: str, nodes: int = 2, **options) -> Path:
    text = render_batch_script(job_name=f"bench-test-{folder.name}", folder=folder, nodes=nodes,
                               node_command=node_command, options=SlurmOptions(time_limit_s=300, **options))
    return write_batch_script(folder, text)


def _err(folder: Path, job_id: int) -> str:
    path = folder / f"slurm-{job_id}.err"
    return path.read_text() if path.exists() else ""


def _wait_running(job: SlurmJob, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while job.state() != "RUNNING":
        assert time.monotonic() < deadline, f"job {job.job_id} not RUNNING within {within_s} s"
        time.sleep(0.2)


def test_one_task_per_node_each_with_its_own_node_rank(tmp_path):
    command = ('echo "{\\"node_id\\": $SLURM_NODEID, \\"node\\": \\"$SLURMD_NODENAME\\", '
               '\\"main_ip\\": \\"$BENCH_MAIN_IP\\", \\"port\\": $BENCH_MAIN_PORT}" > task-$SLURM_NODEID.json')
    with SlurmJob(_script(tmp_path, command), poll_s=0.2) as job:
        end = job.wait()
    assert end.info.state == "COMPLETED", _err(tmp_path, job.job_id)
    tasks = [json.loads((tmp_path / f"task-{i}.json").read_text()) for i in (0, 1)]
    assert [t["node_id"] for t in tasks] == [0, 1]
    assert [t["node"] for t in tasks] == ["n1", "n2"]
    # Every task sees the job's first host and the port derived from the job id, computed once.
    assert {t["main_ip"] for t in tasks} == {"n1"}
    assert {t["port"] for t in tasks} == {20000 + job.job_id % 20000}
    ends = read_node_ends(tmp_path, 2)
    assert [(e.node_rank, e.node, e.exit_code) for e in ends.values()] == [(0, "n1", 0), (1, "n2", 0)]
    assert bench_status(end.info, ranks_ok=True) == "ok"
    assert bench_status(end.info, ranks_ok=False) == "crash"  # a missing rank file fails an ended job


def test_task_killed_on_second_node_is_a_crash_naming_it(tmp_path):
    # Node rank 1 kills its own task (the wrapper too: no node file); node rank 0 would sleep a minute
    # but --kill-on-bad-exit ends it.
    command = 'if [ "$SLURM_NODEID" = 1 ]; then sleep 1; kill -9 $$; else sleep 60; fi'
    with SlurmJob(_script(tmp_path, command), poll_s=0.2) as job:
        end = job.wait()
    assert end.info.state == "FAILED"
    assert bench_status(end.info, ranks_ok=False) == "crash"
    ends = read_node_ends(tmp_path, 2)
    assert ends[0] is None and ends[1] is None  # node 0 was ended too, before its sleep returned
    named = failed_nodes(end.info, ends, _err(tmp_path, job.job_id))
    assert named and named[0].startswith("node n2 (task 1): Killed"), named


def test_nonzero_exit_on_second_node_names_node_and_code(tmp_path):
    command = 'if [ "$SLURM_NODEID" = 1 ]; then exit 3; fi; sleep 60'
    with SlurmJob(_script(tmp_path, command), poll_s=0.2) as job:
        end = job.wait()
    assert end.info.state == "FAILED"
    ends = read_node_ends(tmp_path, 2)
    assert ends[1] is not None and ends[1].exit_code == 3 and ends[1].node == "n2"
    named = failed_nodes(end.info, ends, _err(tmp_path, job.job_id))
    assert "node n2 (node rank 1) exited 3" in named, named


def test_bench_timeout_cancels_the_job(tmp_path):
    with SlurmJob(_script(tmp_path, "sleep 120"), timeout_s=2, poll_s=0.2) as job:
        end = job.wait()
    assert end.bench_timed_out
    assert end.info.state == "CANCELLED"
    assert bench_status(end.info, ranks_ok=False, bench_timed_out=True) == "timeout"
    assert queue_state(job.job_id) is None


def test_ctrl_c_cancels_the_job_and_leaves_the_queue_empty(tmp_path):
    """A real SIGINT to a process waiting on its job, as a user's Ctrl-C."""
    script = _script(tmp_path, "sleep 120")
    waiter = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from bench.launch.slurm import SlurmJob
        with SlurmJob(Path({str(script)!r}), poll_s=0.2) as job:
            print(job.job_id, flush=True)
            job.wait()
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", waiter], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        job_id = int(proc.stdout.readline())
        deadline = time.monotonic() + 30
        while queue_state(job_id) != "RUNNING":
            assert time.monotonic() < deadline, "job not RUNNING within 30 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "KeyboardInterrupt" in stderr  # the interrupt went on up after the cancel
    assert queue_state(job_id) is None
    squeue = subprocess.run(["squeue", "-h", "-j", str(job_id)], capture_output=True, text=True)
    assert squeue.stdout.strip() == ""
    info = job_info(job_id)
    assert info.state == "CANCELLED" and bench_status(info, ranks_ok=False) == "cancelled"


def _accelerate_job(folder: Path, **env: str):
    """The rendered script running `accelerate launch` of slurm_gloo_worker.py on 2 nodes x 2 processes,
    CPU only (ACCELERATE_USE_CPU=1 with --multi_gpu: MULTI_CPU ranks over gloo), to its end."""
    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_machines": 1,
              "machine_rank": 0, "num_processes": 2, "mixed_precision": "no", "main_training_function": "main",
              "downcast_bf16": "no"}
    (folder / "accelerate.yaml").write_text(yaml.safe_dump(config))
    command = accelerate_node_command(
        [sys.executable, "-m", "accelerate.commands.launch"],
        ["--config_file", str(folder / "accelerate.yaml"), "--multi_gpu",
         str(WORKER_VARIANTS / "slurm_gloo_worker.py"), str(folder / "ranks")],
        nodes=2, procs_per_node=2)
    env = {"ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **env}
    with SlurmJob(_script(folder, command, env=env), timeout_s=240, poll_s=0.5) as job:
        end = job.wait()
    ranks = [json.loads(p.read_text()) for p in sorted((folder / "ranks").glob("rank-*.json"))]
    return job, end, ranks


@pytest.mark.slow
def test_accelerate_launch_two_nodes_two_processes_each(tmp_path):
    """4 ranks on 2 nodes, each knowing its global, local and node rank; the all-reduce crosses nodes."""
    job, end, ranks = _accelerate_job(tmp_path)
    log = _err(tmp_path, job.job_id)[-3000:]
    assert end.info.state == "COMPLETED" and not end.bench_timed_out, log
    assert sorted(r["rank"] for r in ranks) == [0, 1, 2, 3], log
    assert {r["world_size"] for r in ranks} == {4}
    assert {r["rank_sum"] for r in ranks} == {0 + 1 + 2 + 3}
    assert {r["distributed_type"] for r in ranks} == {"DistributedType.MULTI_CPU"}
    assert {r["backend"] for r in ranks} == {"gloo"}
    by_node = {n: sorted((r["rank"], r["local_rank"], r["slurm_node"]) for r in ranks if r["node_rank"] == n)
               for n in (0, 1)}
    assert by_node == {0: [(0, 0, "n1"), (1, 1, "n1")], 1: [(2, 0, "n2"), (3, 1, "n2")]}
    assert bench_status(end.info, ranks_ok=len(ranks) == 4) == "ok"


@pytest.mark.slow
def test_accelerate_rank_killed_on_second_node(tmp_path):
    """Global rank 3 (node n2, local rank 1) SIGKILLs itself: torchrun on n2 exits non-zero naming the
    rank, srun ends n1's ranks (waiting in a barrier), and the job is a crash naming node n2."""
    job, end, _ = _accelerate_job(tmp_path, KILL_RANK="3")
    err = _err(tmp_path, job.job_id)
    assert end.info.state == "FAILED" and not end.bench_timed_out, err[-3000:]
    assert bench_status(end.info, ranks_ok=False) == "crash"
    ends = read_node_ends(tmp_path, 2)
    assert ends[1] is not None and ends[1].node == "n2" and ends[1].exit_code != 0, ends
    named = failed_nodes(end.info, ends, err)
    assert named[0].startswith("node n2 (task 1)"), named
    # torchrun's ChildFailedError on n2 names the rank (its "host" is torchrun's, not the Slurm node).
    assert re.search(r"rank\s+: 3 \(local_rank: 1\)\s+exitcode\s+: -9", err), err[-3000:]
