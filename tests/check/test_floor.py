"""The gate's second step-time figure, the floor (``step_floor_s``: each launch's fastest timed step), on the
committed nights of the current nightly matrix (results/nightly-h200-w60, 2x H200, one launch a cell) and their
slowed night. ZeRO-3's steps there come in episodes of fast and slow steps whose mix wanders between nights; a
change is made by rewriting a real launch's timed steps (their values and their mix), as the other gate tests
scale real nights. Nothing is launched.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.check import load_any, load_nights, to_json, to_markdown
from bench.check.gate import Thresholds, run_check
from bench.records import RunRecord
from bench.report.metrics import timed_step_times
from conftest import REPO

W60 = sorted((REPO / "results" / "nightly-h200-w60").glob("2026-11-30-213e3ff*"))
SLOWED = REPO / "results" / "nightly-h200-w60-slowed" / "2026-11-30-213e3ff"
ZERO3 = "llama-3.2-1b full zero3 x2gpu"


@pytest.fixture(scope="module")
def w60() -> list[RunRecord]:
    assert len(W60) == 5
    return load_nights(W60)


def findings(result, metric: str) -> dict:
    return {f.label: f for f in result.findings if f.metric == metric}


def with_timed_steps(record: RunRecord, times: list[float]) -> RunRecord:
    """``record`` as if every rank's timed steps had taken ``times`` (the slowest rank per step is then
    ``times``); its other steps and fields kept."""
    raw = record.model_dump()
    for rank in raw["ranks"]:
        timed = [s for s in rank["steps"] if s["phase"] == "timed"]
        rank["steps"] = [s for s in rank["steps"] if s["phase"] != "timed"] + \
            [{**timed[i % len(timed)], "time_s": t} for i, t in enumerate(times)]
    return RunRecord.model_validate(raw)


def night_with_zero3(times_of) -> list[RunRecord]:
    """The first w60 night with its ZeRO-3 launch's timed steps replaced by ``times_of(recorded steps)``."""
    return [with_timed_steps(r, times_of(timed_step_times(r))) if r.label == ZERO3 else r for r in load_any(W60[0])]


def test_the_committed_slowed_night_is_caught_on_zero3_by_the_floor_alone(w60):
    result = run_check(load_any(SLOWED), w60)
    median, floor = findings(result, "step_time_s"), findings(result, "step_floor_s")
    assert result.exit_code == 1 and len(floor) == 4
    assert {f.verdict for f in floor.values()} == {"regression"}
    assert all(0.08 < f.change < 0.12 for f in floor.values())
    # The mix of fast and slow episodes hid the +10 % from ZeRO-3's median; the three others move on both.
    assert median[ZERO3].verdict == "unchanged" and abs(median[ZERO3].change) < 0.05
    assert {f.verdict for label, f in median.items() if label != ZERO3} == {"regression"}


def test_every_step_slower_with_more_fast_steps_is_flagged_on_the_floor(w60):
    """Every step +10 %, and the night's mix shifted to its fastest steps until the median sits at the
    baseline's: the median sees nothing, the floor sees +10 %."""
    centre = findings(run_check(load_any(W60[0]), w60), "step_time_s")[ZERO3].baseline
    recorded = timed_step_times(next(r for r in load_any(W60[0]) if r.label == ZERO3))
    fastest = sorted(recorded)
    keep = max(k for k in range(3, len(fastest) + 1) if np.median(fastest[:k]) * 1.10 <= centre * 1.02)
    assert keep >= len(recorded) // 4  # a mix of many steps, not the floor alone
    cut = fastest[keep - 1]
    tonight = night_with_zero3(lambda times: [t * 1.10 for t in times if t <= cut])  # recorded order kept
    result = run_check(tonight, w60)
    median, floor = findings(result, "step_time_s")[ZERO3], findings(result, "step_floor_s")[ZERO3]
    assert median.verdict == "unchanged" and abs(median.change) < 0.05
    assert floor.verdict == "regression" and floor.change == pytest.approx(0.10, abs=0.02)
    assert result.exit_code == 1
    assert findings(result, "real_tokens_per_s")[ZERO3].verdict == "unchanged"  # throughput reads the median


@pytest.mark.parametrize("mix", ["slow", "fast"])
def test_a_wandering_mix_over_the_same_floor_raises_no_floor_alarm(w60, mix):
    """The night's fastest step kept, and its other steps only its slow half (median up) or only its fast half
    (median down): the median moves with the mix, the floor does not."""
    def remix(times: list[float]) -> list[float]:
        mid, floor = float(np.median(times)), min(times)
        kept = [t for t in times if (t >= mid if mix == "slow" else t <= mid)]
        return [floor] + kept

    result = run_check(night_with_zero3(remix), w60)
    median, floor = findings(result, "step_time_s")[ZERO3], findings(result, "step_floor_s")[ZERO3]
    assert abs(median.change) > 0.02  # the mix did move the median
    assert floor.verdict == "unchanged" and abs(floor.change) < 0.02


def test_each_w60_night_against_the_others_raises_no_floor_alarm():
    for night in W60:
        others = [f for f in W60 if f != night]
        result = run_check(load_any(night), load_nights(others), Thresholds(min_nights=4))
        floor = findings(result, "step_floor_s")
        assert len(floor) == 4 and {f.verdict for f in floor.values()} == {"unchanged"}, night.name


def test_records_without_per_step_times_load_and_are_left_out_of_timing(w60):
    """A record whose rank reports hold no ``steps`` (none is committed, but a report may come without)."""
    def stripped(records: list[RunRecord]) -> list[RunRecord]:
        out = []
        for r in records:
            raw = r.model_dump()
            for rank in raw["ranks"]:
                rank.pop("steps", None)
            out.append(RunRecord.model_validate(raw))
        return out

    result = run_check(stripped(load_any(W60[0])), w60)
    assert not [f for f in result.findings if f.metric in ("step_time_s", "step_floor_s", "real_tokens_per_s")]
    assert result.exit_code == 0
    assert "Smallest detectable" not in to_markdown(result)
    # Without steps on the baseline's side (an old baseline), tonight is not judged on timing either.
    old = run_check(load_any(W60[0]), stripped(w60))
    assert not [f for f in old.findings if f.metric == "step_floor_s"]
    assert to_json(old)["exit_code"] == 0


def test_the_markdown_shows_both_detectable_changes_and_the_floor_in_ms(w60):
    result = run_check(load_any(SLOWED), w60)
    text = to_markdown(result)
    assert "| detectable (median) | detectable (floor) | uniform slowdown detectable |" in text
    median, floor = findings(result, "step_time_s"), findings(result, "step_floor_s")
    for label, m in median.items():
        f = floor[label]
        nominal = " (nominal)" if m.detectable > 0.05 else ""
        row = f"| {m.detectable:.1%}{nominal} | {f.detectable:.1%} | {min(m.detectable, f.detectable):.1%} |"
        assert row in text, label
        assert f"| step_floor_s | {f.baseline * 1000:.1f} ms | {f.current * 1000:.1f} ms |" in text
    assert median[ZERO3].detectable > 0.05  # ZeRO-3's median is the nominal one: the floor carries the cell
    assert {f["metric"] for f in to_json(result)["findings"]} >= {"step_time_s", "step_floor_s"}
