"""`bench run` with `launcher: slurm` against the real two-node test cluster (n1, n2 on this host:
`.ci/slurm-cluster.sh start`): cells of 2 nodes x 2 CPU processes over gloo, their records, and the
faults a multi-node cell must name (a rank killed on the second node, bench's time limit, Ctrl-C).

Without a cluster these skip with the reason; under CI=true they fail (the fixture of
test_slurm_cluster.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.launch.plan import build_plan
from bench.launch.slurm_runner import run_slurm_plan
from bench.machine.node_env import differences
from bench.records import load_records
from bench.spec import CellSettings, Limits, Train
from bench.spec.slurm import SlurmOptions
from conftest import REPO, WORKER_VARIANTS, bench, write_matrix
from test_slurm_cluster import cluster  # noqa: F401 - the autouse fixture: skip (or fail under CI) without a cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SLURM = {"launcher": "slurm", "slurm": {"time_limit_s": 600}}


def _queue_empty_of(job_id: int) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", str(job_id)], capture_output=True, text=True)
    return out.stdout.strip() == ""


def test_ddp_and_zero2_on_two_nodes_of_two_processes(tmp_path):
    matrix = write_matrix(tmp_path, "two-nodes", **SLURM, grid={"strategy": ["ddp", "zero2"], "nodes": [2], "gpus": [2]})
    proc = bench("run", str(matrix), "--results", str(tmp_path / "results"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = load_records(tmp_path / "results")
    assert [r.status for r in records] == ["ok", "ok"], [r.error for r in records]
    for record in records:
        assert record.settings["nodes"] == 2 and record.settings["gpus"] == 2
        assert record.slurm["state"] == "COMPLETED" and record.slurm["nodes"] == ["n1", "n2"]
        assert _queue_empty_of(record.slurm["job_id"])
        where = sorted((r["rank"], r["slurm_node"], r["node_rank"], r["local_rank"]) for r in record.ranks)
        assert where == [(0, "n1", 0, 0), (1, "n1", 0, 1), (2, "n2", 1, 0), (3, "n2", 1, 1)]
        assert {r["world_size"] for r in record.ranks} == {4}
        assert {r["backend"] for r in record.ranks} == {"gloo"}
        assert [n["slurm_node"] for n in record.env["nodes"]] == ["n1", "n2"]  # each node's own fingerprint
        for node in record.env["nodes"]:
            assert node["interfaces"] and node["nics"] == [i["name"] for i in node["interfaces"]]
            assert node["libraries"]["torch"] and node["python"] and isinstance(node["infiniband"], list)
        assert differences(record.env["nodes"]) == {}  # one host: the two nodes agree
        # Each node's NVML sampler ran (its own file) and found no GPU; the merged record names both nodes.
        for node_rank in (0, 1):
            assert json.loads(Path(record.cell_dir, f"nvml-node-{node_rank}.json").read_text())["node_rank"] == node_rank
        per_node = [(n["node_rank"], n["node"], n["state"], n["available"]) for n in record.nvml["per_node"]]
        assert per_node == [(0, "n1", "no_gpu", False), (1, "n2", "no_gpu", False)]
        assert all("no NVML" in n["reason"] for n in record.nvml["per_node"]), record.nvml["per_node"]
        assert record.nvml["per_gpu"] == [] and record.nvml["energy_timed_j"] is None
        assert Path(record.cell_dir, "slurm.sbatch").is_file()  # the script a user can submit by hand
    assert {r.strategy_info["family"] for r in records} == {"ddp", "deepspeed"}
    assert {r.ranks[0]["distributed_type"] for r in records} == {"MULTI_CPU", "DEEPSPEED"}


def test_a_rank_killed_on_the_second_node_is_a_crash_naming_node_and_rank(tmp_path):
    matrix = write_matrix(tmp_path, "kill", **SLURM, grid={"nodes": [2], "gpus": [2]})
    proc = bench("run", str(matrix), "--results", str(tmp_path / "results"), "--worker", "fault_worker",
                 env={"BENCH_FAULT": "kill", "BENCH_FAULT_RANK": "3"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [record] = load_records(tmp_path / "results")
    assert record.status == "crash", record.error
    assert record.error.rank == 3 and record.error.node == "n2"
    assert record.error.message.splitlines()[0] == "failing: rank 3 on node n2 (node rank 1, local rank 1)"
    assert "SIGKILL" in record.error.message
    assert 3 in record.error.missing_ranks
    assert record.slurm["failed_node"] == "n2" and record.slurm["state"] == "FAILED"
    assert _queue_empty_of(record.slurm["job_id"])


def _memory_enforced() -> str | None:
    """Why the cluster would not kill a job past its --mem, or None (.ci/slurm-cluster.sh's config)."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    settings = dict(line.split("=", 1) for line in config.splitlines() if "=" in line)
    settings = {k.strip(): v.strip() for k, v in settings.items()}
    if "OverMemoryKill" in settings.get("JobAcctGatherParams", "") and "MEMORY" in settings.get(
            "SelectTypeParameters", ""):
        return None
    return (f"the running cluster enforces no --mem (JobAcctGatherParams={settings.get('JobAcctGatherParams')}, "
            f"SelectTypeParameters={settings.get('SelectTypeParameters')}): restart it with this checkout's "
            ".ci/slurm-cluster.sh (stop, then start)")


def test_a_rank_past_the_jobs_memory_limit_is_an_oom_naming_its_node_and_rank(tmp_path):
    """Rank 1, alone on node n2, touches 2 GiB of host memory past the job's --mem=2000M per node (a rank
    with torchrun needs about 1 GB here): n2's slurmstepd, polling every second, kills the step."""
    if (problem := _memory_enforced()) is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    slurm = {"time_limit_s": 600, "extra_sbatch": ["--mem=2000M", "--acctg-freq=task=1"]}
    matrix = write_matrix(tmp_path, "mem", launcher="slurm", slurm=slurm, grid={"nodes": [2], "gpus": [1]})
    proc = bench("run", str(matrix), "--results", str(tmp_path / "results"), "--worker", "fault_worker",
                 env={"BENCH_FAULT": "host_alloc", "BENCH_FAULT_RANK": "1", "BENCH_FAULT_MIB": "2048",
                      "BENCH_FAULT_STEP": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [record] = load_records(tmp_path / "results")
    assert record.status == "oom", record.error
    assert record.error.rank == 1 and record.error.node == "n2", record.error.message
    assert record.error.message.splitlines()[0] == "failing: rank 1 on node n2 (node rank 1, local rank 0)"
    assert "Slurm killed its step past the job's host memory limit on node n2" in record.error.message
    assert record.slurm["state"] == "FAILED" and record.slurm["failed_node"] == "n2"
    [kill] = record.slurm["memory_kills"]
    assert kill["node"] == "n2" and kill["limit_bytes"] == 2000 * 2**20 < kill["used_bytes"]
    assert _queue_empty_of(record.slurm["job_id"])


def _plan(tmp_path: Path, limits: Limits):
    cell = CellSettings(model="tiny-llama", device="cpu", nodes=2, gpus=2,
                        train=Train(seq_len=64, micro_batch=2, precision="fp32", warmup_steps=1, steps=3))
    return build_plan(cell, tmp_path / "results", limits, worker_module="bench.worker")


def test_a_cell_past_its_time_is_a_timeout_and_its_job_is_cancelled(tmp_path):
    """bench's limits.timeout_s, counted from the job running: 5 s is before the ranks' first step."""
    plan = _plan(tmp_path, Limits(timeout_s=5, startup_s=600, hang_s=600, collective_timeout_s=30))
    record = run_slurm_plan(plan, "t", {}, SlurmOptions(time_limit_s=600), poll_s=0.5)
    assert record.status == "timeout", record.error
    assert "limits.timeout_s" in record.error.message
    assert record.slurm["state"] == "CANCELLED"
    assert _queue_empty_of(record.slurm["job_id"])


def test_a_job_someone_else_cancels_is_cancelled(tmp_path):
    """scancel from outside bench (a person, or the scheduler's preemption) as soon as the job runs."""
    plan = _plan(tmp_path, Limits(timeout_s=600, startup_s=600, hang_s=600, collective_timeout_s=30))

    def cancel_once_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(["squeue", "-h", "-n", f"bench-{plan.cell.cell_id}", "-o", "%i %T"],
                                 capture_output=True, text=True).stdout.split()
            if out[1:] == ["RUNNING"]:
                subprocess.run(["scancel", out[0]], check=True)
                return
            time.sleep(0.2)

    canceller = threading.Thread(target=cancel_once_running)
    canceller.start()
    record = run_slurm_plan(plan, "t", {}, SlurmOptions(time_limit_s=600), poll_s=0.5)
    canceller.join()
    assert record.status == "cancelled", record.error
    assert record.error.kind == "cancelled" and "cancelled by a person or the scheduler" in record.error.message
    assert record.slurm["state"] == "CANCELLED"
    assert _queue_empty_of(record.slurm["job_id"])


def test_a_job_past_slurms_own_time_limit_is_a_timeout_keeping_the_slurm_state(slurm_time_limit_run):
    """Slurm's --time (1 minute, its least), bench's limits far off: every rank sleeps in its first step until
    slurmctld ends the job TIMEOUT (it checks limits every 30 s: about 60-95 s). The run (tests/conftest.py's
    slurm_time_limit_run) was started with the first Slurm test; this test runs last and waits for it."""
    returncode, output = slurm_time_limit_run.wait(timeout=600)
    assert returncode == 0, output
    [record] = load_records(slurm_time_limit_run.folder / "results")
    assert record.status == "timeout", record.error
    assert record.slurm["state"] == "TIMEOUT"
    assert "past Slurm's time limit" in record.error.message and "slurm.time_limit_s" in record.error.message
    assert _queue_empty_of(record.slurm["job_id"])


def test_ctrl_c_cancels_the_job_and_leaves_the_queue_empty(tmp_path):
    matrix = write_matrix(tmp_path, "int", **SLURM, grid={"nodes": [2], "gpus": [2]})
    results = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER_VARIANTS), str(REPO)]), "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "run", str(matrix), "--results", str(results)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        # A rank's first heartbeat: the job is running on both nodes' CPUs.
        while not list(results.glob("cells/*/ranks/heartbeat*.json")):
            assert time.time() < deadline and proc.poll() is None, "no rank started within 60 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    [record] = load_records(results)
    assert record.status == "interrupted"
    assert record.slurm["state"] == "CANCELLED"
    assert _queue_empty_of(record.slurm["job_id"])
    jobs = subprocess.run(["squeue", "-h", "-n", f"bench-{record.cell_id}"], capture_output=True, text=True)
    assert jobs.stdout.strip() == ""
