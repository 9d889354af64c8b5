"""`bench check` and `bench baseline` on real nights: the committed runs of matrices/nightly.yaml (each folder one
night, 3 launches per cell): results/nightly-rerun-3, -4, -5 on 2x H200 and results/nightly, -rerun-1, -rerun-2
on 2x H100. Nothing is launched here; a change is made by scaling a real night's step times, a failure by
turning real launches into failed ones. tests/check/test_nightly.py runs the whole night on CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import t as student_t

from bench.check import BaselineError, hardware_slug, load_any, load_nights, promote
from bench.check.gate import Thresholds, prediction_interval, run_check, scaled
from bench.records import RunRecord
from bench.spec import expand, load_matrix
from bench.strategies import check_runnable
from conftest import REPO, bench

RESULTS = REPO / "results"
H200 = [RESULTS / f"nightly-rerun-{i}" for i in (3, 4, 5)]
H100 = [RESULTS / "nightly", RESULTS / "nightly-rerun-1", RESULTS / "nightly-rerun-2"]


def failed(record: RunRecord, status: str = "crash") -> RunRecord:
    return RunRecord.model_validate({**record.model_dump(), "status": status, "ranks": []})


def timing(result, metric: str = "step_time_s") -> dict[str, object]:
    return {f.label: f for f in result.findings if f.metric == metric}


@pytest.fixture(scope="module")
def h200():
    return load_nights(H200)


def test_each_night_against_the_others_raises_nothing():
    """Leave one out on both machines (2-night baselines: min_nights lowered, as the re-analysis does).
    results/nightly-rerun-2 (H100) did not run the ZeRO-3 cell: against the others that cell is missing."""
    for folders in (H200, H100):
        for night in folders:
            others = [f for f in folders if f != night]
            result = run_check(load_any(night), load_nights(others), Thresholds(min_nights=2))
            flagged = [(f.label, f.verdict) for f in result.findings
                       if f.verdict in ("regression", "improvement", "missing")]
            expected = [("llama-3.2-1b lora zero3 x2gpu", "missing")] if night.name == "nightly-rerun-2" else []
            assert flagged == expected
            assert all(f.interval[0] < f.current < f.interval[1] for f in result.findings if f.interval)


def test_a_night_inside_the_baseline_raises_nothing_and_a_shifted_one_is_flagged(h200):
    tonight = load_any(H200[1])
    clean = run_check(tonight, h200)
    assert clean.exit_code == 0 and not clean.by_verdict("regression") and not clean.by_verdict("improvement")
    detectable = {label: f.detectable for label, f in timing(clean).items()}
    assert len(detectable) == 4
    # Past every cell's detectable change: every timed cell is flagged on step time and on real-token throughput.
    slow = run_check(scaled(tonight, 1 + 1.5 * max(detectable.values())), h200)
    assert slow.exit_code == 1
    assert {f.verdict for f in timing(slow).values()} == {"regression"}
    assert {f.verdict for f in timing(slow, "real_tokens_per_s").values()} == {"regression"}
    # Faster: improvements, exit 0.
    fast = run_check(scaled(tonight, 0.4), h200)
    assert fast.exit_code == 0 and {f.verdict for f in timing(fast).values()} == {"improvement"}


def test_a_change_inside_the_interval_is_not_flagged_even_past_the_threshold(h200):
    """The ddp LoRA cell's launches wander 10-20 % (10 timed steps each): a 20 % slowdown of a night stays
    inside its interval, past the 5 % threshold, and the gate says the threshold is nominal there."""
    tonight = scaled(load_any(H200[1]), 1.20)
    ddp = timing(run_check(tonight, h200))["llama-3.2-1b lora ddp x2gpu"]
    assert ddp.change > 0.10 and ddp.verdict == "unchanged" and ddp.detectable > ddp.change
    assert "nominal" in ddp.why


def test_detectable_change_is_the_interval_half_width_or_the_threshold():
    """The formula of bench/check/gate.py's docstring, by hand, on three nights of two launches each."""
    nights = [[np.log(0.100), np.log(0.102)], [np.log(0.104), np.log(0.106)], [np.log(0.099), np.log(0.101)]]
    y = np.array([np.median(x) for x in nights])
    s_b2 = y.var(ddof=1)
    s_w2 = sum(((np.array(x) - np.mean(x)) ** 2).sum() for x in nights) / (6 - 3)
    variance = max(0.0, s_b2 - s_w2 / 2) + s_w2 / 2 + s_b2 / 3
    expected = student_t.ppf(0.975, 2) * np.sqrt(variance)
    interval = prediction_interval(nights, 2, alpha=0.05)
    assert interval.half_width == pytest.approx(expected)
    assert interval.centre == pytest.approx(y.mean())
    assert interval.detectable == pytest.approx(np.expm1(expected))
    # Fewer launches tonight: a wider interval (its own launch noise is larger).
    assert prediction_interval(nights, 1, alpha=0.05).half_width > interval.half_width


