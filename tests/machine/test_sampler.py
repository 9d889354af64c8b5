"""The sampler's bookkeeping (windows, energy, means, trace size) and the GPU checks, on a fake NVML.

A fake NVML only here, for CPU unit tests: on GPUs the real one is used (tests/gpu/test_gpu.py).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from bench.machine import gpu_state, sampler
from bench.machine.sampler import GpuTrace, NvmlSampler, energy_j, summarise, timed_window


class FakeNvml:
    """Just enough of pynvml: a card drawing a steady 300 W, its energy counter counting it."""

    NVML_CLOCK_SM = 1

    class NVMLError(Exception):
        pass

    def __init__(self, count=2, watts=300.0, used=(1 << 30), processes=()):
        self.count, self.watts, self.used, self.processes = count, watts, used, list(processes)
        self.t0 = time.time()

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetIndex(self, h):
        return h

    def nvmlDeviceGetName(self, h):
        return b"Fake H100"

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=self.used, total=80 << 30, free=(80 << 30) - self.used)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=90, memory=40)

    def nvmlDeviceGetPowerUsage(self, h):
        return int(self.watts * 1000)

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return (time.time() - self.t0) * self.watts * 1000  # millijoules

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1980

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return 0x4  # sw power cap

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [p for p in self.processes if p.gpu == h]


def test_sampler_thread_records_energy_over_the_timed_window():
    lib = FakeNvml(count=2, watts=300.0)
    s = NvmlSampler(2, interval_s=0.01, lib=lib)
    s.start()
    time.sleep(0.1)
    t0 = time.time()
    time.sleep(0.3)
    t1 = time.time()
    time.sleep(0.1)
    out = s.stop([{"rank": 0, "timed_window": [t0, t1]}, {"rank": 1, "timed_window": [t0 + 0.01, t1 - 0.01]}])
    assert out["gpu_indices"] == [0, 1] and out["timed_window"] == [t0, t1]
    assert out["achieved_hz"] > 10
    for g in out["per_gpu"]:
        assert g["energy_timed_j"] == pytest.approx(300.0 * (t1 - t0), rel=0.05)
        assert g["energy_method"] == "counter" and g["throttle_reasons"] == ["sw_power_cap"]
        assert g["power_mean_w"] == 300.0 and g["util_mean_pct"] == 90 and g["sm_clock_mean_mhz"] == 1980
        assert g["mem_used_peak_bytes"] == 1 << 30 and g["mem_total_bytes"] == 80 << 30
    assert out["energy_timed_j"] == pytest.approx(2 * 300.0 * (t1 - t0), rel=0.05)
    assert set(out["trace"]["gpus"]) == {"0", "1"}
    assert len(out["trace"]["t"]) == len(out["trace"]["gpus"]["0"]["power_w"]) > 10


def trace_of(n: int, watts=lambda t: 100.0, energy=True) -> GpuTrace:
    tr = GpuTrace(0, "g", 80 << 30)
    for i in range(n):
        t = 1000.0 + i * 0.1
        tr.t.append(t)
        tr.mem_used.append(i)
        tr.util.append(50.0)
        tr.power_w.append(watts(t))
        tr.energy_mj.append(i * 0.1 * 100.0 * 1000 if energy else None)  # 100 W steady
        tr.sm_clock_mhz.append(1500.0)
        tr.reasons.append(0x1 if t < 1001 else 0x0)  # idle only before the window
    return tr


def test_energy_counter_is_interpolated_at_the_window_edges():
    e, how = energy_j(trace_of(100), (1001.05, 1003.55))
    assert how == "counter" and e == pytest.approx(250.0)


def test_without_counter_power_is_integrated():
    e, how = energy_j(trace_of(100, energy=False), (1001.05, 1003.55))
    assert how == "power_integral" and e == pytest.approx(250.0)


def test_window_means_and_reasons_ignore_samples_outside_it():
    out = summarise([trace_of(100)], 0.1, 1000.0, (1002.0, 1003.0))
    g = out["per_gpu"][0]
    assert g["throttle_reasons"] == []  # the idle samples before the window do not count
    assert g["mem_used_peak_bytes"] == 99  # the peak is over the whole run: what had to fit
    assert g["mem_used_mean_bytes"] == pytest.approx(25.0)  # samples 20..30


def test_throttle_share_counts_the_windows_power_and_thermal_samples():
    tr = trace_of(100)
    # inside the window (samples 20..30): power cap on 4 of 11 samples, one of them also thermal; sync boost
    # (not a throttle of the work) on the rest; outside, a power cap everywhere that must not count
    for i in range(100):
        tr.reasons[i] = 0x4 if not 20 <= i <= 30 else 0x10
    for i in (20, 21, 22):
        tr.reasons[i] = 0x4
    tr.reasons[23] = 0x4 | 0x20
    g = summarise([tr], 0.1, 1000.0, (1002.0, 1003.0))["per_gpu"][0]
    assert g["window_samples"] == 11
    assert g["throttled_share"] == pytest.approx(4 / 11)
    assert g["throttle_share_by_reason"] == pytest.approx({"sw_power_cap": 4 / 11, "sw_thermal_slowdown": 1 / 11})
    assert "sync_boost" in g["throttle_reasons"]  # the union keeps every reason, as before


def test_no_window_gives_no_energy_but_keeps_peaks():
    out = summarise([trace_of(10)], 0.1, 1000.0, None)
    assert out["energy_timed_j"] is None and out["per_gpu"][0]["energy_method"] == "no_timed_window"
    assert out["per_gpu"][0]["mem_used_peak_bytes"] == 9


def test_trace_is_downsampled_to_600_points_keeping_the_last():
    out = summarise([trace_of(5000)], 0.1, 1000.0, None)
    assert 300 < len(out["trace"]["t"]) <= sampler.TRACE_POINTS
    assert out["trace"]["t"][-1] == pytest.approx(499.9)


def test_timed_window_spans_all_ranks_and_tolerates_missing_ones():
    assert timed_window([{"timed_window": [2, 5]}, {"timed_window": [1, 4]}, {}]) == (1, 5)
    assert timed_window([{"timed_window": None}]) is None


def test_sampler_is_inert_without_nvml(monkeypatch):
    monkeypatch.setattr(gpu_state, "nvml", lambda: None)
    s = NvmlSampler(2, lib=None)
    s.start()
    assert s.stop([]) is None


def test_bench_sampler_env_turns_it_off(monkeypatch):
    monkeypatch.setenv("BENCH_SAMPLER", "0")
    assert not sampler.sampler_enabled()
    monkeypatch.setenv("BENCH_SAMPLER", "1")
    assert sampler.sampler_enabled()


# ---------------------------------------------------------------- gpu_state

@pytest.fixture
def fake(monkeypatch):
    def use(**kw):
        lib = FakeNvml(**kw)
        monkeypatch.setattr(gpu_state, "nvml", lambda: lib)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        return lib
    return use


def test_free_gpus_are_not_busy(fake):
    fake(count=2, used=500 << 20)
    assert gpu_state.busy_reason(2) is None


def test_too_few_gpus_is_busy(fake):
    fake(count=1)
    assert "needs 2 GPU(s), 1 visible" in gpu_state.busy_reason(2)


def test_other_process_or_held_memory_is_busy(fake):
    fake(count=2, used=500 << 20, processes=[SimpleNamespace(pid=4242, gpu=1, usedGpuMemory=1 << 30)])
    assert "GPU 1: compute process(es) 4242" in gpu_state.busy_reason(2)
    assert gpu_state.busy_reason(2, ignore_pids={4242}) is None
    fake(count=2, used=10 << 30)
    assert "GiB already in use" in gpu_state.busy_reason(1)


def test_compute_processes_lists_pid_gpu_and_memory(fake):
    fake(count=2, processes=[SimpleNamespace(pid=7, gpu=0, usedGpuMemory=None)])
    assert gpu_state.compute_processes() == [{"pid": 7, "gpu_index": 0, "used_bytes": None}]


def test_cuda_visible_devices_maps_cuda_index_to_nvml_index(fake, monkeypatch):
    fake(count=4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpu_state.visible_count() == 2
    assert [i for i, _ in gpu_state.cell_handles(2)] == [2, 3]


def test_no_nvml_means_nothing_to_report(monkeypatch):
    monkeypatch.setattr(gpu_state, "nvml", lambda: None)
    assert gpu_state.compute_processes() == [] and gpu_state.busy_reason(4) is None


def test_environment_describes_the_visible_cards_only(fake, monkeypatch):
    """Two cards of a 4-GPU host (a lane of benchmarks/gpu_session.sh) make a 2-GPU run, compared as such."""
    from bench.machine import envinfo

    lib = fake(count=4)
    lib.nvmlSystemGetDriverVersion = lambda: "580.0"
    lib.nvmlSystemGetCudaDriverVersion = lambda: 13000
    lib.nvmlDeviceGetPowerManagementLimit = lambda h: 700_000
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    info = envinfo.gpu_info()
    assert info["gpu_count"] == 2 and info["gpu_indices"] == [2, 3] and info["host_gpu_count"] == 4
    assert envinfo.hardware_key(info).startswith("2x ")
