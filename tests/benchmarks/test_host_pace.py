"""benchmarks/host_pace.py: the spinners really load their CPU, the scans' shapes, the watch file, and the
step-to-pace alignment of --correlate (checked on made-up steps whose pace is known)."""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest

from bench.worker.host_window import busy_share, per_cpu_times
from conftest import REPO

spec = importlib.util.spec_from_file_location("host_pace", REPO / "benchmarks" / "host_pace.py")
hp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hp)

CPUS = sorted(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(CPUS) < 2, reason="needs two usable CPUs")


@pytest.fixture(autouse=True)
def _keep_affinity():
    """The scans pin this process: give the test process its CPUs back."""
    yield
    os.sched_setaffinity(0, CPUS)


@needs_two
def test_a_spinner_keeps_its_cpu_busy():
    before = per_cpu_times()
    with hp.Spinners([CPUS[-1]]):
        time.sleep(0.5)
    assert busy_share(before, per_cpu_times(), [CPUS[-1]]) > 0.6


@needs_two
def test_the_full_run_writes_every_reading_and_a_summary(tmp_path, capsys):
    out = tmp_path / "pace.json"
    assert hp.main(["--out", str(out), "--targets", "all", "--rounds", "2", "--pause-s", "0"]) == 0
    result = json.loads(out.read_text())
    assert sorted(map(int, result["idle"])) == CPUS and all(len(v) == 2 for v in result["idle"].values())
    assert [scan["target"] for scan in result["pairs"]] == CPUS
    assert all(row["other"] != scan["target"] and row["alone_ms"] > 0 for scan in result["pairs"] for row in scan["rows"])
    counts = [row["spinners"] for row in result["load"][str(CPUS[0])]]
    assert counts[0] == 0 and counts[-1] == len(CPUS) - 1 and counts == sorted(set(counts))
    text = capsys.readouterr().out
    assert "suspected siblings" in text and f"{len(CPUS)} usable CPUs" in text


def test_watch_appends_a_line_per_reading(tmp_path):
    out = tmp_path / "watch.jsonl"
    assert hp.watch([CPUS[0]], seconds=0.3, every_s=0.05, out=out) >= 2
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(line["cpu"] == CPUS[0] and line["probe_ms"] > 0 for line in lines)
    assert [line["t"] for line in lines] == sorted(line["t"] for line in lines)


def test_watch_refuses_cpus_it_may_not_use(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        hp.main(["--watch-s", "1", "--watch-cpus", "4096", "--out", str(tmp_path / "w.jsonl")])
    assert exit_.value.code == 2 and "--watch-cpus '4096'" in capsys.readouterr().err


def _steps(times: list[float], start: float = 1000.0) -> list[dict]:
    steps, t = [{"phase": "warmup", "started_at": start - 5, "time_s": 5.0}], start
    for s in times:
        steps.append({"phase": "timed", "started_at": t, "time_s": s})
        t += s
    return steps


def test_correlate_pairs_each_step_with_the_pace_read_during_it(tmp_path):
    times = [1.0, 1.6, 1.2, 2.0, 1.1, 1.8, 1.4]
    runs = tmp_path / "runs.jsonl"
    records = [{"cell_id": "a", "repeat": 1, "label": "zero3 x1", "status": "ok", "ranks": [{"steps": _steps(times)}]},
               {"cell_id": "b", "label": "failed", "status": "failed", "ranks": []}]
    runs.write_text("\n".join(map(json.dumps, records)))
    watch = tmp_path / "watch.jsonl"
    readings, t = [], 1000.0
    for s in times:  # one reading mid-step, its pace following the step's time; the warm-up gets none
        readings.append({"t": t + s / 2, "cpu": 8, "probe_ms": 4.0 * s})
        t += s
    readings.append({"t": t + 50, "cpu": 9, "probe_ms": 1.0})  # after the window: belongs to no step
    watch.write_text("\n".join(map(json.dumps, readings)))
    [row] = hp.correlate(runs, watch)
    assert (row["cell_id"], row["repeat"]) == ("a", 1) and row["steps_with_readings"] == len(times)
    assert row["spearman_rho"] == pytest.approx(1.0)
    assert row["watch_ms_median"] == pytest.approx(4.0 * 1.4)


def test_correlate_leaves_the_statistic_out_below_five_steps(tmp_path):
    runs = tmp_path / "runs.jsonl"
    runs.write_text(json.dumps({"cell_id": "a", "status": "ok", "ranks": [{"steps": _steps([1.0, 2.0])}]}))
    watch = tmp_path / "watch.jsonl"
    watch.write_text(json.dumps({"t": 1000.5, "cpu": 1, "probe_ms": 4.0}))
    [row] = hp.correlate(runs, watch)
    assert row["steps_with_readings"] == 1 and "spearman_rho" not in row