def test_detectable_change_is_printed_per_cell_and_marked_nominal(h200):
    from bench.check import to_json, to_markdown

    result = run_check(load_any(H200[2]), h200)
    text = to_markdown(result)
    assert "Smallest detectable step-time change per cell" in text
    for f in timing(result).values():
        assert f.detectable >= 0.05 and f"{f.detectable:.1%}" in text
    assert "(nominal)" in text  # on these 10-step nights every cell wanders more than 5 %
    findings = to_json(result)["findings"]
    assert all(f["detectable"] is not None for f in findings if f["metric"] == "step_time_s")


def test_failure_fractions_are_compared(h200):
    base = list(h200)
    ddp = "llama-3.2-1b lora ddp x2gpu"
    first = next(i for i, r in enumerate(base) if r.label == ddp)
    base[first] = failed(base[first])  # the ddp cell crashed once in 9 baseline launches
    tonight = load_any(H200[1])
    all_crash = [failed(r) if r.label == ddp else r for r in tonight]
    status = timing(run_check(all_crash, base), "status")[ddp]
    assert status.verdict == "regression" and status.baseline == "ok 8/9, crash 1/9" and status.current == "ok 0/3, crash 3/3"
    one_crash = [failed(r) if r.label == ddp and r.repeat == 0 else r for r in tonight]
    assert timing(run_check(one_crash, base), "status")[ddp].verdict == "regression"  # 1/3 > 1/9
    assert timing(run_check(tonight, base), "status")[ddp].verdict == "improvement"
    # Launches that measured nothing (busy GPUs) are neither failures nor successes: the cell is missing.
    busy = [failed(r, "busy") if r.label == ddp else r for r in tonight]
    result = run_check(busy, h200)
    assert timing(result, "status")[ddp].verdict == "missing" and result.exit_code == 1


def test_memory_stays_a_threshold_rule(h200):
    def grown(factor: float) -> list[RunRecord]:
        raw = [r.model_dump() for r in load_any(H200[1])]
        for r in raw:
            for rank in r["ranks"]:
                rank["torch_peak_reserved_bytes"] = int(rank["torch_peak_reserved_bytes"] * factor)
        return [RunRecord.model_validate(r) for r in raw]

    result = run_check(grown(1.10), h200)  # 2-6 GiB more: past 3 % and 256 MiB
    assert {f.verdict for f in timing(result, "peak_memory_bytes").values()} == {"regression"}
    assert result.exit_code == 1
    result = run_check(grown(1.02), h200)  # past 256 MiB, within 3 %
    assert {f.verdict for f in timing(result, "peak_memory_bytes").values()} == {"unchanged"}


def test_fewer_than_three_baseline_nights_is_exit_2(tmp_path):
    proc = bench("check", str(H200[2]), "--baseline", str(H200[0]), "--baseline", str(H200[1]))
    assert proc.returncode == 2
    assert "2 night(s)" in proc.stderr and "at least 3" in proc.stderr and "bench baseline promote" in proc.stderr
    proc = bench("baseline", "promote", *map(str, H200[:2]), "--baselines-dir", str(tmp_path))
    assert proc.returncode == 2 and "at least 3" in proc.stderr and not list(tmp_path.iterdir())


def test_promote_keeps_each_nights_identity_and_auto_finds_it(tmp_path):
    proc = bench("baseline", "promote", *map(str, H200), "--baselines-dir", str(tmp_path), check=True)
    path = tmp_path / f"{hardware_slug('2x NVIDIA H200')}.jsonl"
    assert path.is_file() and "3 nights" in proc.stdout
    records = load_any(path)
    assert {r.night for r in records} == {"nightly-rerun-3", "nightly-rerun-4", "nightly-rerun-5"}
    for cell in {r.cell_id for r in records}:  # 3 launches a night, renumbered: every launch its own
        assert sorted(r.repeat for r in records if r.cell_id == cell) == list(range(9))
    out = tmp_path / "check.json"
    proc = bench("check", str(H200[0]), "--baseline", "auto", "--baselines-dir", str(tmp_path), "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["baseline"] == str(path) and len(report["baseline_nights"]) == 3


def test_a_slowed_night_cannot_be_promoted(tmp_path):
    night = tmp_path / "slowed"
    night.mkdir()
    raw = [r.model_dump() for r in load_any(H200[0])]
    for r in raw:
        r["ranks"][0]["injected_slowdown"] = {"fraction": 0.1}
    (night / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw))
    with pytest.raises(BaselineError, match="slowed on purpose"):
        promote([night, H200[1], H200[2]], tmp_path)


def test_auto_without_a_baseline_says_how_to_make_one(tmp_path):
    proc = bench("check", str(H200[0]), "--baseline", "auto", "--baselines-dir", str(tmp_path / "none"))
    assert proc.returncode == 2 and "bench baseline promote" in proc.stderr


