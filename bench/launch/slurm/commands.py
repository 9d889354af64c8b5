"""Slurm's client commands, each run once and its answer parsed: submit, queue state, final state, cancel.

``sacct`` is only a fallback for a job the controller has already forgotten (it keeps a finished job for
MinJobAge, 300 s by default): small clusters run without accounting.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bench.launch.slurm.states import UNKNOWN, JobInfo

COMMAND_TIMEOUT_S = 30  # a controller that does not answer in this long is down, not slow


class SlurmError(RuntimeError):
    """A Slurm command failed; the message holds the command and what it printed."""


def _run(argv: list[str], cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"`{argv[0]}` not found: Slurm's client commands are not installed on this machine")
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise SlurmError(f"`{' '.join(argv)}` exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def submit(script: Path) -> int:
    """`sbatch --parsable SCRIPT` from the script's folder; the job id."""
    out = _run(["sbatch", "--parsable", str(script)], cwd=script.parent).stdout.strip()
    job_id = out.split(";")[0]  # --parsable prints "id" or "id;cluster"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch --parsable printed {out!r}, not a job id")
    return int(job_id)


def queue_state(job_id: int) -> str | None:
    """The job's state while squeue lists it (PENDING, RUNNING, COMPLETING, ...); None once it left."""
    proc = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], check=False)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return None  # already purged from the controller
        raise SlurmError(f"squeue -j {job_id} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout.strip() or None


def job_info(job_id: int) -> JobInfo:
    """The controller's record of the job (`scontrol -o show job`), else sacct's, else state UNKNOWN."""
    proc = _run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
    if proc.returncode == 0 and "JobState=" in proc.stdout:
        return JobInfo.from_scontrol(job_id, proc.stdout)
    from_sacct = _sacct_info(job_id)
    if from_sacct is not None:
        return from_sacct
    return JobInfo(job_id=job_id, state=UNKNOWN, reason=(proc.stderr or proc.stdout).strip() or None)


def _sacct_info(job_id: int) -> JobInfo | None:
    if shutil.which("sacct") is None:
        return None
    proc = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State,ExitCode,NodeList,Reason"],
                check=False)
    line = proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else ""
    if not line:
        return None  # no accounting storage, or it does not know the job
    state, exit_code, nodes, reason = (line.split("|") + ["", "", "", ""])[:4]
    code, _, sig = exit_code.partition(":")
    return JobInfo(job_id=job_id, state=state.split()[0],  # "CANCELLED by 0" -> CANCELLED
                   exit_code=int(code) if code.isdigit() else None, signal=int(sig) if sig.isdigit() else None,
                   node_list=nodes or None, reason=reason or None)


def cancel(job_id: int) -> None:
    """`scancel ID`; a job that already ended is not an error."""
    proc = _run(["scancel", str(job_id)], check=False)
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr and "already completing" not in proc.stderr:
        raise SlurmError(f"scancel {job_id} exited {proc.returncode}: {proc.stderr.strip()}")


def node_hostnames(node_list: str) -> list[str]:
    """`scontrol show hostnames n[1-2]` -> ['n1', 'n2']."""
    return _run(["scontrol", "show", "hostnames", node_list]).stdout.split()
