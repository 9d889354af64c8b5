"""What the host did during the timed window (bench/worker/host_window.py): the /proc/stat arithmetic on
written readings, and real windows over a sleeping and a spinning step on this machine."""

from __future__ import annotations

import os
import time

import pytest

from bench.worker.cpu_probe import probe_ms
from bench.worker.affinity import core_siblings
from bench.worker.host_window import (HostWindow, busy_share, current_cpu, host_cpu_times, host_shares,
                                      per_cpu_times)


def _stat(tmp_path, line: str):
    path = tmp_path / "stat"
    path.write_text(line + "\ncpu0 1 2 3 4\nintr 5\n")
    return host_cpu_times(path)


def test_steal_and_busy_shares_come_from_the_difference_of_two_readings(tmp_path):
    before = _stat(tmp_path, "cpu  100 0 50 800 10 0 0 40 0 0")
    after = _stat(tmp_path, "cpu  160 0 70 900 10 0 0 60 0 0")  # +60 user +20 system +100 idle +20 steal
    shares = host_shares(before, after)
    assert shares["steal_share"] == pytest.approx(20 / 200)
    assert shares["host_busy_share"] == pytest.approx(80 / 200)


def test_a_kernel_without_a_steal_column_gives_no_steal_share(tmp_path):
    before = _stat(tmp_path, "cpu  100 0 50 800 10 0 0")
    after = _stat(tmp_path, "cpu  150 0 50 850 10 0 0")
    assert host_shares(before, after) == {"steal_share": None, "host_busy_share": pytest.approx(0.5)}
    assert host_shares(None, after) == {"steal_share": None, "host_busy_share": None}
    assert host_cpu_times(tmp_path / "absent") is None


def _window(step) -> dict:
    window = HostWindow()
    window.open()
    step()
    window.close()
    window.close()  # a second close keeps the first reading
    return window.record()


def test_a_sleeping_step_uses_little_cpu_and_a_spinning_one_a_whole_cpu():
    slept = _window(lambda: time.sleep(0.3))
    assert slept["rank_cpu_per_wall"] < 0.3 and slept["window_s"] >= 0.3
    assert slept["voluntary_switches"] >= 1 and slept["allowed_cpus"] >= 1

    def spin():
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            pass

    spun = _window(spin)
    assert spun["rank_cpu_per_wall"] > 0.5  # this thread ran most of the window (2 shared cores: not all of it)
    for record in (slept, spun):
        assert record["host_busy_share"] is None or 0 <= record["host_busy_share"] <= 1
        assert record["steal_share"] is None or 0 <= record["steal_share"] <= 1
    assert HostWindow().record() is None  # never opened: nothing to say
    assert slept["cpu_probe_ms_before"] is None and slept["cpu_probe_ms_after"] > 0  # probe() was not called


def _probed_window() -> dict:
    """A window with nothing in it, probed as the worker does: before it (probe) and after it (close)."""
    window = HostWindow()
    window.probe()
    window.open()
    window.close()
    return window.record()


def test_the_cpu_probe_is_timed_before_and_after_the_window_and_scales_with_its_work():
    record = _probed_window()
    assert record["cpu_probe_ms_before"] > 0 and record["cpu_probe_ms_after"] > 0
    # the fastest of several repeats of a fixed work: ten times the work takes several times as long
    assert probe_ms(rounds=20_000) > 3 * probe_ms(rounds=2_000)


def test_per_cpu_busy_shares_leave_idle_iowait_and_steal_out(tmp_path):
    path = tmp_path / "stat"
    path.write_text("cpu  9 9 9 9\ncpu0 10 0 10 80 0 0 0 0\ncpu1 50 0 0 50 0 0 0 0\nintr 5\n")
    before = per_cpu_times(path)
    path.write_text("cpu  9 9 9 9\ncpu0 10 0 10 180 0 0 0 0\ncpu1 100 0 0 50 0 0 0 50\nintr 5\n")
    after = per_cpu_times(path)
    assert before == {0: (20, 100), 1: (50, 100)}  # the "cpu" total line is not a CPU
    assert busy_share(before, after, [0]) == 0  # cpu0 idled
    assert busy_share(before, after, [1]) == pytest.approx(0.5)  # cpu1: 50 busy, 50 stolen
    assert busy_share(before, after, [0, 1]) == pytest.approx(50 / 200)
    assert busy_share(before, after, [7]) is None  # no such CPU: nothing to say
    assert per_cpu_times(tmp_path / "absent") == {}


def test_the_cpu_a_thread_ran_on_is_read_past_a_command_name_with_spaces_and_parentheses(tmp_path):
    path = tmp_path / "stat"
    fields = [str(i) for i in range(3, 53)]  # fields 3 .. 52; field 39 is the CPU
    path.write_text("4242 (pt main) (x) " + " ".join(fields) + "\n")
    assert current_cpu(path) == 39
    assert current_cpu(tmp_path / "absent") is None
    here = current_cpu()
    assert here is None or here in os.sched_getaffinity(0)


def test_each_probe_says_where_it_ran_and_how_busy_its_core_was():
    record = _probed_window()
    for key in ("cpu_probe_where_before", "cpu_probe_where_after"):
        where = record[key]
        assert all(c is None or c in os.sched_getaffinity(0) for c in where["cpus"])
        end = where["cpus"][1]
        assert end not in where["siblings"]  # the core's other hardware threads, not itself
        assert set(where["siblings"]) == core_siblings(end) - {end}
        assert (where["siblings_busy_share"] is None) == (not where["siblings"])
        assert where["host_busy_share"] is None or 0 <= where["host_busy_share"] <= 1
