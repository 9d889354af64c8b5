"""benchmarks/nightly_gate.py --window: the stopping rule replayed on launches resampled from recorded steps.

Checked on made-up episodic steps (runs of fast steps, then runs of slow ones, as ZeRO-3's on 2x H200) and on
the committed H200 nights' ZeRO-3 records; nothing is launched.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import numpy as np

from bench.worker.timing import StoppingRule
from conftest import REPO

spec = importlib.util.spec_from_file_location("nightly_gate", REPO / "benchmarks" / "nightly_gate.py")
ng = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ng)

RULE = StoppingRule(ci_target=0.01, confidence=0.95, min_steps=20, max_steps=300, max_timed_s=30.0)


def episodic(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    runs = [0.365 * (1 + 0.004 * rng.standard_normal(25)), 0.43 * (1 + 0.04 * rng.standard_normal(30))] * 4
    return np.concatenate(runs)


def test_a_fixed_window_never_stops_inside_a_fast_episode_and_spreads_less():
    series, rng = [episodic(s) for s in range(3)], np.random.default_rng(0)
    window = replace(RULE, min_timed_s=30.0)
    plain = [ng.resampled_launch(series, RULE, 25, rng) for _ in range(150)]
    fixed = [ng.resampled_launch(series, window, 25, rng) for _ in range(150)]
    assert np.mean([early for _, early in plain]) > 0.05  # 20 steps of one fast run look converged
    assert not any(early for _, early in fixed)
    assert np.std(np.log([m for m, _ in fixed])) < np.std(np.log([m for m, _ in plain]))


def test_replay_on_the_committed_zero3_nights():
    folders = sorted((REPO / "results" / "nightly-h200").glob("2026-11-30-997c560*"))
    out = ng.replay_window(folders, 60.0, 10, 40, np.random.default_rng(1))
    (rows,) = [rows for label, rows in out.values() if "zero3" in label]
    assert rows["window"][0] == 0 and 0 < rows["window"][1] < rows["recorded"][1] < 0.05
