"""NVML sampling of the cell's GPUs, from a thread of the parent process (never inside the ranks).

Per GPU, every ``interval_s`` (20 Hz by default): memory used, utilisation, power, the total-energy
counter, SM clock and the clock event (throttle) reasons. ``stop`` turns the samples into the record's
``nvml`` dict: peaks and means, energy over the timed window the ranks report, and a downsampled trace.

Energy comes from the card's own energy counter (millijoules since driver load), read at the edges of
the timed window by linear interpolation between the two samples around each edge; where a card has no
counter, the power samples are integrated instead (and the record says so).
"""

from __future__ import annotations

import bisect
import math
import os
import threading
import time
from dataclasses import dataclass, field

from bench.machine import gpu_state

DEFAULT_INTERVAL_S = 0.05
TRACE_POINTS = 600
MIB = 2**20

# Bit -> name of NVML's clock event reasons (called throttle reasons before driver 535).
REASON_NAMES = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting",
}

# The reasons that mean the card ran below the clock it would otherwise hold: a power cap or a thermal
# limit (sync_boost, idle and application-clock settings are not a throttle of the work under way).
THROTTLE_REASONS = ("sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown",
                    "hw_power_brake_slowdown")
THROTTLE_MASK = sum(bit for bit, name in REASON_NAMES.items() if name in THROTTLE_REASONS)


def reason_names(mask: int) -> list[str]:
    return [name for bit, name in REASON_NAMES.items() if mask & bit]


def sampler_enabled() -> bool:
    """BENCH_SAMPLER=0 turns sampling off (benchmarks/sampler_overhead.py measures the difference)."""
    return os.environ.get("BENCH_SAMPLER", "1") not in ("0", "false", "no", "off")


def interval_from_env() -> float:
    """BENCH_SAMPLER_INTERVAL_S overrides the sampling interval (to measure what a faster rate costs)."""
    return float(os.environ.get("BENCH_SAMPLER_INTERVAL_S", DEFAULT_INTERVAL_S))


@dataclass
class GpuTrace:
    index: int
    name: str
    mem_total_bytes: int
    t: list[float] = field(default_factory=list)  # time.time() of each sample
    mem_used: list[int] = field(default_factory=list)  # bytes
    util: list[float] = field(default_factory=list)  # percent of time a kernel ran
    power_w: list[float] = field(default_factory=list)
    energy_mj: list[float | None] = field(default_factory=list)  # counter, None where unsupported
    sm_clock_mhz: list[float] = field(default_factory=list)
    reasons: list[int] = field(default_factory=list)


class _Reader:
    """The NVML calls of one sample; the reason query's name changed in driver 535 (throttle -> event)."""

    def __init__(self, lib):
        self.lib = lib
        self.reasons_fn = (getattr(lib, "nvmlDeviceGetCurrentClocksEventReasons", None)
                           or lib.nvmlDeviceGetCurrentClocksThrottleReasons)
        self.has_energy: dict[int, bool] = {}

    def energy_mj(self, index: int, handle) -> float | None:
        if self.has_energy.get(index, True):
            try:
                return float(self.lib.nvmlDeviceGetTotalEnergyConsumption(handle))
            except self.lib.NVMLError:
                self.has_energy[index] = False  # Volta and later have it; do not ask again
        return None

    def sample(self, trace: GpuTrace, handle) -> None:
        lib = self.lib
        now = time.time()
        mem = lib.nvmlDeviceGetMemoryInfo(handle).used
        util = lib.nvmlDeviceGetUtilizationRates(handle).gpu
        power = lib.nvmlDeviceGetPowerUsage(handle) / 1000.0  # milliwatts
        energy = self.energy_mj(trace.index, handle)
        clock = lib.nvmlDeviceGetClockInfo(handle, lib.NVML_CLOCK_SM)
        reasons = self.reasons_fn(handle)
        trace.t.append(now)
        trace.mem_used.append(int(mem))
        trace.util.append(float(util))
        trace.power_w.append(power)
        trace.energy_mj.append(energy)
        trace.sm_clock_mhz.append(float(clock))
        trace.reasons.append(int(reasons))


