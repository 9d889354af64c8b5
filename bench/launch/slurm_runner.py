"""Run one LaunchPlan as a Slurm batch job across ``cell.nodes`` nodes and turn what happened into a RunRecord.

Beside the local runner (bench/launch/runner.py), sharing its plan, its heartbeat watchdog and its failure
classification: the batch script (bench/launch/slurm/) is written into the cell's folder, submitted,
and polled; bench's limits (timeout, start-up, hang) cancel the job, and so does Ctrl-C (the record is
then ``interrupted``). A job someone else ended is ``cancelled``. Every rank writes its files into the
shared cell folder; a rank that left no report is a failure naming the missing ranks and their node.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import time
from pathlib import Path

from bench.launch.build_locks import release_locks_left_by
from bench.launch.failures import Outcome, classify
from bench.launch.plan import LaunchPlan, write_plan_files
from bench.launch.runner import CellInterrupted, archive_previous_attempt, watchdog
from bench.launch.slurm import (MemoryKill, SlurmJob, accelerate_node_command, arch_list_lines, bench_status, commands,
                                failed_nodes, memory_kills, read_node_ends, render_batch_script, write_batch_script)
from bench.machine.node_env import read_node_fingerprints
from bench.machine.node_sampler import NODE_SAMPLES_FILE, merge_node_samples
from bench.machine.sampler import sampler_enabled
from bench.records import CellError, RunRecord, rank_files
from bench.spec import CellSettings, Matrix, MatrixError
from bench.spec.slurm import SlurmOptions

POLL_S = 1.0
ENV_NODE_FILE = "env-node-{node_rank}.json"  # each node's fingerprint (bench/machine/node_env.py)
ARCH_NOTE_FILE = "arch-node-{node_rank}.txt"  # the TORCH_CUDA_ARCH_LIST a node set and why (bench/launch/cuda_arch.py)
LOG_FILE = "launch.log"  # the job's output and error files joined, for the failure classification


def check_launcher(matrix: Matrix, cells: list[CellSettings], source: str, submitting: bool = True) -> None:
    """Refuse, before anything launches, what the launcher cannot run. ``submitting``: False for a dry run,
    which prints the batch scripts and needs no Slurm."""
    if matrix.launcher == "local":
        if multi := sorted({c.nodes for c in cells if c.nodes > 1}):
            raise MatrixError(f"{source}: nodes {multi} needs several machines, but launcher is 'local' (this host "
                              "only). Fix: set `launcher: slurm` (with a `slurm:` section: partition, time_limit_s, "
                              "gpus_per_node), or nodes: 1")
        return
    if submitting and shutil.which("sbatch") is None:
        raise MatrixError(f"{source}: launcher: slurm, but `sbatch` is not on PATH. Fix: run bench on a Slurm login "
                          "node (or load the Slurm module so that sbatch, squeue, scontrol and scancel are found), "
                          "or set `launcher: local`")


def _node_file(plan: LaunchPlan, pattern: str) -> str:
    """A per-node file of the cell's folder as shell text, its node rank expanded by each task."""
    return shlex.quote(str(plan.cell_dir)) + "/" + pattern.format(node_rank='"$SLURM_NODEID"')


def node_command(plan: LaunchPlan, sample: bool | None = None) -> str:
    """One node's shell text: its fingerprint; its NVML sampler in the background (bench/machine/
    node_sampler.py, stopped with SIGTERM once the launch returns, and waited for so that its summary is
    written before the job ends); its `accelerate launch` (the local argv, less the port the batch script
    now owns), after TORCH_CUDA_ARCH_LIST for a DeepSpeed cell on CUDA where it needs one (decided from the
    node's GPUs, the note left in arch-node-<rank>.txt). ``sample``: None follows BENCH_SAMPLER (on unless it
    says off)."""
    argv = list(plan.argv)
    if "--main_process_port" in argv:
        i = argv.index("--main_process_port")
        del argv[i:i + 2]
    python = shlex.quote(sys.executable)
    lines = [f"{python} -m bench.machine.node_env {_node_file(plan, ENV_NODE_FILE)} || true"]
    sampling = sampler_enabled() if sample is None else sample
    if sampling:
        gpus = plan.cell.gpus if plan.cell.device == "cuda" else 0
        lines.append(f"{python} -m bench.machine.node_sampler {_node_file(plan, NODE_SAMPLES_FILE)} --gpus {gpus} "
                     f"--ranks {shlex.quote(str(plan.rank_dir))} &")
        lines.append("sampler_pid=$!")
    if plan.cell.device == "cuda" and "deepspeed.json" in plan.files:  # JIT-built ops: an arch list they can read
        lines += arch_list_lines(f"{python} -m bench.launch.cuda_arch {_node_file(plan, ARCH_NOTE_FILE)}")
    lines.append(accelerate_node_command(argv[:3], argv[3:], plan.cell.nodes, plan.cell.gpus))
    if sampling:
        lines += ["rc=$?", 'kill -TERM "$sampler_pid" 2>/dev/null', 'wait "$sampler_pid"', "exit $rc"]
    return "\n".join(lines)


