"""bench.launch.slurm without a cluster: the batch script's text, its options' validation, and the reading of
what Slurm printed (lines captured from the two-node test cluster, Slurm 22.05)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from bench.launch.slurm import (JobInfo, NodeEnd, SlurmOptions, accelerate_node_command, bench_status, failed_nodes,
                                memory_kills, render_batch_script, slurm_time, srun_errors, write_batch_script)
from bench.launch.slurm_runner import status_after_job

# `scontrol -o show job` of a job whose second node's task was killed (shortened, fields as printed).
FAILED_JOB = ("JobId=5 JobName=bench-test UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901755 "
              "JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
              "ExitCode=143:0 RunTime=00:00:01 TimeLimit=00:05:00 AllocNode:Sid=localhost:9930 "
              "ReqNodeList=(null) NodeList=n[1-2] BatchHost=n1 NumNodes=2 ReqB:S:C:T=0:0:*:* Power= ")
# `scontrol show job` (multi-line) of a 1-minute job that slept past its limit.
TIMEOUT_JOB = """JobId=1 JobName=wrap
   JobState=TIMEOUT Reason=TimeLimit Dependency=(null)
   Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:15
   RunTime=00:01:27 TimeLimit=00:01:00 TimeMin=N/A
   NodeList=n1
"""
# The job's error file after node n2's task was killed (srun --kill-on-bad-exit=1).
KILLED_ERR = """srun: error: n2: task 1: Killed
srun: launch/slurm: _step_signal: Terminating StepId=2.0
slurmstepd-n1: error: *** STEP 2.0 ON n1 CANCELLED AT 2026-11-30T02:19:11 ***
srun: error: n1: task 0: Terminated
srun: Force Terminated StepId=2.0
"""
LAUNCHER = [sys.executable, "-m", "accelerate.commands.launch"]


def _render(tmp_path: Path, **options) -> str:
    return render_batch_script(job_name="bench-abc", folder=tmp_path, nodes=2, node_command="echo $SLURM_NODEID",
                               options=SlurmOptions(**options))


def test_sbatch_lines_carry_every_option(tmp_path):
    text = _render(tmp_path, partition="gpu", account="proj1", time_limit_s=5400, gpus_per_node=8,
                   cpus_per_task=32, extra_sbatch=["--qos=high", "#SBATCH --exclusive"])
    sbatch = [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == [
        "--job-name=bench-abc", "--nodes=2", "--ntasks-per-node=1", "--time=0-01:30:00",
        f"--output={tmp_path.resolve()}/slurm-%j.out", f"--error={tmp_path.resolve()}/slurm-%j.err",
        f"--chdir={tmp_path.resolve()}", "--partition=gpu", "--account=proj1", "--gres=gpu:8",
        "--cpus-per-task=32", "--qos=high", "--exclusive",
    ]


def test_cpu_job_asks_no_gres_and_no_partition(tmp_path):
    text = _render(tmp_path)
    assert "--gres" not in text and "--partition" not in text and "--account" not in text


def test_script_is_valid_bash_and_expands_the_node_id_per_task(tmp_path):
    """The batch shell must not expand $SLURM_NODEID (it runs on the first node only): run the script's
    srun line with srun replaced by a loop that plays two tasks, each with its own SLURM_NODEID."""
    text = _render(tmp_path, env={"MSG": "it's \"quoted\" $HOME"})
    path = write_batch_script(tmp_path, text)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    play = ('srun() { shift 3; for id in 0 1; do SLURM_NODEID=$id SLURMD_NODENAME=n$((id + 1)) "$@" '
            '|| return; done; }\nscontrol() { echo n1; echo n2; }\n')
    proc = subprocess.run(["bash", "-c", play + text + '\necho "$MSG"'], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "40123", "SLURM_JOB_NODELIST": "n[1-2]"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["0", "1", "it's \"quoted\" $HOME"]
    ends = sorted(p.name for p in tmp_path.glob("node-*.json"))
    assert ends == ["node-0.json", "node-1.json"]
    assert NodeEnd.model_validate_json((tmp_path / "node-1.json").read_text()).node == "n2"


def test_accelerate_command_sets_node_flags_and_refuses_its_own(tmp_path):
    command = accelerate_node_command(LAUNCHER, ["--config_file", "a.yaml", "-m", "bench.worker"], nodes=2,
                                      procs_per_node=4)
    assert "--num_machines 2 --num_processes 8 --rdzv_backend static --same_network" in command
    assert '--machine_rank "$SLURM_NODEID"' in command
    assert '--main_process_ip "$BENCH_MAIN_IP" --main_process_port "$BENCH_MAIN_PORT"' in command
    assert "--deepspeed_multinode_launcher standard" in command
    assert command.endswith("--config_file a.yaml -m bench.worker")
    with pytest.raises(ValueError, match=r"--main_process_port.*leave them out"):
        accelerate_node_command(LAUNCHER, ["--main_process_port=29500", "-m", "w"], nodes=2, procs_per_node=1)


@pytest.mark.parametrize("bad, match", [
    ({"extra_sbatch": ["exclusive"]}, "not one sbatch option"),
    ({"env": {"A-B": "1"}}, "not shell variable names"),
    ({"time_limit_s": 0}, "time_limit_s"),
    ({"partitoin": "gpu"}, "partitoin"),
])
def test_bad_options_name_the_key(bad, match):
    with pytest.raises(ValidationError, match=match):
        SlurmOptions(**bad)


def test_slurm_time():
    assert [slurm_time(s) for s in (59, 3600, 90061)] == ["0-00:00:59", "0-01:00:00", "1-01:01:01"]


def test_scontrol_fields_parse():
    failed = JobInfo.from_scontrol(5, FAILED_JOB)
    assert (failed.state, failed.exit_code, failed.signal, failed.node_list, failed.reason) == \
        ("FAILED", 143, 0, "n[1-2]", "NonZeroExitCode")
    timeout = JobInfo.from_scontrol(1, TIMEOUT_JOB)
    assert (timeout.state, timeout.exit_code, timeout.signal, timeout.reason) == ("TIMEOUT", 0, 15, "TimeLimit")
    with pytest.raises(ValueError, match="no JobState"):
        JobInfo.from_scontrol(9, "slurm_load_jobs error: Invalid job id specified")


@pytest.mark.parametrize("state, ranks_ok, status", [
    ("COMPLETED", True, "ok"), ("COMPLETED", False, "crash"), ("FAILED", False, "crash"),
    ("NODE_FAIL", False, "crash"), ("TIMEOUT", False, "timeout"), ("CANCELLED", False, "cancelled"),
    ("PREEMPTED", False, "cancelled"), ("OUT_OF_MEMORY", False, "oom"), ("UNKNOWN", True, "crash"),
])
def test_slurm_states_map_to_bench_statuses(state, ranks_ok, status):
    assert bench_status(JobInfo(job_id=1, state=state), ranks_ok=ranks_ok) == status


def test_bench_own_timeout_wins_and_a_running_job_has_no_status():
    assert bench_status(JobInfo(job_id=1, state="CANCELLED"), ranks_ok=False, bench_timed_out=True) == "timeout"
    with pytest.raises(ValueError, match="still RUNNING"):
        bench_status(JobInfo(job_id=1, state="RUNNING"), ranks_ok=False)


def test_failing_node_named_from_srun_and_node_files():
    errors = srun_errors(KILLED_ERR)
    assert [(e.node, e.tasks, e.what) for e in errors] == [("n2", "1", "Killed"), ("n1", "0", "Terminated")]
    info = JobInfo.from_scontrol(5, FAILED_JOB)
    ends = {0: NodeEnd(node_rank=0, node="n1", host="h", exit_code=0),
            1: NodeEnd(node_rank=1, node="n2", host="h", exit_code=3)}
    assert failed_nodes(info, ends, KILLED_ERR) == ["node n2 (task 1): Killed", "node n2 (node rank 1) exited 3"]
    assert failed_nodes(info, {0: ends[0], 1: None}, "") == [
        "node rank(s) 1 left no node file (killed before their command returned)"]


# `scontrol -o show job` as the test cluster prints it (a finished job of tests/launch/test_slurm_runs.py,
# shortened), with the state, reason and exit code Slurm gives a job whose step its memory limit killed
# through cgroups (task/cgroup): the test cluster has no cgroups (task/none) and enforces --mem by polling
# (OverMemoryKill), which ends such a job FAILED (below), so it cannot end one OUT_OF_MEMORY.
OOM_JOB = ("JobId=7 JobName=bench-1f9d45c0c47f UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901759 "
           "Nice=0 Account=(null) QOS=(null) JobState=OUT_OF_MEMORY Reason=OutOfMemory Dependency=(null) Requeue=1 "
           "Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:125 RunTime=00:00:41 TimeLimit=00:10:00 TimeMin=N/A "
           "Partition=debug AllocNode:Sid=localhost:434 ReqNodeList=(null) ExcNodeList=(null) NodeList=n[1-2] "
           "BatchHost=n1 NumNodes=2 NumCPUs=2 NumTasks=2 CPUs/Task=1 ReqB:S:C:T=0:0:*:* MinMemoryNode=0 Power= ")


def test_a_job_slurm_ended_out_of_memory_is_an_oom_keeping_the_state():
    info = JobInfo.from_scontrol(7, OOM_JOB)
    assert (info.state, info.exit_code, info.signal, info.reason, info.node_list) == \
        ("OUT_OF_MEMORY", 0, 125, "OutOfMemory", "n[1-2]")
    assert bench_status(info, ranks_ok=False) == "oom"
    status, error = status_after_job("crash", None, info, ranks_ok=False, options=SlurmOptions())
    assert status == "oom" and error.kind == "oom"
    assert "Slurm job 7 ended OUT_OF_MEMORY (OutOfMemory)" in error.message


def test_a_job_past_slurms_time_limit_is_a_timeout_naming_the_limit():
    info = JobInfo.from_scontrol(1, TIMEOUT_JOB)
    status, error = status_after_job("crash", None, info, ranks_ok=False, options=SlurmOptions(time_limit_s=60))
    assert status == "timeout" and error.kind == "timeout"
    assert "ended TIMEOUT (TimeLimit)" in error.message and "slurm.time_limit_s 60 s" in error.message


# The job's error file (test cluster, OverMemoryKill) after rank 1, alone on node n2, touched 2 GiB past
# the job's --mem=2000M: n2's slurmstepd kills the step; srun's first error names n1, reaped first.
MEMORY_KILLED_ERR = """slurmstepd-n2: error: StepId=3.0 exceeded memory limit (2321281024 > 2097152000), being killed
srun: Job step aborted: Waiting up to 4 seconds for job step to finish.
slurmstepd-n1: error: Exceeded job memory limit
slurmstepd-n1: error: *** STEP 3.0 ON n1 CANCELLED AT 2026-11-30T07:52:31 ***
slurmstepd-n2: error: StepId=3.0 exceeded memory limit (2321281024 > 2097152000), being killed
slurmstepd-n1: error: Exceeded job memory limit
srun: error: n1: task 0: Killed
srun: launch/slurm: _step_signal: Terminating StepId=3.0
srun: error: n2: task 1: Killed
"""


def test_a_step_slurm_killed_past_the_memory_limit_is_an_oom_naming_its_node():
    [kill] = memory_kills(MEMORY_KILLED_ERR)  # printed twice, counted once
    assert (kill.node, kill.step, kill.used_bytes, kill.limit_bytes, kill.virtual) == \
        ("n2", "StepId=3.0", 2321281024, 2097152000, False)
    info = JobInfo(job_id=3, state="FAILED", exit_code=137, node_list="n[1-2]", reason="NonZeroExitCode")
    named = failed_nodes(info, {0: None, 1: None}, MEMORY_KILLED_ERR)
    assert named[0] == "node n2: StepId=3.0 exceeded the job's memory limit (2214 MiB > 2000 MiB), killed by Slurm"
    assert named[1] == "node n1 (task 0): Killed"
    status, error = status_after_job("crash", None, info, ranks_ok=False, options=SlurmOptions(), kills=[kill])
    assert status == "oom" and error.kind == "oom"
    assert "ended FAILED" in error.message and "node n2" in error.message and "--mem" in error.message
    # Without slurmstepd's line a FAILED job stays a crash; a rank's own oom is kept as it is.
    assert status_after_job("crash", None, info, ranks_ok=False, options=SlurmOptions())[0] == "crash"
    own = error.model_copy(update={"message": "OutOfMemoryError: CUDA out of memory", "rank": 1})
    assert status_after_job("oom", own, info, ranks_ok=False, options=SlurmOptions(), kills=[kill]) == ("oom", own)
    assert memory_kills("slurmstepd: error: Exceeded job memory limit\n") == []
