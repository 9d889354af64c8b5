"""The analysis of benchmarks/sampler_overhead.py: steps sorted into on/off windows, paired differences.

The benchmark itself needs a GPU (NVML); its arithmetic is checked here on made-up steps.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location(
    "sampler_overhead", REPO / "benchmarks" / "sampler_overhead.py")
so = importlib.util.module_from_spec(spec)
spec.loader.exec_module(so)


def record(step_times: list[float], t0: float = 100.0, ranks: int = 2) -> dict:
    """Back-to-back timed steps starting at t0; rank 1 a little slower, so the slowest rank counts."""
    out = []
    for rank in range(ranks):
        t, steps = t0, []
        for dt in step_times:
            steps.append({"phase": "timed", "started_at": t, "time_s": dt * (1 + 0.01 * rank)})
            t += dt
        out.append({"steps": steps})
    return {"ranks": out}


def test_steps_fall_into_the_window_that_wholly_holds_them():
    windows = [("on", 100.0, 101.0, 20, 0.01), ("off", 101.0, 102.0, 0, 0.0)]
    per_window = so.classify(record([0.25] * 8), windows)
    # 4 steps start in each window; the last of each ends past it (rank 1's step is 1 % longer): dropped
    assert [len(w) for w in per_window] == [3, 3]
    assert per_window[0][0] == pytest.approx(0.2525)  # the slowest rank's time


def test_on_windows_against_both_neighbours_cancel_a_linear_drift():
    windows = [("off" if i % 2 == 0 else "on", 100.0 + i, 101.0 + i, 20, 0.0) for i in range(7)]
    # steps get 5 % slower window after window; the sampler adds exactly 1 % in on windows
    per_window = [[0.1 * (1 + 0.05 * i) * (1.01 if i % 2 else 1.0)] * 3 for i in range(7)]
    diffs = so.paired_differences(windows, per_window)
    assert len(diffs) == 3 and np.allclose(diffs, 1.0)


def test_an_amplified_run_is_scaled_to_benchs_rate():
    """Sampling 25x faster: the measured cost and its interval shrink 25x at bench's 20 Hz."""
    proj = so.project_to_rate(2.5, (-0.5, 5.0), achieved_hz=500.0, target_hz=20.0)
    assert proj["scale"] == pytest.approx(0.04)
    assert proj["cost_percent"] == pytest.approx(0.1)
    assert proj["ci95_percent"] == pytest.approx([-0.02, 0.2])
    assert so.verdict(*proj["ci95_percent"]) == "within the 0.5 % target"
    assert so.verdict(-0.5, 5.0).startswith("undecided")
    assert so.verdict(0.6, 1.0) == "over the 0.5 % target"
