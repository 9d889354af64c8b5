"""Which CPUs each rank of a node gets under ``cpu_affinity: cores``, planned in the parent from the host.

A small training step is bound by its rank's host thread (kernel launches, hooks): when the scheduler puts
the two ranks' threads on one core, or moves them, the step slows for as long as that lasts, and collectives
make the other rank wait too. "cores" gives each local rank a disjoint share of whole cores (SMT siblings kept
together), taken from the CPUs NVML lists as near to the rank's GPU where the host says (a NUMA node), else
from all the CPUs this process may use. The plan travels to the ranks as ``BENCH_CPU_AFFINITY`` (one CPU list
per local rank, ';'-separated); bench/worker/affinity.py applies it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

ENV = "BENCH_CPU_AFFINITY"


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,8,10-11' (the kernel's cpulist format) -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        start, _, end = part.partition("-")
        cpus.extend(range(int(start), int(end or start) + 1))
    return sorted(set(cpus))


def format_cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8'."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def siblings_of(cpu: int) -> set[int]:
    """The CPUs sharing ``cpu``'s core (itself included), from sysfs; just itself where the host does not say."""
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    try:
        return set(parse_cpu_list(path.read_text()))
    except (OSError, ValueError):
        return {cpu}


def core_groups(cpus: list[int], siblings=siblings_of) -> list[list[int]]:
    """``cpus`` grouped by physical core, in order of each core's first CPU."""
    allowed, groups = set(cpus), {}
    for cpu in sorted(allowed):
        group = sorted((siblings(cpu) & allowed) | {cpu})
        groups.setdefault(group[0], group)
    return [groups[k] for k in sorted(groups)]


def split(cpus: list[int], ranks: int, siblings=siblings_of) -> list[list[int]]:
    """``ranks`` disjoint, contiguous shares of ``cpus``: whole cores where there are at least ``ranks`` of
    them, else single CPUs. Raises ValueError when there are fewer CPUs than ranks."""
    if len(cpus) < ranks:
        raise ValueError(f"cpu_affinity: cores needs a CPU per rank: {ranks} rank(s) but {len(cpus)} CPU(s) "
                         f"({format_cpu_list(cpus)}). Fix: cpu_affinity: none, or fewer ranks per node")
    groups = core_groups(cpus, siblings)
    if len(groups) < ranks:
        groups = [[c] for c in sorted(cpus)]
    per, extra = divmod(len(groups), ranks)
    shares, start = [], 0
    for r in range(ranks):
        n = per + (1 if r < extra else 0)
        shares.append(sorted(c for g in groups[start:start + n] for c in g))
        start += n
    return shares


def plan(ranks: int, allowed: list[int], near: list[list[int]] | None = None, siblings=siblings_of) -> list[list[int]]:
    """Each local rank's CPUs. ``near``: per rank, the CPUs near its GPU (None: no such knowledge, CPU cells).
    Ranks whose near sets are alike split that set (within ``allowed``); a set with fewer CPUs than the ranks
    that share it, or none known, falls back to all of ``allowed``."""
    pools = []
    for r in range(ranks):
        pool = sorted(set(allowed) & set(near[r])) if near else []
        pools.append(pool if pool else sorted(allowed))
    for pool in {tuple(p) for p in pools}:
        if len(pool) < pools.count(list(pool)):
            pools = [sorted(allowed)] * ranks  # too small to share: plan over everything instead
            break
    out: list[list[int]] = [[] for _ in range(ranks)]
    for pool in sorted({tuple(p) for p in pools}):
        members = [r for r in range(ranks) if tuple(pools[r]) == pool]
        for r, share in zip(members, split(list(pool), len(members), siblings)):
            out[r] = share
    return out


def gpu_near_cpus(gpu_count: int) -> list[list[int]] | None:
    """Per CUDA device 0..gpu_count-1 of the cell, the CPUs NVML calls near it; None without NVML, or when
    NVML lists every CPU for every card (a host, or a VM, that tells nothing)."""
    from bench.machine.gpu_state import nvml, nvml_handle_for_cuda_index

    lib = nvml()
    if lib is None:
        return None
    words = math.ceil((os.cpu_count() or 1) / 64)
    near = []
    try:
        for i in range(gpu_count):
            mask = lib.nvmlDeviceGetCpuAffinity(nvml_handle_for_cuda_index(i), words)
            near.append([64 * w + b for w, word in enumerate(mask) for b in range(64) if word >> b & 1])
    except Exception:  # noqa: BLE001 - NVMLError_NotSupported and kin: no placement knowledge
        return None
    everything = set(range(os.cpu_count() or 1))
    return None if all(set(n) >= everything for n in near) else near


def launch_value(ranks: int, device: str) -> tuple[str, str]:
    """(BENCH_CPU_AFFINITY value, a note saying where it came from) for a cell of ``ranks`` local ranks."""
    allowed = sorted(os.sched_getaffinity(0))
    near = gpu_near_cpus(ranks) if device == "cuda" else None
    shares = plan(ranks, allowed, near)
    value = ";".join(format_cpu_list(s) for s in shares)
    source = "NVML's CPUs near each GPU" if near else f"the {len(allowed)} CPU(s) this process may use"
    return value, f"{ENV}={value}: each rank pinned to its own cores, from {source}"
