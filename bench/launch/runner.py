"""Run one LaunchPlan as a real `accelerate launch` process tree and turn what happened into a RunRecord.

The runner owns the process tree (bench/launch/process_tree.py): a watchdog enforces the cell's wall-clock
timeout, the start-up limit and the no-progress (hang) limit from the ranks' heartbeats; on any stop,
and on Ctrl-C, the whole tree gets SIGTERM, then SIGKILL. After every cell no process of it is left
(any straggler is killed and named in the record) and, on GPU, NVML's process list is checked. The
status comes from bench/launch/failures.py; every outcome is a record.
"""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path

from bench.launch.build_locks import release_locks_left_by
from bench.launch.failures import Outcome, classify, oom_kill_counters, rendezvous_port_taken
from bench.launch.plan import LaunchPlan, with_port, write_plan_files
from bench.launch.process_tree import ProcessTree
from bench.records import RunRecord, rank_files

POLL_S = 0.2
SCAN_S = 1.0  # noting the tree's members scans the process table: not so often that it costs the ranks CPU
TERM_GRACE_S = 10.0  # SIGTERM to SIGKILL: lets torchrun and DeepSpeed tear down and free GPU memory
GPU_RELEASE_WAIT_S = 10.0  # the driver may list a dead process for a moment while it frees its memory
STEP_PHASES = ("warmup", "timed", "profiled", "done")  # heartbeat phases of a rank past start-up
# A port free when picked can be taken before torchrun binds it (another process's ephemeral port): the
# launch then fails before any rank starts. Up to this many launches, each on a freshly picked port.
PORT_ATTEMPTS = 3


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel hands out to outgoing connections (Linux default 32768-60999)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _binds(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A port for a launch's rendezvous that binds now, chosen below the kernel's ephemeral range where one is
    free: a port from that range may be taken meanwhile by any outgoing connection (a rank's NCCL socket, a
    download) and torchrun's store then fails with EADDRINUSE, which accelerate's own check (a connect) misses."""
    low = ephemeral_port_range()[0]
    if low > 10_000:
        for port in random.sample(range(10_000, low), k=min(64, low - 10_000)):
            if _binds(port):
                return port
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


class CellInterrupted(Exception):
    """Ctrl-C while a cell ran: the cell is recorded as interrupted, then the matrix stops."""

    def __init__(self, record: RunRecord):
        super().__init__(record.label)
        self.record = record


# ---------------------------------------------------------------- watching

def watchdog(plan: LaunchPlan, outcome: Outcome, started: float) -> bool:
    """One look at the ranks' heartbeats: True (with outcome.stopped_by set) when a limit is hit.

    Shared by every launcher: the ranks' heartbeats in the cell's folder say the same wherever they ran.
    ``started``: when the ranks' clock began (the launch here; the job seen running under Slurm)."""
    limits = plan.limits
    now = time.time()
    beats = rank_files.read_json_files(plan.rank_dir, "heartbeat")
    if outcome.first_step_at is None and any(b.get("phase") in ("warmup", "timed") for b in beats):
        outcome.first_step_at = now
    stepping = [b for b in beats if b.get("phase") in STEP_PHASES]
    if now - started > limits.timeout_s:
        outcome.stopped_by = "timeout"
    elif len(stepping) < plan.cell.processes:
        # Building the model and preparing it (DeepSpeed op builds) may take minutes: startup_s.
        if now - started > limits.startup_s:
            outcome.stopped_by = "hang"
            outcome.extra["hang_phase"] = "start-up (not every rank reached its first step)"
    elif now - min(b["time"] for b in beats) > limits.hang_s:  # the slowest rank's last beat
        outcome.stopped_by = "hang"
    if outcome.stopped_by:
        outcome.stopped_at = now
    return outcome.stopped_by is not None


def _watch(tree: ProcessTree, plan: LaunchPlan, outcome: Outcome) -> None:
    """Poll until the launch exits or a limit is hit; then stop the tree. Ctrl-C propagates to the caller."""
    last_scan = 0.0
    while tree.proc.poll() is None:
        time.sleep(POLL_S)
        if time.time() - last_scan > SCAN_S:
            tree.note_descendants()
            last_scan = time.time()
        if watchdog(plan, outcome, tree.started):
            tree.stop(TERM_GRACE_S)
            return


def _leftover_gpu_processes(tree: ProcessTree, plan: LaunchPlan) -> list[dict] | None:
    """NVML compute processes still on the GPUs after the cell (None where NVML is absent).

    Each is marked ``ours`` when its pid belongs to the cell. Waits a little for the driver to let go
    of the cell's processes; processes of others are reported but not waited for.
    """
    try:
        from bench.machine.gpu_state import compute_processes
    except ImportError:
        return None
    ours = tree.pids | {b.get("pid") for b in rank_files.read_json_files(plan.rank_dir, "heartbeat")}
    deadline = time.time() + GPU_RELEASE_WAIT_S
    while True:
        procs = [{**p, "ours": p.get("pid") in ours} for p in compute_processes(plan.cell.gpus)]
        if not any(p["ours"] for p in procs) or time.time() > deadline:
            return procs
        time.sleep(0.5)


# ---------------------------------------------------------------- one cell

def _launch_and_watch(plan: LaunchPlan, outcome: Outcome) -> ProcessTree:
    """One launch of the plan into its cell folder (an earlier attempt's files moved aside), watched until it
    exits or is stopped; Ctrl-C stops the tree and is noted in ``outcome``."""
    archive_previous_attempt(plan)
    write_plan_files(plan)
    with open(plan.cell_dir / "launch.log", "wb") as log:
        tree = ProcessTree(plan.argv, {**os.environ, **plan.env}, log)
        try:
            _watch(tree, plan, outcome)
        except KeyboardInterrupt:
            outcome.stopped_by, outcome.stopped_at = "interrupted", time.time()
            tree.stop(TERM_GRACE_S)
    outcome.returncode = tree.proc.returncode
    return tree


def archive_previous_attempt(plan: LaunchPlan) -> Path | None:
    """A rerun of a cell (resume, --retry-failed) must not read the last attempt's heartbeats, reports or
    errors as its own: move them and its log into ``attempt-<n>/`` beside them, where they stay."""
    old = [p for p in (plan.rank_dir, plan.cell_dir / "launch.log") if p.exists()]
    if not old:
        return None
    n = 1
    while (plan.cell_dir / f"attempt-{n}").exists():
        n += 1
    archive = plan.cell_dir / f"attempt-{n}"
    archive.mkdir()
    for path in old:
        path.rename(archive / path.name)
    return archive


def run_plan(plan: LaunchPlan, matrix_name: str, env_fingerprint: dict, sampler=None,
             strategy_info: dict | None = None, prediction: dict | None = None) -> RunRecord:
    """Launch, watch, stop, clean up, classify. Raises CellInterrupted (with the record) on Ctrl-C.

    The rendezvous port is picked now, not when the matrix was planned; a launch that failed only because
    that port was taken is launched again on another (PORT_ATTEMPTS), the record's ``port_retries`` saying so
    and the failed attempt's log kept in ``attempt-<n>/``."""
    outcome = Outcome(oom_kills_before=oom_kill_counters())
    if sampler is not None:
        sampler.start()
    port_retries: list[dict] = []
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        plan = with_port(plan, port)
        tree = _launch_and_watch(plan, outcome)
        taken = rendezvous_port_taken(outcome, plan.cell_dir / "launch.log", plan.rank_dir)
        if taken is None or attempt == PORT_ATTEMPTS - 1:
            break
        tree.leftovers()
        port_retries.append({"port": port, "error": taken})
        outcome = Outcome(oom_kills_before=outcome.oom_kills_before)
    log_path = plan.cell_dir / "launch.log"
    # Anything alive now outlived its launcher (torchrun starts each rank in a session of its own): kill, name it.
    leftovers = tree.leftovers()
    outcome.oom_kills_after = oom_kill_counters()
    ranks = rank_files.read_json_files(plan.rank_dir, "rank")
    nvml = sampler.stop(ranks) if sampler is not None else None
    gpu_left = _leftover_gpu_processes(tree, plan) if plan.cell.device == "cuda" else None
    status, error = classify(outcome, plan.rank_dir, plan.cell.gpus, plan.limits, log_path)
    # A cell stopped mid-build would leave DeepSpeed's op build locked for every later cell.
    released = release_locks_left_by(tree.started) if status != "ok" else []
    record = RunRecord(
        matrix=matrix_name, cell_id=plan.cell.cell_id, label=plan.cell.label, repeat=plan.repeat,
        settings=plan.cell.model_dump(mode="json"), strategy_info=strategy_info or {}, status=status, error=error,
        env=env_fingerprint, ranks=ranks, nvml=nvml, prediction=prediction, started_at=tree.started,
        wall_s=time.time() - tree.started,
        first_step_s=(outcome.first_step_at - tree.started) if outcome.first_step_at else None,
        cell_dir=str(plan.cell_dir), command=plan.shell_command(),
        leftover_processes=leftovers, leftover_gpu_processes=gpu_left,
        released_build_locks=[str(p) for p in released], port_retries=port_retries,
    )
    if status == "interrupted":
        raise CellInterrupted(record)
    return record
