"""``cpu_affinity: cores`` inside a rank: pin every thread of this process to the CPUs the parent planned.

The parent's plan (bench/machine/cpu_affinity.py) arrives as BENCH_CPU_AFFINITY, one CPU list per local rank,
';'-separated. It is applied first thing in the worker, before the accelerator, NCCL or DeepSpeed start their
threads (they inherit the mask); threads already running (torch's import may start some) are pinned one by
one, since sched_setaffinity on Linux changes a single thread.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "BENCH_CPU_AFFINITY"  # the same name as bench.machine.cpu_affinity.ENV (the worker may not import it)


def _cpus(text: str) -> list[int]:
    """The kernel's cpulist format, as bench.machine.cpu_affinity.parse_cpu_list reads it: kept apart on
    purpose, since the worker imports nothing of the parent side (pyproject's import-linter contracts)."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        start, _, end = part.partition("-")
        out.extend(range(int(start), int(end or start) + 1))
    return sorted(set(out))


def core_siblings(cpu: int) -> set[int]:
    """The CPUs sharing ``cpu``'s physical core, itself included (sysfs); just itself where the host does not say."""
    try:
        return set(_cpus(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text()))
    except (OSError, ValueError):
        return {cpu}


def apply_from_env() -> dict | None:
    """Pin this rank (LOCAL_RANK's entry) and return what was asked; None when the cell did not ask."""
    value = os.environ.get(ENV)
    if not value:
        return None
    shares = value.split(";")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= len(shares):
        raise RuntimeError(f"{ENV}={value!r} plans {len(shares)} rank(s) but this is local rank {local_rank}: "
                           "the launch and its plan disagree. Fix: run the cell again through bench run")
    cpus = _cpus(shares[local_rank])
    threads = [int(t) for t in os.listdir("/proc/self/task")] if Path("/proc/self/task").is_dir() else [0]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    return {"mode": "cores", "planned_cpus": cpus, "threads_pinned_at_start": len(threads)}


def describe(asked: dict | None) -> dict | None:
    """The record's ``cpu_affinity``: what was planned and what this thread holds when the rank reports (a
    library that reset the mask would show here)."""
    if asked is None:
        return None
    return {**asked, "cpus_at_report": sorted(os.sched_getaffinity(0))}
