"""`bench nightly` end to end on CPU, as the nightly workflow runs it: real launches of a tiny cell
(tests/check/nightly-cpu.yaml), three nights without a verdict, a baseline promoted from them, a night checked
against it, and a night slowed on purpose (--slow-step, real extra matmuls) that the gate must flag.

On this shared 2-core machine a tiny step's compute varies by tens of percent with the other jobs around,
so the launches run tests/worker_variants/slow_worker.py with a fixed wait in each step (BENCH_STEP_SLEEP_MS): the real
worker otherwise. The slowdown is large (2.0: the step three times as long) so that the wide interval three
noisy CPU nights give cannot hide it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench.check import load_any
from conftest import REPO, TESTS, bench

MATRIX = TESTS / "check" / "nightly-cpu.yaml"
STEADY = {"BENCH_STEP_SLEEP_MS": "100"}  # about 3x a tiny CPU step's compute (35 ms): steady under load


def nightly(root: Path, baselines: Path, *extra: str, worker: str = "slow_worker", env: dict | None = None):
    return bench("nightly", str(MATRIX), "--root", str(root), "--baselines-dir", str(baselines), "--worker", worker,
                 *extra, env={**STEADY, **(env or {})})


def new_night(root: Path, before: set[Path]) -> Path:
    (night,) = set(root.iterdir()) - before  # one fresh folder per invocation
    return night


def assert_measured_by(night: Path, since: float, until: float) -> None:
    """Every record of the night was written by the invocation that made it, and there is one."""
    records = load_any(night)
    assert records and all(since <= r.started_at <= until for r in records)
    assert all(r.status == "ok" for r in records)
    for name in ("check.md", "check.json", "night.json", "report/index.md"):
        assert (night / name).is_file(), name
    for rank in (rank for r in records for rank in r.ranks):  # the matrix's time window reached the worker:
        timing = rank["timing"]  # 6 steady steps (~0.8 s) converge; 12 steps take at least 1.2 s (100 ms waits)
        assert timing["min_timed_s"] == 1.0 and timing["timed_s"] >= 1.0, timing


def run_night(root: Path, baselines: Path, *extra: str, **kwargs):
    before = set(root.iterdir()) if root.exists() else set()
    t0 = time.time()
    proc = nightly(root, baselines, *extra, **kwargs)
    night = new_night(root, before) if root.exists() and set(root.iterdir()) - before else None
    return proc, night, t0, time.time()


@pytest.mark.launch_aside
@pytest.mark.slow
def test_nights_make_a_baseline_and_the_gate_flags_a_slowed_night(tmp_path):
    root, baselines = tmp_path / "nights", tmp_path / "baselines"

    proc, night, *_ = run_night(root, baselines)  # no baseline for this machine yet: refused before launching
    assert proc.returncode == 2 and "--no-verdict" in proc.stderr and "bench baseline promote" in proc.stderr
    assert night is None

    nights = []
    for _ in range(3):
        proc, night, t0, t1 = run_night(root, baselines, "--no-verdict")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert_measured_by(night, t0, t1)
        assert json.loads((night / "check.json").read_text())["verdict"] == "none"
        nights.append(night)
    assert len(set(nights)) == 3

    proc = bench("baseline", "promote", *map(str, nights), "--baselines-dir", str(baselines), check=True)
    assert "3 nights" in proc.stdout

    proc, night, t0, t1 = run_night(root, baselines)  # an ordinary night: a verdict, not a crash
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    assert_measured_by(night, t0, t1)
    check = json.loads((night / "check.json").read_text())
    step = next(f for f in check["findings"] if f["metric"] == "step_time_s")
    assert step["detectable"] >= 0.05 and len(check["baseline_nights"]) == 3
    assert check["injected_slowdown"] is None

    proc, night, t0, t1 = run_night(root, baselines, "--slow-step", "2.0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert_measured_by(night, t0, t1)
    check = json.loads((night / "check.json").read_text())
    step = next(f for f in check["findings"] if f["metric"] == "step_time_s")
    assert step["verdict"] == "regression" and step["change"] > 0.5, step
    floor = next(f for f in check["findings"] if f["metric"] == "step_floor_s")  # every step slower: the floor too
    assert floor["verdict"] == "regression" and floor["change"] > 0.5, floor
    injected = check["injected_slowdown"]
    assert injected["fraction"] == 2.0 and injected["matmul_n"] >= 16 and injected["reached_fraction_min"] >= 2.0
    assert load_any(night)[0].ranks[0]["injected_slowdown"] == injected  # the record names it
    assert "slowed on purpose" in (night / "check.md").read_text()
    # The cell keeps its id: the knob is the launch's environment, not a cell setting.
    assert {r.cell_id for r in load_any(night)} == {r.cell_id for r in load_any(nights[0])}


@pytest.mark.launch_aside
@pytest.mark.slow
def test_a_night_that_measures_nothing_fails(tmp_path):
    root = tmp_path / "nights"
    proc, night, *_ = run_night(root, tmp_path / "none", "--no-verdict", worker="fault_worker",
                                env={"BENCH_FAULT": "oom", "BENCH_FAULT_RANK": "0", "BENCH_FAULT_STEP": "0"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    check = json.loads((night / "check.json").read_text())
    assert check["exit_code"] == 1 and "no launch measured anything" in check["unmeasured"]


@pytest.mark.launch_aside
def test_resume_refuses_records_it_did_not_write(tmp_path):
    """A folder holding records of other hardware and another commit (a committed H200 night) is not resumed."""
    results = tmp_path / "results"
    results.mkdir()
    runs = (REPO / "results" / "nightly-rerun-3" / "runs.jsonl").read_text()
    (results / "runs.jsonl").write_text(runs)
    proc = bench("run", str(MATRIX), "--results", str(results))
    assert proc.returncode == 2
    assert str(results) in proc.stderr and "2x NVIDIA H200" in proc.stderr and "7783878130bd" in proc.stderr
    assert "Fix: run into a fresh folder" in proc.stderr
    assert (results / "runs.jsonl").read_text() == runs and not (results / "cells").exists()
