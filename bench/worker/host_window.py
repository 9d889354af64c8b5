"""What the host did to a rank while its steps were timed: CPU stolen, CPU busy, the rank's own CPU use and
how often the scheduler took its CPU away.

A step that waits on the host (kernel launches, hooks: ZeRO-3 and FSDP LoRA cells keep their cards busy only
70-86 % of the timed window on 2x H200, results/llama8b-h200-a) runs at the host's pace, and on a virtual
machine that pace moves with the hypervisor and the neighbours. Whether a slow launch had a busier or stolen
host is then read from the record instead of guessed. Counted from the start of the first timed step to the
end of the last:
- ``steal_share``: the share of the host's CPU time the hypervisor gave to other guests (/proc/stat "steal",
  all CPUs), None where the kernel does not count it;
- ``host_busy_share``: the share of the host's CPU time not idle (every process: the ranks, bench, others);
- ``rank_cpu_per_wall``: this rank process's CPU seconds (all its threads, user + system) per wall second;
  waiting for the GPU can spin, so it says the thread was not descheduled, not that it worked;
- ``involuntary_switches`` / ``voluntary_switches``: times the scheduler took this process's CPU away / the
  process gave it up (waits);
- ``allowed_cpus``: how many CPUs the rank may run on (``cpu_affinity: cores`` narrows them);
- ``cpu_probe_ms_before`` / ``cpu_probe_ms_after``: a fixed piece of Python work timed on the rank's thread just
  before the window (ahead of the ranks' barrier) and just after it (bench/worker/cpu_probe.py): how fast the
  host's CPU ran, comparable between launches and machines.
Reading /proc/stat and getrusage twice costs microseconds: nothing inside the steps.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

from bench.worker.cpu_probe import probe_ms

_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def host_cpu_times(stat: Path = Path("/proc/stat")) -> dict[str, int] | None:
    """The host's cumulative CPU time by kind (jiffies, all CPUs); None where /proc/stat is not there."""
    try:
        first = stat.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not first or first[0] != "cpu":
        return None
    values = [int(v) for v in first[1:1 + len(_STAT_FIELDS)]]
    return dict(zip(_STAT_FIELDS, values))


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def host_shares(before: dict[str, int] | None, after: dict[str, int] | None) -> dict:
    """steal_share and host_busy_share between two host_cpu_times readings."""
    if not before or not after:
        return {"steal_share": None, "host_busy_share": None}
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in _STAT_FIELDS}
    total = sum(delta.values())
    idle = delta["idle"] + delta["iowait"]
    steal = _share(delta["steal"], total) if "steal" in after else None
    return {"steal_share": steal, "host_busy_share": _share(total - idle - delta["steal"], total)}


class HostWindow:
    """``probe()`` before the ranks' barrier ahead of the first timed step, ``open()`` when that step starts,
    ``close()`` after the last; ``record()`` for the rank report."""

    def __init__(self) -> None:
        self._start: tuple[float, dict | None, resource.struct_rusage] | None = None
        self._record: dict | None = None
        self._probe_before: float | None = None

    def probe(self) -> None:
        """Time the CPU probe now: outside the window, where the ranks' barrier that follows absorbs it."""
        self._probe_before = probe_ms()

    def open(self) -> None:
        self._start = (time.perf_counter(), host_cpu_times(), resource.getrusage(resource.RUSAGE_SELF))

    def close(self) -> None:
        if self._start is None or self._record is not None:
            return
        t0, cpu0, use0 = self._start
        wall = time.perf_counter() - t0
        use1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu_s = (use1.ru_utime - use0.ru_utime) + (use1.ru_stime - use0.ru_stime)
        self._record = {
            **host_shares(cpu0, host_cpu_times()),
            "rank_cpu_per_wall": _share(cpu_s, wall),
            "involuntary_switches": use1.ru_nivcsw - use0.ru_nivcsw,
            "voluntary_switches": use1.ru_nvcsw - use0.ru_nvcsw,
            "allowed_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "window_s": wall,
            "cpu_probe_ms_before": self._probe_before,
            "cpu_probe_ms_after": probe_ms(),  # after the last step: nothing timed waits on it
        }

    def record(self) -> dict | None:
        return self._record