class NvmlSampler:
    """Samples the cards of a cell of ``gpu_count`` ranks: start() before launch, stop(reports) after."""

    def __init__(self, gpu_count: int, interval_s: float | None = None, lib=None):
        self.gpu_count = gpu_count
        self.interval_s = interval_s if interval_s is not None else interval_from_env()
        self.lib = lib if lib is not None else gpu_state.nvml()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handles: list = []
        self.traces: list[GpuTrace] = []
        self.started_at: float | None = None
        self.errors: list[str] = []

    @property
    def available(self) -> bool:
        return self.lib is not None

    @property
    def running(self) -> bool:
        """Started and sampling (False where NVML is absent or the cards could not be opened)."""
        return self._thread is not None

    def _open(self) -> None:
        lib = self.lib
        if lib is gpu_state.nvml():
            pairs = gpu_state.cell_handles(self.gpu_count)
        else:  # a test's fake NVML: plain indices
            pairs = [(i, lib.nvmlDeviceGetHandleByIndex(i)) for i in range(self.gpu_count)]
        for index, handle in pairs:
            name = lib.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            total = lib.nvmlDeviceGetMemoryInfo(handle).total
            self._handles.append(handle)
            self.traces.append(GpuTrace(index, name, int(total)))

    def start(self) -> None:
        if not self.available:
            return
        try:
            self._open()
        except Exception as e:  # noqa: BLE001 - a sampler that cannot open must not stop the cell
            import warnings

            warnings.warn(f"NVML sampler off for this cell: {type(e).__name__}: {e}", stacklevel=2)
            return
        self.started_at = time.time()
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        reader = _Reader(self.lib)
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.sample_once(reader)
            # Fixed rate, not fixed sleep: a slow NVML call does not stretch the interval.
            next_at += self.interval_s
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def sample_once(self, reader: _Reader) -> None:
        for trace, handle in zip(self.traces, self._handles):
            try:
                reader.sample(trace, handle)
            except Exception as e:  # noqa: BLE001 - one failed read must not end the sampling
                if len(self.errors) < 10:
                    self.errors.append(f"GPU {trace.index}: {type(e).__name__}: {e}")

    def stop(self, rank_reports: list[dict]) -> dict | None:
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join(timeout=5)
        return summarise(self.traces, self.interval_s, self.started_at, timed_window(rank_reports), self.errors)


# ---------------------------------------------------------------- turning samples into the record

def timed_window(rank_reports: list[dict]) -> tuple[float, float] | None:
    """[earliest start, latest end] of the ranks' timed windows: the span every rank was measured in."""
    windows = [r["timed_window"] for r in rank_reports if r.get("timed_window")]
    if not windows:
        return None
    return min(w[0] for w in windows), max(w[1] for w in windows)


def _interpolate(ts: list[float], values: list[float], at: float) -> float:
    i = bisect.bisect_left(ts, at)
    if i <= 0:
        return values[0]
    if i >= len(ts):
        return values[-1]
    t0, t1 = ts[i - 1], ts[i]
    frac = (at - t0) / (t1 - t0) if t1 > t0 else 0.0
    return values[i - 1] + frac * (values[i] - values[i - 1])


def energy_j(trace: GpuTrace, window: tuple[float, float]) -> tuple[float | None, str]:
    """Energy in joules over ``window`` and how it was obtained ("counter" or "power_integral")."""
    if len(trace.t) < 2:
        return None, "too_few_samples"
    if all(e is not None for e in trace.energy_mj):
        counter = [float(e) for e in trace.energy_mj]
        return (_interpolate(trace.t, counter, window[1]) - _interpolate(trace.t, counter, window[0])) / 1000.0, "counter"
    # No counter: trapezoids of power over the window, edges interpolated.
    inside = [t for t in trace.t if window[0] < t < window[1]]
    ts = [window[0], *inside, window[1]]
    ps = [_interpolate(trace.t, trace.power_w, t) for t in ts]
    return sum((ts[i + 1] - ts[i]) * (ps[i] + ps[i + 1]) / 2 for i in range(len(ts) - 1)), "power_integral"


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _in_window(trace: GpuTrace, window: tuple[float, float] | None) -> list[int]:
    """Sample positions inside the window (all of them without one, or if none fell inside)."""
    if window is None:
        return list(range(len(trace.t)))
    inside = [i for i, t in enumerate(trace.t) if window[0] <= t <= window[1]]
    return inside or list(range(len(trace.t)))


