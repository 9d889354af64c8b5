"""Run one LaunchPlan as a real `accelerate launch` process tree and turn what happened into a RunRecord.

The runner owns the process tree: the launch gets its own process group (session), a watchdog enforces
the cell's wall-clock timeout, the start-up limit and the no-progress (hang) limit from the ranks'
heartbeats, and on any stop the whole group gets SIGTERM, then SIGKILL. Failures are classified from
the ranks' error files first and the log second, and every outcome is a record.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench import rank_files
from bench.plan import LaunchPlan, write_plan_files
from bench.results import CellError, RunRecord

POLL_S = 0.2
TERM_GRACE_S = 10.0
LOG_TAIL_LINES = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Outcome:
    """What the watchdog saw; turned into a status by classify()."""

    returncode: int | None = None
    stopped_by: str | None = None  # "timeout" | "hang" | "interrupted" | None
    first_step_at: float | None = None
    extra: dict = field(default_factory=dict)


class CellInterrupted(Exception):
    """Ctrl-C while a cell ran: the cell is recorded as interrupted, then the matrix stops."""

    def __init__(self, record: RunRecord):
        super().__init__(record.label)
        self.record = record


# ---------------------------------------------------------------- process tree

def kill_group(proc: subprocess.Popen, grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM the launch's whole process group, then SIGKILL whatever is left."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        deadline = time.time() + wait
        while time.time() < deadline and group_alive(pgid):
            time.sleep(0.1)
        if not group_alive(pgid):
            break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies of the group count as gone: reap ours, ignore others' (their parent reaps them).
    import psutil

    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _watch(proc: subprocess.Popen, plan: LaunchPlan, started: float) -> Outcome:
    limits = plan.limits
    outcome = Outcome()
    try:
        while proc.poll() is None:
            time.sleep(POLL_S)
            now = time.time()
            beat = rank_files.slowest_progress(plan.rank_dir)
            if outcome.first_step_at is None and _any_step_started(plan.rank_dir):
                outcome.first_step_at = now
            if now - started > limits.timeout_s:
                outcome.stopped_by = "timeout"
            elif beat is None and now - started > limits.startup_s:
                outcome.stopped_by = "hang"
                outcome.extra["hang_phase"] = "start-up (no heartbeat)"
            elif beat is not None and now - beat > limits.hang_s:  # the slowest rank's last beat
                outcome.stopped_by = "hang"
            if outcome.stopped_by:
                kill_group(proc)
                break
    except KeyboardInterrupt:
        outcome.stopped_by = "interrupted"
        kill_group(proc)
    outcome.returncode = proc.returncode
    return outcome


def _any_step_started(rank_dir: Path) -> bool:
    return any(b.get("phase") in ("warmup", "timed") for b in rank_files.read_json_files(rank_dir, "heartbeat"))


# ---------------------------------------------------------------- classification

def log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def root_cause_lines(log_path: Path) -> str:
    """The lines of a crash log that say why: exception lines and the frames just before them."""
    try:
        text = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    keys = ("Error", "error:", "Exception", "Traceback", "Killed", "Signal", "signal")
    hits = [i for i, line in enumerate(text) if any(k in line for k in keys)]
    keep = sorted({j for i in hits[:20] for j in range(max(0, i - 1), i + 2)})
    return "\n".join(text[j] for j in keep)[-4000:]


def classify(outcome: Outcome, plan: LaunchPlan, log_path: Path) -> tuple[str, CellError | None]:
    errors = rank_files.read_json_files(plan.rank_dir, "error")
    reports = rank_files.read_json_files(plan.rank_dir, "rank")
    tail = log_tail(log_path)
    if outcome.stopped_by == "interrupted":
        return "interrupted", CellError(kind="interrupted", message="stopped by Ctrl-C", log_tail=tail)
    if outcome.stopped_by in ("timeout", "hang"):
        limit = plan.limits.timeout_s if outcome.stopped_by == "timeout" else plan.limits.hang_s
        rank = _laggard_rank(plan.rank_dir)
        what = outcome.extra.get("hang_phase", "no step progress")
        msg = (f"wall clock over {limit:g} s" if outcome.stopped_by == "timeout"
               else f"{what} for {limit:g} s (rank {rank} behind)")
        return outcome.stopped_by, CellError(kind=outcome.stopped_by, rank=rank, message=msg, log_tail=tail)
    if errors:
        # The first rank to fail is the cause; the others often fail after it, in a collective.
        first = min(errors, key=lambda e: e.get("time", 0))
        kind = first["kind"] if first["kind"] in ("oom", "unsupported") else "crash"
        if any(e["kind"] == "oom" for e in errors):
            first, kind = next(e for e in errors if e["kind"] == "oom"), "oom"
        return kind, CellError(kind=kind, rank=first["rank"], message=f"{first['type']}: {first['message']}",
                               log_tail=tail, traceback=first.get("traceback", "")[-3000:])
    world = plan.cell.gpus
    if outcome.returncode == 0 and len(reports) == world:
        return "ok", None
    if outcome.returncode in (-signal.SIGKILL, 137) or "Killed" in tail:
        return "oom", CellError(kind="oom", message="a rank was SIGKILLed with no error of its own: "
                                "most likely the host's OOM killer (CPU offload, host RSS)", log_tail=tail)
    return "crash", CellError(
        kind="crash", rank=_dead_rank(plan.rank_dir, world),
        message=f"exit code {outcome.returncode}; {len(reports)}/{world} rank reports\n{root_cause_lines(log_path)}",
        log_tail=tail)


def _laggard_rank(rank_dir: Path) -> int | None:
    beats = rank_files.read_json_files(rank_dir, "heartbeat")
    return min(beats, key=lambda b: b["time"])["rank"] if beats else None


def _dead_rank(rank_dir: Path, world: int) -> int | None:
    done = {r["rank"] for r in rank_files.read_json_files(rank_dir, "rank")}
    missing = [r for r in range(world) if r not in done]
    return missing[0] if missing else None


# ---------------------------------------------------------------- one cell

SamplerFactory = Callable[[], object]  # returns an object with start(), stop() -> dict | None


def run_plan(plan: LaunchPlan, matrix_name: str, env_fingerprint: dict, sampler=None,
             strategy_info: dict | None = None, prediction: dict | None = None) -> RunRecord:
    """Launch, watch, stop, classify, clean up. Raises CellInterrupted (after recording) on Ctrl-C."""
    write_plan_files(plan)
    log_path = plan.cell_dir / "launch.log"
    started = time.time()
    if sampler is not None:
        sampler.start()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(plan.argv, env={**os.environ, **plan.env}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=os.getcwd())
        outcome = _watch(proc, plan, started)
    kill_group(proc, grace_s=2.0)  # stragglers of a finished launch (a rank that outlived its launcher)
    nvml = sampler.stop(rank_files.read_json_files(plan.rank_dir, "rank")) if sampler is not None else None
    status, error = classify(outcome, plan, log_path)
    record = RunRecord(
        matrix=matrix_name, cell_id=plan.cell.cell_id, label=plan.cell.label, repeat=plan.repeat,
        settings=plan.cell.model_dump(mode="json"), strategy_info=strategy_info or {}, status=status, error=error,
        env=env_fingerprint, ranks=rank_files.read_json_files(plan.rank_dir, "rank"), nvml=nvml,
        prediction=prediction, started_at=started, wall_s=time.time() - started,
        first_step_s=(outcome.first_step_at - started) if outcome.first_step_at else None,
        cell_dir=str(plan.cell_dir), command=plan.shell_command(),
    )
    if status == "interrupted":
        raise CellInterrupted(record)
    return record