def test_hardware_mismatch_is_refused():
    proc = bench("check", str(H200[0]), *[a for f in H100 for a in ("--baseline", str(f))])
    assert proc.returncode == 2
    assert "hardware mismatch" in proc.stderr and "2x NVIDIA H100 80GB HBM3" in proc.stderr
    assert "REGRESSION" not in proc.stdout


def test_threshold_is_configurable_and_checked(h200):
    from bench.check import parse_thresholds

    t = parse_thresholds(["step_time=40", "memory=5"], alpha=0.01)
    assert t.step_time == pytest.approx(0.40) and t.memory == pytest.approx(0.05) and t.alpha == 0.01
    with pytest.raises(BaselineError, match="step_time"):
        parse_thresholds(["speed=5"])
    # A threshold past the change keeps a shifted night quiet.
    slow = scaled(load_any(H200[1]), 3.0)
    assert run_check(slow, h200, parse_thresholds(["step_time=300", "tokens_per_s=300"])).exit_code == 0


def test_nightly_matrix_covers_strategies_and_adapters():
    matrix = load_matrix(REPO / "matrices" / "nightly.yaml")
    cells = expand(matrix, source="nightly.yaml")
    assert {c.device for c in cells} == {"cuda"} and {c.gpus for c in cells} == {2}
    pairs = {(c.strategy, c.adapter.type) for c in cells}
    assert pairs == {("ddp", "lora"), ("fsdp_full_shard", "none"), ("zero2", "none"), ("zero3", "none")}
    # 16k tokens a rank: a 4k-token 1B step was host-bound and did not repeat (matrices/nightly.yaml's header).
    assert all(c.train.seq_len * c.train.micro_batch >= 16384 for c in cells)
    assert len({c.cell_id for c in cells}) == 4
    assert all(c.adapter.r == 16 for c in cells if c.adapter.type == "lora")
    assert all(c.train.steps >= 20 for c in cells) and matrix.repeats >= 2
    assert not [msg for c in cells if (msg := check_runnable(c, visible_gpus=2))]


def test_nightly_zero3_times_a_fixed_window_and_only_it_leaves_the_h200_nights(tmp_path):
    """ZeRO-3's steps come in episodes (results/baselines/README.md): it times a fixed 60 s window, which makes
    it a new cell; the three others keep the ids of the committed H200 nights. A baseline of those nights holds
    a ZeRO-3 cell the matrix no longer runs: `bench nightly` leaves it out of the comparison (named in check.md)
    and gates the three others."""
    from bench.check.nightly import NightOptions, load_baseline

    cells = expand(load_matrix(REPO / "matrices" / "nightly.yaml"), source="nightly.yaml")
    windows = {c.strategy: (c.train.timing.min_timed_s, c.train.timing.max_timed_s) for c in cells}
    assert windows == {"ddp": (0, 30), "zero2": (0, 30), "fsdp_full_shard": (0, 30), "zero3": (60, 60)}
    folders = sorted((RESULTS / "nightly-h200").glob("2026-11-30-997c560*"))
    nights = {r.cell_id: r.label for r in load_nights(folders)}
    assert {c.cell_id for c in cells} - set(nights) == {c.cell_id for c in cells if c.strategy == "zero3"}
    (old_zero3,) = [cell_id for cell_id, label in nights.items() if "zero3" in label]
    promote(folders, tmp_path)
    _, kept, retired = load_baseline("2x NVIDIA H200", {c.cell_id for c in cells}, NightOptions(baselines_dir=tmp_path))
    assert retired == [f"llama-3.2-1b full zero3 x2gpu [{old_zero3}]"]
    assert {r.cell_id for r in kept} == {c.cell_id for c in cells if c.strategy != "zero3"}


def test_workflows_run_the_nightly_with_least_privilege():
    import yaml

    nightly_text = (REPO / ".github" / "workflows" / "nightly-gpu.yml").read_text()
    tests = (REPO / ".github" / "workflows" / "tests.yml").read_text()
    nightly = yaml.safe_load(nightly_text)
    triggers = nightly.get("on", nightly.get(True))  # YAML 1.1 reads the key `on` as True
    assert set(triggers) == {"schedule", "workflow_dispatch"}
    assert nightly["permissions"] == {"contents": "read"}
    assert "self-hosted" in nightly["jobs"]["nightly"]["runs-on"]
    commands = [line.strip() for line in nightly_text.splitlines() if line.strip().startswith("bench ")]
    assert commands == ['bench nightly matrices/nightly.yaml --root "$RUNNER_TEMP/nightly"']
    assert "upload-artifact" in nightly_text and "GITHUB_STEP_SUMMARY" in nightly_text
    assert "pytest -q" in tests and "-e '.[test]'" in tests and "python -m venv" in tests
    assert "://" not in nightly_text + tests.replace("https://github.com", "")
