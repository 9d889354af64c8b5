"""A Slurm job's end as bench sees it: the scheduler's state, exit code and nodes, the bench status they
mean, and which node failed.

Slurm's ``JobState`` (from ``scontrol show job``) maps to bench statuses: a job that ended COMPLETED is
ok only when every rank left its report (``srun`` hides which task failed, and a batch script can end 0
after a failed step); FAILED and NODE_FAIL are crashes; TIMEOUT a timeout; CANCELLED and PREEMPTED
``cancelled`` (a person or the scheduler ended it); OUT_OF_MEMORY an oom. A job that bench itself
cancelled past its time limit is a timeout whatever Slurm calls it.

Slurm ends a job OUT_OF_MEMORY only where its task/cgroup plugin enforces memory. A cluster that
enforces ``--mem`` by polling instead (``JobAcctGatherParams=OverMemoryKill``, no cgroups) cancels the
whole step and the job ends FAILED; the only sign is slurmstepd's line naming the node that went past
the limit (``memory_kills``), while srun's first error line names whichever task it reaped first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from bench.launch.slurm.script import NODE_FILE

BenchStatus = Literal["ok", "crash", "timeout", "cancelled", "oom"]

# States in which the job is still queued or running (squeue shows it).
ACTIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
                    "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"})
_FINAL_STATUS: dict[str, BenchStatus] = {
    "COMPLETED": "ok",
    "FAILED": "crash", "NODE_FAIL": "crash", "BOOT_FAIL": "crash",
    "TIMEOUT": "timeout", "DEADLINE": "timeout",
    "CANCELLED": "cancelled", "PREEMPTED": "cancelled", "REVOKED": "cancelled",
    "OUT_OF_MEMORY": "oom",
}
UNKNOWN = "UNKNOWN"  # the controller no longer knows the job (purged after MinJobAge) and no sacct

_FIELD = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=(\S*)")
# slurmstepd's jobacct_gather (OverMemoryKill): "slurmstepd-n2: error: StepId=3.0 exceeded memory limit
# (2321281024 > 2097152000), being killed"; the node suffix is there when slurmstepd knows its node name.
_MEMORY_KILL = re.compile(r"^slurmstepd(?:-(?P<node>[^:\s]+))?: error: (?P<step>.+?) exceeded (?P<virtual>virtual )?"
                          r"memory limit \((?P<used_bytes>\d+) > (?P<limit_bytes>\d+)\), being killed$", re.M)
_SRUN_ERROR = re.compile(r"^srun: error: (?P<node>[^:\s]+): tasks? (?P<tasks>[\d,\-]+): (?P<what>.+)$", re.M)


class JobInfo(BaseModel):
    """What the scheduler says about a job that has left the queue (or is still in it)."""

    model_config = ConfigDict(frozen=True)

    job_id: int
    state: str  # Slurm's JobState, e.g. COMPLETED, FAILED, TIMEOUT
    exit_code: int | None = None  # the batch script's exit code (ExitCode=code:signal)
    signal: int | None = None
    node_list: str | None = None  # Slurm's compact form, e.g. n[1-2]
    reason: str | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @classmethod
    def from_scontrol(cls, job_id: int, text: str) -> JobInfo:
        """From `scontrol -o show job ID` (one line of Key=Value fields)."""
        fields = dict(_FIELD.findall(text))
        if "JobState" not in fields:
            raise ValueError(f"no JobState in scontrol output for job {job_id}: {text[:200]!r}")
        code, _, sig = fields.get("ExitCode", "").partition(":")
        return cls(job_id=job_id, state=fields["JobState"],
                   exit_code=int(code) if code.isdigit() else None, signal=int(sig) if sig.isdigit() else None,
                   node_list=_value(fields.get("NodeList")), reason=_value(fields.get("Reason")))


def _value(text: str | None) -> str | None:
    return None if text in (None, "", "None", "(null)") else text


class NodeEnd(BaseModel):
    """One node's task, from the node file it wrote after its command returned."""

    node_rank: int
    node: str  # the Slurm node name (SLURMD_NODENAME)
    host: str
    exit_code: int


