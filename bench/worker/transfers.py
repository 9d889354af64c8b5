"""Host-device traffic of an offloading strategy, measured on one extra, profiled training step.

Where parameters or optimizer states live on the host (DeepSpeed ZeRO-Offload, FSDP parameter offload),
part of every step is copying over PCIe. The step's own timers cannot separate it: FSDP's copies run
inside forward and backward, DeepSpeed's inside the optimizer step, and both overlap copies with compute.
So after the timed steps each rank runs one more step under torch.profiler (CUDA activity: CUPTI records
every memcpy the GPU performs, with its duration and size) and sums the host-to-device and device-to-host
copies. The profiled step is not one of the timed steps: profiling slows launches a little, and the
timed figures stay clean.

Recorded per rank as ``host_device_traffic``: seconds and bytes each way, the profiled step's wall time
(the copies' share of it is an upper bound of what they cost, since they may overlap compute), and the
number of copies; or ``{"error": ...}`` where profiling failed (the cell itself is not failed for it).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable

DIRECTIONS = {"HtoD": "htod", "DtoH": "dtoh"}


def offloads(strategy) -> bool:
    """Whether a cell of this strategy gets the profiled step: it offloads (None: an unreadable user config)."""
    return strategy is not None and strategy.offloads


def summarise_memcpy(trace_events: list[dict], step_s: float) -> dict:
    """Copies of a Chrome trace (torch.profiler's export; category ``gpu_memcpy``) summed by direction.

    Durations in a trace are microseconds; ``args.bytes`` is the size CUPTI reports.
    """
    out = {"htod_s": 0.0, "dtoh_s": 0.0, "htod_bytes": 0, "dtoh_bytes": 0, "copies": 0, "step_s": step_s}
    for event in trace_events:
        if event.get("cat") != "gpu_memcpy":
            continue
        name = event.get("name", "")
        direction = next((key for tag, key in DIRECTIONS.items() if tag in name), None)
        if direction is None:  # device-to-device copies stay on the card
            continue
        out[f"{direction}_s"] += float(event.get("dur", 0)) / 1e6
        out[f"{direction}_bytes"] += int((event.get("args") or {}).get("bytes", 0) or 0)
        out["copies"] += 1
    return out


def measure(run_step: Callable[[], object], sync: Callable[[], None]) -> dict:
    """Run ``run_step`` once under the CUDA profiler and summarise its host-device copies.

    A profiler that cannot start or export is recorded as an error and the cell goes on; an error of the
    step itself propagates like that of any training step (every rank runs this step: skipping it on one
    would leave the others waiting in a collective).
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        prof = profile(activities=[ProfilerActivity.CUDA])
        prof.__enter__()
    except Exception as e:  # noqa: BLE001 - no CUPTI, a second profiler ...: the figure is missing, no more
        return {"error": f"profiler did not start: {type(e).__name__}: {e}"[:500]}
    try:
        t0 = time.perf_counter()
        run_step()
        sync()
        step_s = time.perf_counter() - t0
    finally:
        prof.__exit__(None, None, None)
    try:
        return summarise_memcpy(_trace_events(prof), step_s)
    except Exception as e:  # noqa: BLE001 - the trained cell stays ok without this figure
        return {"error": f"profile not read: {type(e).__name__}: {e}"[:500]}


def _trace_events(prof) -> list[dict]:
    fd, path = tempfile.mkstemp(suffix=".json", prefix="bench-trace-")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f).get("traceEvents", [])
    finally:
        os.unlink(path)
