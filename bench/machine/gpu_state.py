"""What the GPUs are doing right now, read through NVML from the parent process (never through CUDA).

The parent must not create a CUDA context: it would take memory on GPU 0 and show up as a process of its
own. NVML reads the cards without one. Used before a cell (is a card busy?) and after it (did a rank
outlive its launch?). Without NVML (a CPU machine) every answer is empty: nothing to check.
"""

from __future__ import annotations

import os
from functools import lru_cache

# A card that already holds this much is in use by someone else: a fresh H100 shows about 0.5 GiB
# used by the driver alone, so 2 GiB leaves room for that and catches any real tenant.
BUSY_USED_BYTES = 2 * 2**30


@lru_cache(maxsize=1)
def nvml():
    """The initialised pynvml module, or None where there is no NVML (no driver, CPU machine)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded ...
        return None


def _visible_entries() -> list[str] | None:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [e.strip() for e in value.split(",") if e.strip()]


def nvml_handle_for_cuda_index(cuda_index: int):
    """NVML handle of the card that CUDA (and so accelerate's local rank) calls ``cuda_index``.

    CUDA_VISIBLE_DEVICES may hold indices or UUIDs; NVML numbers every card, visible or not. Integer
    entries assume CUDA's order is PCI order (true on machines of identical cards, and always with
    CUDA_DEVICE_ORDER=PCI_BUS_ID).
    """
    lib = nvml()
    entries = _visible_entries()
    if entries is None:
        return lib.nvmlDeviceGetHandleByIndex(cuda_index)
    entry = entries[cuda_index]
    if entry.startswith(("GPU-", "MIG-")):
        return lib.nvmlDeviceGetHandleByUUID(entry)
    return lib.nvmlDeviceGetHandleByIndex(int(entry))


def visible_count() -> int:
    lib = nvml()
    if lib is None:
        return 0
    entries = _visible_entries()
    return lib.nvmlDeviceGetCount() if entries is None else len(entries)


def cell_handles(gpu_count: int) -> list[tuple[int, object]]:
    """(NVML index, handle) of the cards a cell of ``gpu_count`` ranks uses: CUDA devices 0..gpu_count-1."""
    lib = nvml()
    out = []
    for cuda_index in range(min(gpu_count, visible_count())):
        handle = nvml_handle_for_cuda_index(cuda_index)
        out.append((lib.nvmlDeviceGetIndex(handle), handle))
    return out


def _processes_on(handle) -> list:
    lib = nvml()
    try:
        return list(lib.nvmlDeviceGetComputeRunningProcesses(handle))
    except lib.NVMLError:
        return []


def compute_processes(gpu_count: int | None = None) -> list[dict]:
    """Compute processes on the visible cards (or the first ``gpu_count`` of them); [] without NVML.

    ``used_bytes`` is None where the driver does not say (it hides it inside some containers).
    """
    if nvml() is None:
        return []
    count = visible_count() if gpu_count is None else gpu_count
    out = []
    for index, handle in cell_handles(count):
        for p in _processes_on(handle):
            used = getattr(p, "usedGpuMemory", None)
            out.append({"pid": int(p.pid), "gpu_index": index, "used_bytes": int(used) if used is not None else None})
    return out


def busy_reason(gpu_count: int, ignore_pids: set[int] | frozenset[int] = frozenset(),
                busy_used_bytes: int = BUSY_USED_BYTES) -> str | None:
    """Why the cards a cell needs cannot give a clean measurement now, or None if they are free.

    Busy: fewer visible cards than the cell needs, another compute process on one of them, or memory
    already held (a process of another container is not listed but its memory is).
    """
    lib = nvml()
    if lib is None:
        return None
    visible = visible_count()
    if visible < gpu_count:
        return f"the cell needs {gpu_count} GPU(s), {visible} visible"
    reasons = []
    for index, handle in cell_handles(gpu_count):
        others = [p for p in _processes_on(handle) if int(p.pid) not in ignore_pids]
        if others:
            reasons.append(f"GPU {index}: compute process(es) {', '.join(str(p.pid) for p in others)}")
            continue
        used = lib.nvmlDeviceGetMemoryInfo(handle).used
        if used > busy_used_bytes:
            reasons.append(f"GPU {index}: {used / 2**30:.1f} GiB already in use")
    return "; ".join(reasons) or None
