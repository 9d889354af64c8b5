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
    independent = replace(RULE, serial=False)
    window = replace(RULE, min_timed_s=30.0)
    plain = [ng.resampled_launch(series, independent, 25, rng) for _ in range(150)]
    fixed = [ng.resampled_launch(series, window, 25, rng) for _ in range(150)]
    assert np.mean([launch.early for launch in plain]) > 0.05  # 20 steps of one fast run look converged
    assert not any(launch.early for launch in fixed)
    assert np.std(np.log([launch.median for launch in fixed])) < np.std(np.log([launch.median for launch in plain]))


def test_the_serial_interval_stops_less_often_on_steps_that_span_episodes():
    """Runs of 25 fast then 30 slow steps, resampled in blocks of 10: taken as independent, 20 steps of which 15
    or more are fast stop converged on the fast median; the serial interval sees the runs in most such launches.
    (Those it still stops early are mostly fast with a short slow run: the median's indicator barely moves.)"""
    series = [episodic(s) for s in range(3)]
    rules = ng.replay_rules(RULE, 30.0)
    rngs = {name: np.random.default_rng(5) for name in rules}  # each rule from the same seed
    runs = {name: [ng.resampled_launch(series, rule, 10, rngs[name], "step") for _ in range(200)]
            for name, rule in rules.items()}

    def spans(launch) -> bool:  # fast and slow steps both among the launch's steps
        return min(launch.times) < 0.39 < max(launch.times)

    early = {name: [launch for launch in r if launch.early] for name, r in runs.items()}
    assert sum(map(spans, early["independent"])) > 40  # stopped converged across a change of episode
    assert sum(map(spans, early["serial"])) < sum(map(spans, early["independent"])) / 1.8
    assert len(early["serial"]) < len(early["independent"]) and not early["window"]
    assert np.mean([len(x.times) for x in runs["serial"]]) > np.mean([len(x.times) for x in runs["independent"]])


def test_draw_by_step_weighs_every_recorded_block_alike():
    short, long = np.full(20, 1.0), np.full(200, 2.0)
    assert len(ng.block_starts([short, long], 10)) == 11 + 191
    rng = np.random.default_rng(0)
    rule = replace(RULE, min_steps=10, max_steps=10)
    by_step = [ng.resampled_launch([short, long], rule, 10, rng, "step").median for _ in range(400)]
    by_launch = [ng.resampled_launch([short, long], rule, 10, rng, "launch").median for _ in range(400)]
    assert np.mean(np.equal(by_step, 1.0)) < 0.1 < 0.4 < np.mean(np.equal(by_launch, 1.0))
    mixed = replace(RULE, min_steps=40, max_steps=40)  # 4 blocks: from one launch each time under "within"
    within = [ng.resampled_launch([short, long], mixed, 10, rng, "within").times for _ in range(50)]
    assert all(len(set(t)) == 1 for t in within) and len({t[0] for t in within}) == 2


def test_replay_on_the_committed_zero3_nights():
    folders = sorted((REPO / "results" / "nightly-h200").glob("2026-11-30-997c560*"))
    out = ng.replay_window(folders, 60.0, 10, 40, np.random.default_rng(1))
    (rows,) = [rows for label, rows in out.values() if "zero3" in label]
    assert rows["window"]["early"] == 0 and 0 < rows["window"]["sd"] < rows["independent"]["sd"] < 0.05
    assert rows["window"]["fooled"] == 0 and 0 <= rows["serial"]["fooled"] <= rows["serial"]["early"] <= 1
    # the recorded series as they were: the independent rule stops the fifth night's at its 20th step, as it did
    assert ((20, "converged"), 20) in rows["independent"]["recorded"]
    assert [stop for stop, _ in rows["window"]["recorded"]] == [None] * 5  # no night timed 60 s
    # the other cells' recorded series: the rule they ran stopped each converged within 20-28 steps, as recorded
    others = [rows for label, rows in out.values() if "zero3" not in label]
    assert len(others) == 3
    assert all(stop[1] == "converged" and 20 <= stop[0] <= 28 for r in others for stop, _ in r["independent"]["recorded"])