class SrunError(BaseModel):
    """One `srun: error: <node>: task <ids>: <what>` line of the job's error file."""

    node: str
    tasks: str
    what: str


class MemoryKill(BaseModel):
    """One node's step that Slurm's accounting poll found past the job's memory limit, and killed."""

    node: str | None  # the Slurm node name, None where slurmstepd's log prefix does not carry it
    step: str  # e.g. StepId=3.0
    used_bytes: int  # the step's memory on that node at the poll (the sum of its processes' RSS)
    limit_bytes: int
    virtual: bool = False  # the virtual-memory limit (VSizeFactor) rather than the real one

    def describe(self) -> str:
        what = "virtual memory" if self.virtual else "memory"
        return (f"{self.step} exceeded the job's {what} limit ({self.used_bytes / 2**20:.0f} MiB > "
                f"{self.limit_bytes / 2**20:.0f} MiB), killed by Slurm")


def memory_kills(err_text: str) -> list[MemoryKill]:
    """slurmstepd's memory-limit kills in the job's error file, once per node and step, in order."""
    kills: dict[tuple, MemoryKill] = {}
    for m in _MEMORY_KILL.finditer(err_text):
        kill = MemoryKill(**{**m.groupdict(), "virtual": bool(m.group("virtual"))})
        kills.setdefault((kill.node, kill.step), kill)
    return list(kills.values())


def read_node_ends(folder: Path, nodes: int) -> dict[int, NodeEnd | None]:
    """Node rank -> its end, None for a node that wrote no file (killed, or never started)."""
    ends: dict[int, NodeEnd | None] = {}
    for rank in range(nodes):
        path = folder / NODE_FILE.format(node_rank=rank)
        ends[rank] = NodeEnd(**json.loads(path.read_text())) if path.exists() else None
    return ends


def srun_errors(err_text: str) -> list[SrunError]:
    """srun's per-task error lines, in the order it printed them: the first is the task that failed;
    with --kill-on-bad-exit the others follow as `Terminated`."""
    return [SrunError(**m.groupdict()) for m in _SRUN_ERROR.finditer(err_text)]


def failed_nodes(info: JobInfo, ends: dict[int, NodeEnd | None], err_text: str) -> list[str]:
    """Who failed, in words (empty when nothing points at a node), each "node NAME ...": a node whose step
    Slurm killed past the memory limit first; then srun's first error (node and task); node files with
    a non-zero exit code (node and node rank); missing node files last."""
    named = [f"node {k.node}: {k.describe()}" for k in memory_kills(err_text) if k.node]
    errors = srun_errors(err_text)
    if errors:
        first = errors[0]
        named.append(f"node {first.node} (task {first.tasks}): {first.what}")
    for rank, end in ends.items():
        if end is not None and end.exit_code != 0:
            named.append(f"node {end.node} (node rank {rank}) exited {end.exit_code}")
    if not named and info.state != "COMPLETED":
        missing = [str(rank) for rank, end in ends.items() if end is None]
        if missing:
            named.append(f"node rank(s) {', '.join(missing)} left no node file (killed before their command returned)")
    return named


def bench_status(info: JobInfo, ranks_ok: bool, bench_timed_out: bool = False) -> BenchStatus:
    """The bench status of a job that has left the queue. ``ranks_ok``: every rank left its report;
    ``bench_timed_out``: bench cancelled the job because it passed bench's own time limit."""
    if info.active:
        raise ValueError(f"job {info.job_id} is still {info.state}; a status needs a job that ended")
    if bench_timed_out:
        return "timeout"
    status = _FINAL_STATUS.get(info.state, "crash")
    if status == "ok" and not ranks_ok:
        return "crash"
    return status
