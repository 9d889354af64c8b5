"""`bench check` and `bench baseline` on records of real CPU runs, made by the tests through the real CLI.

Three streams of the same cell run interleaved, 3 repeats each: ``base`` and ``same`` (identical) and
``slow`` (every step 10% slower, 400 MiB more host memory). On this shared 2-core machine the real
compute of a step varies up to 2x between runs with other jobs around, so these streams use
tests/slow_worker.py with a fixed wait in each step (BENCH_STEP_SLEEP_MS): their steps are as stable
from run to run as a GPU's, and a 10% change can be told from noise. The false-alarm count on the
unpadded real worker is measured by test_false_alarm_count (opt-in: BENCH_FALSE_ALARM_RERUNS=5).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bench.baseline import hardware_slug, load_any
from bench.matrix import check_runnable, expand, load_matrix
from conftest import REPO, bench, write_matrix

STEADY = {"BENCH_STEP_SLEEP_MS": "300"}
STREAMS = {
    "base": STEADY,
    "same": STEADY,
    "slow": {**STEADY, "BENCH_SLOWDOWN": "0.10", "BENCH_EXTRA_RSS_MIB": "400"},
}
REPEATS = 3
CELL = {"train": {"seq_len": 16, "micro_batch": 1, "warmup_steps": 2, "steps": 10,
                  "timing": {"max_steps": 10, "max_timed_s": 30}},
        "grid": {"strategy": ["ddp"], "gpus": [1]}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """results folders base/, same/, slow/ of one cell; repeat r of each stream runs before repeat r+1 of any."""
    folder = tmp_path_factory.mktemp("check")
    matrix = write_matrix(folder, "steady", **CELL)
    for r in range(1, REPEATS + 1):
        order = list(STREAMS) if r % 2 else list(reversed(STREAMS))  # no stream always runs first
        for name in order:
            # --repeats r resumes the folder: only repeat r-1 is launched now.
            bench("run", str(matrix), "--results", str(folder / name), "--repeats", str(r),
                  "--worker", "slow_worker", env=STREAMS[name], check=True)
    return folder


def check(runs: Path, current: str, baseline: str, *extra: str):
    out = runs / f"{current}-vs-{Path(baseline).stem}.json"
    proc = bench("check", str(runs / current), "--baseline", baseline, "--json", str(out), *extra)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def verdicts(report: dict, metric: str) -> list[str]:
    return [f["verdict"] for f in report["findings"] if f["metric"] == metric]


def test_repeats_are_kept_as_separate_runs(runs):
    records = load_any(runs / "base")
    assert sorted(r.repeat for r in records) == list(range(REPEATS))
    assert all(r.status == "ok" for r in records)
    assert len({r.cell_dir for r in records}) == REPEATS  # fresh processes, own folders
    assert len({r.ranks[0]["process_start_to_report_s"] for r in records}) == REPEATS


def test_identical_reruns_raise_no_alarm(runs):
    proc, report = check(runs, "same", str(runs / "base"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["counts"].get("regression", 0) == 0 and report["counts"].get("improvement", 0) == 0
    timing = [f for f in report["findings"] if f["metric"] == "step_time_s"]
    assert timing and timing[0]["runs"] == "3 vs 3" and timing[0]["p_runs"] is not None
    assert "no regression" in proc.stdout


def test_injected_slowdown_and_memory_growth_are_caught(runs):
    proc, report = check(runs, "slow", str(runs / "base"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    step = next(f for f in report["findings"] if f["metric"] == "step_time_s")
    assert step["verdict"] == "regression", step
    assert 0.05 < step["change"] < 0.25  # the injected 10%, measured
    assert step["p_value"] < 0.01 and step["p_runs"] < 0.05
    assert verdicts(report, "tokens_per_s") == ["regression"]
    memory = next(f for f in report["findings"] if f["metric"] == "peak_memory_bytes")
    assert memory["verdict"] == "regression"
    assert 300 * 2**20 < memory["current"] - memory["baseline"] < 500 * 2**20  # the 400 MiB ballast
    assert "REGRESSION" in proc.stdout and "### Regressions" in proc.stdout


def test_improvements_are_listed_and_do_not_fail(runs):
    proc, report = check(runs, "base", str(runs / "slow"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert verdicts(report, "step_time_s") == ["improvement"]
    assert verdicts(report, "peak_memory_bytes") == ["improvement"]
    assert "### Improvements (3)" in proc.stdout


def test_one_run_per_side_is_never_flagged_on_timing(runs):
    """Without repeats run-to-run noise is unknown: the 10% slowdown is reported but not flagged."""
    from bench.check import run_check

    base = [r for r in load_any(runs / "base") if r.repeat == 0]
    slow = [r for r in load_any(runs / "slow") if r.repeat == 0]
    result = run_check(slow, base)
    step = next(f for f in result.findings if f.metric == "step_time_s")
    assert step.verdict == "unchanged" and step.change > 0.05 and "one run" in step.why
    assert step.p_runs is None


def test_threshold_is_configurable_per_metric(runs):
    proc, report = check(runs, "slow", str(runs / "base"), "--threshold", "step_time=40",
                         "--threshold", "tokens_per_s=40", "--threshold", "memory=500")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["thresholds"]["step_time"] == pytest.approx(0.40)
    bad = bench("check", str(runs / "slow"), "--baseline", str(runs / "base"), "--threshold", "speed=5")
    assert bad.returncode == 2 and "step_time" in bad.stderr


def test_ok_to_oom_is_flagged(runs):
    """A real out-of-memory error raised inside a training step by tests/fault_worker.py."""
    matrix = write_matrix(runs, "steady", **CELL)  # the same cell, so the same id
    oom = runs / "oom"
    bench("run", str(matrix), "--results", str(oom), "--worker", "fault_worker",
          env={"BENCH_FAULT": "oom", "BENCH_FAULT_RANK": "0", "BENCH_FAULT_STEP": "0"}, check=True)
    assert [r.status for r in load_any(oom)] == ["oom"]
    proc, report = check(runs, "oom", str(runs / "base"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status = next(f for f in report["findings"] if f["metric"] == "status")
    assert status["verdict"] == "regression" and "oom" in status["why"]
    assert status["baseline"] == "ok 3/3" and status["current"] == "oom 1/1"


def test_promote_then_auto_picks_the_file_for_this_hardware(runs, tmp_path):
    proc = bench("baseline", "promote", str(runs / "base"), "--baselines-dir", str(tmp_path), check=True)
    hardware = load_any(runs / "base")[0].env["hardware"]
    path = tmp_path / f"{hardware_slug(hardware)}.jsonl"
    assert path.is_file() and str(path) in proc.stdout
    assert len(load_any(path)) == REPEATS
    proc, report = check(runs, "same", "auto", "--baselines-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["baseline"] == str(path)


def test_auto_without_a_baseline_says_how_to_make_one(runs, tmp_path):
    proc = bench("check", str(runs / "same"), "--baseline", "auto", "--baselines-dir", str(tmp_path / "none"))
    assert proc.returncode == 2
    assert "bench baseline promote" in proc.stderr


def test_hardware_mismatch_is_refused(runs, tmp_path):
    """A baseline from other hardware (its fingerprint edited here) is refused, never compared."""
    lines = (runs / "base" / "runs.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for r in records:
        r["env"]["hardware"] = "2x NVIDIA H100 80GB HBM3"
    other = tmp_path / "2x-nvidia-h100-80gb-hbm3.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc, report = check(runs, "slow", str(other))
    assert proc.returncode == 2 and report is None
    assert "hardware mismatch" in proc.stderr and "2x NVIDIA H100 80GB HBM3" in proc.stderr
    assert "REGRESSION" not in proc.stdout


def test_nightly_matrix_covers_strategies_and_adapters():
    matrix = load_matrix(REPO / "matrices" / "nightly.yaml")
    cells = expand(matrix, source="nightly.yaml")
    assert {c.device for c in cells} == {"cuda"} and {c.gpus for c in cells} == {2}
    pairs = {(c.strategy, c.adapter.type) for c in cells}
    assert pairs == {("ddp", "lora"), ("fsdp_full_shard", "none"), ("zero2", "none"), ("zero3", "lora")}
    assert len({c.cell_id for c in cells}) == 4
    assert all(c.adapter.r == 16 for c in cells if c.adapter.type == "lora")
    assert not [msg for c in cells if (msg := check_runnable(c, visible_gpus=2))]


def test_workflows_run_the_check_and_the_tests():
    import yaml

    nightly = (REPO / ".github" / "workflows" / "nightly-gpu.yml").read_text()
    tests = (REPO / ".github" / "workflows" / "tests.yml").read_text()
    assert yaml.safe_load(nightly)["jobs"] and yaml.safe_load(tests)["jobs"]
    assert "self-hosted" in nightly and "--repeats 3" in nightly and "--baseline auto" in nightly
    assert "GITHUB_STEP_SUMMARY" in nightly and "upload-artifact" in nightly
    assert "pytest -q" in tests and "-e '.[test]'" in tests and "python -m venv" in tests
    assert "://" not in nightly + tests.replace("https://github.com", "")


@pytest.mark.skipif(not os.environ.get("BENCH_FALSE_ALARM_RERUNS"),
                    reason="measurement, minutes long: set BENCH_FALSE_ALARM_RERUNS=5")
def test_false_alarm_count(tmp_path):
    """Identical reruns of the real, unpadded worker, each checked against the first: count the alarms."""
    reruns = int(os.environ["BENCH_FALSE_ALARM_RERUNS"])
    matrix = write_matrix(tmp_path, "noise", train={"seq_len": 64, "micro_batch": 2, "warmup_steps": 3, "steps": 40,
                                                    "timing": {"max_steps": 40, "max_timed_s": 30}},
                          grid={"strategy": ["ddp"], "gpus": [1]})
    folders = [tmp_path / f"run{i}" for i in range(reruns + 1)]
    for folder in folders:
        bench("run", str(matrix), "--results", str(folder), "--repeats", str(REPEATS), check=True)
    alarms, lines = 0, []
    for folder in folders[1:]:
        proc = bench("check", str(folder), "--baseline", str(folders[0]), "--json", str(folder / "check.json"))
        report = json.loads((folder / "check.json").read_text())
        flagged = [f for f in report["findings"] if f["verdict"] in ("regression", "improvement")]
        alarms += bool(flagged)
        step = next(f for f in report["findings"] if f["metric"] == "step_time_s")
        lines.append(f"{folder.name}: exit {proc.returncode}, step time {step['change']:+.1%}, "
                     f"p steps {step['p_value']:.2g}, p runs {step['p_runs']:.2g}, {step['why']}")
    print(f"\nfalse alarms: {alarms} of {reruns} identical reruns (3 repeats each)\n" + "\n".join(lines))
    if keep := os.environ.get("BENCH_FALSE_ALARM_KEEP"):  # a folder to keep the records in, for a look later
        shutil.copytree(tmp_path, keep, dirs_exist_ok=True)
    assert alarms == 0


def test_promote_pools_several_trusted_runs_each_a_run_of_its_own(runs, tmp_path):
    """Two trusted runs (base and same) make one baseline of 2 x REPEATS runs with distinct repeat numbers."""
    proc = bench("baseline", "promote", str(runs / "base"), str(runs / "same"), "--baselines-dir", str(tmp_path),
                 check=True)
    path = next(tmp_path.glob("*.jsonl"))
    pooled = load_any(path)
    assert sorted(r.repeat for r in pooled) == list(range(2 * REPEATS))
    started = {r.started_at for r in load_any(runs / "base")} | {r.started_at for r in load_any(runs / "same")}
    assert {r.started_at for r in pooled} == started  # every run kept, none replaced by another
    assert f"{2 * REPEATS} runs" in proc.stdout
    proc, report = check(runs, "same", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["findings"][0]["runs"] == f"{2 * REPEATS} vs {REPEATS}"  # baseline vs current