def job_options(plan: LaunchPlan, options: SlurmOptions) -> SlurmOptions:
    """The matrix's slurm: options with the cell's launch environment exported too (the site's env wins).
    On GPU, Slurm gives each job its cards (CUDA_VISIBLE_DEVICES from --gres): the local choice is dropped."""
    env = {k: v for k, v in plan.env.items() if not (k == "CUDA_VISIBLE_DEVICES" and plan.cell.device == "cuda")}
    return options.model_copy(update={"env": {**env, **options.env}})


def job_script(plan: LaunchPlan, options: SlurmOptions, sample: bool | None = None) -> str:
    """The cell's batch script, as `bench run` submits it (and `bench run --dry-run` prints it)."""
    return render_batch_script(job_name=f"bench-{plan.cell.cell_id}", folder=plan.cell_dir, nodes=plan.cell.nodes,
                               node_command=node_command(plan, sample), options=job_options(plan, options),
                               workdir=Path.cwd())


def write_job_script(plan: LaunchPlan, options: SlurmOptions, sample: bool | None = None) -> Path:
    return write_batch_script(plan.cell_dir, job_script(plan, options, sample))


def _watch_job(job: SlurmJob, plan: LaunchPlan, outcome: Outcome, poll_s: float) -> float | None:
    """Poll until the job leaves the queue or a limit is hit (then cancel it). The limits count from when
    the job is first seen running: time pending in the queue is the cluster's. Returns that moment."""
    running_since = None
    while (state := job.state()) is not None:
        if running_since is None and state == "RUNNING":
            running_since = time.time()
        if running_since is not None and watchdog(plan, outcome, running_since):
            job.cancel()
            break
        time.sleep(poll_s)
    job.ended = True
    return running_since


def _join_logs(folder: Path, job_id: int) -> Path:
    path = folder / LOG_FILE
    parts = [folder / f"slurm-{job_id}.out", folder / f"slurm-{job_id}.err"]
    path.write_text("".join(p.read_text(errors="replace") for p in parts if p.exists()))
    return path


def run_slurm_plan(plan: LaunchPlan, matrix_name: str, env_fingerprint: dict, options: SlurmOptions,
                   strategy_info: dict | None = None, prediction: dict | None = None,
                   poll_s: float = POLL_S) -> RunRecord:
    """Submit, watch, cancel if needed, classify. Raises CellInterrupted (with the record) on Ctrl-C."""
    archive_previous_attempt(plan)
    write_plan_files(plan)
    for old in [*plan.cell_dir.glob("env-node-*.json"), *plan.cell_dir.glob("nvml-node-*.json"),
                *plan.cell_dir.glob("arch-node-*.txt")]:
        old.unlink()
    sample = sampler_enabled()
    script = write_job_script(plan, options, sample)
    outcome = Outcome()
    started = time.time()
    running_since = None
    with SlurmJob(script, poll_s=poll_s) as job:
        try:
            running_since = _watch_job(job, plan, outcome, poll_s)
        except KeyboardInterrupt:
            outcome.stopped_by, outcome.stopped_at = "interrupted", time.time()
            job.cancel()
    info = commands.job_info(job.job_id)
    outcome.returncode = info.exit_code
    log_path = _join_logs(plan.cell_dir, job.job_id)
    log_text = log_path.read_text(errors="replace")
    ends = read_node_ends(plan.cell_dir, plan.cell.nodes)
    ranks = rank_files.read_json_files(plan.rank_dir, "rank")
    kills = memory_kills(log_text)
    status, error = classify(outcome, plan.rank_dir, plan.cell.processes, plan.limits, log_path)
    if outcome.stopped_by is None:
        status, error = status_after_job(status, error, info, len(ranks) == plan.cell.processes, options, kills)
    node_names = _node_names(info.node_list, ends)
    failed_node = None
    if status not in ("ok", "interrupted"):
        error, failed_node = _name_nodes(error, plan, ranks, node_names, failed_nodes(info, ends, log_text))
    # Seen from the submitting host only: the nodes' caches are cleaned where they share its home (NFS).
    released = release_locks_left_by(started) if status != "ok" else []
    record = RunRecord(
        matrix=matrix_name, cell_id=plan.cell.cell_id, label=plan.cell.label, repeat=plan.repeat,
        settings=plan.cell.model_dump(mode="json"), strategy_info=with_node_notes(strategy_info or {}, plan.cell_dir),
        status=status, error=error,
        env={**env_fingerprint, "nodes": read_node_fingerprints(plan.cell_dir)}, ranks=ranks,
        nvml=merge_node_samples(plan.cell_dir, plan.cell.nodes, node_names) if sample else None,
        prediction=prediction, started_at=started, wall_s=time.time() - started,
        first_step_s=(outcome.first_step_at - running_since) if outcome.first_step_at and running_since else None,
        cell_dir=str(plan.cell_dir), command=f"sbatch {script}",
        slurm={"job_id": job.job_id, "node_list": info.node_list, "nodes": node_names, "state": info.state,
               "exit_code": info.exit_code, "signal": info.signal, "failed_node": failed_node,
               "memory_kills": [k.model_dump() for k in kills]},
        released_build_locks=[str(p) for p in released],
    )
    if status == "interrupted":
        raise CellInterrupted(record)
    return record