def gpu_summary(trace: GpuTrace, window: tuple[float, float] | None) -> dict:
    idx = _in_window(trace, window)
    energy, method = energy_j(trace, window) if window else (None, "no_timed_window")
    mask = 0
    for i in idx:
        mask |= trace.reasons[i]
    return {
        "index": trace.index,
        "name": trace.name,
        "samples": len(trace.t),
        "mem_used_peak_bytes": max(trace.mem_used, default=None),  # whole run: what must fit
        "mem_used_mean_bytes": _mean(trace.mem_used[i] for i in idx),
        "mem_total_bytes": trace.mem_total_bytes,
        "util_mean_pct": _mean(trace.util[i] for i in idx),
        "power_mean_w": _mean(trace.power_w[i] for i in idx),
        "power_peak_w": max((trace.power_w[i] for i in idx), default=None),
        "energy_timed_j": energy,
        "energy_method": method,
        "sm_clock_mean_mhz": _mean(trace.sm_clock_mhz[i] for i in idx),
        "throttle_reasons": reason_names(mask),  # union over the window's samples
        **throttle_shares([trace.reasons[i] for i in idx]),
    }


def throttle_shares(masks: list[int]) -> dict:
    """Share of the samples under a power or thermal throttle (any, and per reason seen)."""
    if not masks:
        return {}
    per_reason = {name: sum(1 for m in masks if m & bit) / len(masks)
                  for bit, name in REASON_NAMES.items() if name in THROTTLE_REASONS}
    return {"throttled_share": sum(1 for m in masks if m & THROTTLE_MASK) / len(masks),
            "throttle_share_by_reason": {k: v for k, v in per_reason.items() if v > 0},
            "window_samples": len(masks)}


def downsample(n: int, limit: int = TRACE_POINTS) -> list[int]:
    """Evenly spaced positions, at most ``limit``, always keeping the last."""
    if n <= limit:
        return list(range(n))
    stride = math.ceil(n / limit)
    keep = list(range(0, n, stride))
    if keep[-1] != n - 1:
        keep[-1] = n - 1
    return keep


def trace_dict(traces: list[GpuTrace], started_at: float) -> dict:
    base = traces[0] if traces else None
    keep = downsample(len(base.t)) if base else []
    gpus = {}
    for tr in traces:
        k = [i for i in keep if i < len(tr.t)]
        gpus[str(tr.index)] = {
            "mem_used_mib": [round(tr.mem_used[i] / MIB) for i in k],
            "power_w": [round(tr.power_w[i], 1) for i in k],
            "util_pct": [tr.util[i] for i in k],
            "sm_clock_mhz": [tr.sm_clock_mhz[i] for i in k],
        }
    return {"t": [round(base.t[i] - started_at, 3) for i in keep] if base else [], "gpus": gpus}


def summarise(traces: list[GpuTrace], interval_s: float, started_at: float | None,
              window: tuple[float, float] | None, errors: list[str] | None = None) -> dict:
    per_gpu = [gpu_summary(tr, window) for tr in traces]
    energies = [g["energy_timed_j"] for g in per_gpu]
    n = max((len(tr.t) for tr in traces), default=0)
    span = (traces[0].t[-1] - traces[0].t[0]) if traces and len(traces[0].t) > 1 else 0.0
    return {
        "interval_s": interval_s,
        "started_at": started_at,  # time.time() of the trace's t = 0, to place the timed window on it
        "achieved_hz": (n - 1) / span if span > 0 else None,
        "gpu_indices": [tr.index for tr in traces],
        "timed_window": list(window) if window else None,
        "per_gpu": per_gpu,
        "energy_timed_j": sum(energies) if energies and all(e is not None for e in energies) else None,
        "trace": trace_dict(traces, started_at or 0.0),
        "errors": errors or [],
    }
