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
  host's CPU ran, comparable between launches and machines;
- ``host_pace_ms_end``: the light per-step probe (``step_probe_ms``) after the last step; each timed step holds
  its own reading taken before it (``host_pace_ms``), so a step lies between two readings (bench/report/host_steady.py);
- ``cpu_probe_where_before`` / ``_after``: where each probe ran and what shared its core meanwhile
  (``probe_where``): the CPUs the thread was on when the probe started and ended, that CPU's SMT siblings (sysfs),
  the share of the siblings' time busy during the probe and the whole host's. On 2x H200 the probe took either
  ~4 ms or ~8 ms, flipping within a launch (results/llama8b-h200-c, -d): the fastest of its repeats twice as
  slow is a core at half pace, not a preemption, and a busy sibling in this guest says our own threads shared
  the core, an idle one that something outside the guest did.
Reading /proc/stat and getrusage twice costs microseconds: nothing inside the steps.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

from bench.worker.affinity import core_siblings
from bench.worker.cpu_probe import probe_ms, step_probe_ms

_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def _cpu_lines(stat: Path) -> dict[str, dict[str, int]]:
    """/proc/stat's "cpu" lines (the all-CPU total, then cpu0, cpu1 ...) as cumulative jiffies by kind; a kernel
    without the later columns (steal) leaves them out. {} where the file is not there."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for name, *values in (line.split() for line in lines if line.startswith("cpu")):
        out[name] = dict(zip(_STAT_FIELDS, map(int, values)))
    return out


def host_cpu_times(stat: Path = Path("/proc/stat")) -> dict[str, int] | None:
    """The host's cumulative CPU time by kind (jiffies, all CPUs); None where /proc/stat is not there."""
    return _cpu_lines(stat).get("cpu")


def per_cpu_times(stat: Path = Path("/proc/stat")) -> dict[int, tuple[int, int]]:
    """Per CPU: (busy, total) cumulative jiffies, busy leaving out idle, iowait and steal (as host_shares);
    {} off Linux."""
    out = {}
    for name, fields in _cpu_lines(stat).items():
        if name[3:].isdigit():
            total = sum(fields.values())
            out[int(name[3:])] = (total - fields["idle"] - fields.get("iowait", 0) - fields.get("steal", 0), total)
    return out


def current_cpu(stat: Path = Path("/proc/thread-self/stat")) -> int | None:
    """The CPU this thread last ran on: field 39 of its stat (counted after the command name, which may hold spaces)."""
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return None


def busy_share(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpus) -> float | None:
    """The busy share of ``cpus`` between two per_cpu_times readings; None where none of them ticked."""
    busy = sum(after[c][0] - before[c][0] for c in cpus if c in before and c in after)
    total = sum(after[c][1] - before[c][1] for c in cpus if c in before and c in after)
    return _share(busy, total)


def probe_where() -> tuple[float, dict]:
    """The CPU probe's time and where it ran (see the module's docstring). /proc/stat counts in ticks of
    10 ms, so over the probe's 30-60 ms a sibling's share is coarse: 0 or near 1 is what it can tell."""
    start_cpu, before = current_cpu(), per_cpu_times()
    ms = probe_ms()
    end_cpu, after = current_cpu(), per_cpu_times()
    siblings = sorted(core_siblings(end_cpu) - {end_cpu}) if end_cpu is not None else []
    return ms, {"cpus": [start_cpu, end_cpu], "siblings": siblings,
                "siblings_busy_share": busy_share(before, after, siblings) if siblings else None,
                "host_busy_share": busy_share(before, after, list(after))}


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
        self._probe_before: tuple[float | None, dict | None] = (None, None)

    def probe(self) -> None:
        """Time the CPU probe now: outside the window, where the ranks' barrier that follows absorbs it."""
        self._probe_before = probe_where()

    def open(self) -> None:
        self._start = (time.perf_counter(), host_cpu_times(), resource.getrusage(resource.RUSAGE_SELF))

    def close(self) -> None:
        if self._start is None or self._record is not None:
            return
        t0, cpu0, use0 = self._start
        wall = time.perf_counter() - t0
        use1, cpu1 = resource.getrusage(resource.RUSAGE_SELF), host_cpu_times()
        pace_end = step_probe_ms()  # the last step's closing reading, before the heavier probe below
        probe_after, where_after = probe_where()  # after the last step, and outside the window's own figures
        cpu_s = (use1.ru_utime - use0.ru_utime) + (use1.ru_stime - use0.ru_stime)
        self._record = {
            **host_shares(cpu0, cpu1),
            "rank_cpu_per_wall": _share(cpu_s, wall),
            "involuntary_switches": use1.ru_nivcsw - use0.ru_nivcsw,
            "voluntary_switches": use1.ru_nvcsw - use0.ru_nvcsw,
            "allowed_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "window_s": wall,
            "cpu_probe_ms_before": self._probe_before[0],
            "cpu_probe_ms_after": probe_after,
            "cpu_probe_where_before": self._probe_before[1],
            "cpu_probe_where_after": where_after,
            "host_pace_ms_end": pace_end,
        }

    def record(self) -> dict | None:
        return self._record