def with_node_notes(info: dict, folder: Path) -> dict:
    """``info`` with what the nodes decided at launch (their arch-node-<rank>.txt) added to its launch_notes,
    each distinct note once, after the notes of the plan."""
    notes = list(info.get("launch_notes", []))
    for path in sorted(folder.glob(ARCH_NOTE_FILE.format(node_rank="*"))):
        note = path.read_text(errors="replace").strip()
        if note and note not in notes:
            notes.append(note)
    return {**info, "launch_notes": notes} if notes else info


def status_after_job(status: str, error: CellError | None, info, ranks_ok: bool, options: SlurmOptions,
                     kills: list[MemoryKill] = ()) -> tuple[str, CellError | None]:
    """What the scheduler's end of the job adds to what the ranks left: a job cancelled from outside, or
    stopped at Slurm's own time limit, or killed by Slurm's memory limit (JobState OUT_OF_MEMORY where
    cgroups enforce it; slurmstepd's ``kills`` where its accounting poll does, the job then FAILED),
    says so whatever the ranks wrote."""
    job_status = bench_status(info, ranks_ok=ranks_ok)
    what = f"Slurm job {info.job_id} ended {info.state}" + (f" ({info.reason})" if info.reason else "")
    if job_status == "cancelled":
        return "cancelled", CellError(kind="cancelled", message=f"{what}: cancelled by a person or the scheduler")
    if job_status == "timeout":
        return "timeout", CellError(kind="timeout", message=f"{what}: past Slurm's time limit (slurm.time_limit_s "
                                    f"{options.time_limit_s} s). Fix: raise slurm.time_limit_s")
    if job_status == "oom" and status != "oom":
        return "oom", CellError(kind="oom", message=f"{what}: a node's memory limit (host memory)")
    if kills and status != "oom":
        nodes = ", ".join(sorted({k.node or "?" for k in kills}))
        return "oom", CellError(kind="oom", message=(
            f"{what}: Slurm killed its step past the job's host memory limit on node {nodes} "
            f"({kills[0].used_bytes / 2**20:.0f} MiB > {kills[0].limit_bytes / 2**20:.0f} MiB). Fix: ask for more "
            "host memory (--mem in slurm.extra_sbatch), or use less of it (CPU offload, pinned buffers)"))
    if status == "ok" and job_status != "ok":
        return "crash", CellError(kind="crash", message=f"{what} with exit code {info.exit_code}")
    return status, error


def _node_names(node_list: str | None, ends: dict) -> list[str]:
    """Node names by node rank: the job's node list in Slurm's order (SLURM_NODEID follows it)."""
    if node_list:
        try:
            return commands.node_hostnames(node_list)
        except commands.SlurmError:
            pass
    return [end.node if end else "?" for _, end in sorted(ends.items())]


def _name_nodes(error: CellError | None, plan: LaunchPlan, ranks: list[dict], node_names: list[str],
                from_slurm: list[str]) -> tuple[CellError, str | None]:
    """The error with the failing rank's node and the ranks that left no report (static rendezvous: global
    rank r runs on node rank r // gpus). Returns (error, the failing node's name)."""
    error = error or CellError(kind="crash")
    gpus = plan.cell.gpus

    def where(rank: int) -> str:
        node = rank // gpus
        name = node_names[node] if node < len(node_names) else "?"
        return f"rank {rank} on node {name} (node rank {node}, local rank {rank % gpus})"

    reported = {r.get("rank") for r in ranks}
    missing = [r for r in range(plan.cell.processes) if r not in reported]
    lines = []
    failed_node = None
    if error.rank is None and error.kind == "oom" and from_slurm and gpus == 1:
        # Slurm names the node past its memory limit; with one process per node that is the rank.
        named = _node_named(from_slurm[0])
        error = error.model_copy(update={"rank": node_names.index(named) if named in node_names else None})
    if error.rank is not None:
        lines.append(f"failing: {where(error.rank)}")
        node = error.rank // gpus
        failed_node = node_names[node] if node < len(node_names) else None
    if missing:
        lines.append("no rank report from: " + "; ".join(where(r) for r in missing))
    lines += [f"Slurm: {text}" for text in from_slurm]
    if failed_node is None and from_slurm:
        failed_node = _node_named(from_slurm[0])
    message = "\n".join([*lines, error.message]) if lines else error.message
    return error.model_copy(update={"message": message, "node": failed_node, "missing_ranks": missing}), failed_node


def _node_named(text: str) -> str:
    """The node of one of failed_nodes' lines: "node n2 (task 1): ..." or "node n2: ..." -> n2."""
    return text.split()[1].rstrip(":")
