"""bench/report/host_steady.py: which steps ran on a slow host, from the per-step pace readings, and the figure
without them; then the same on the committed 1x H200 records that motivated it."""

from __future__ import annotations

import pytest

from bench.records.store import load_records
from bench.report import host_steady, metrics
from conftest import REPO

FAST, SLOW = 0.4, 0.85  # ms: the light probe's two paces on the H200 hosts (results/llama8b-steady-h200-*)


def rank(paces: list[float], end: float, times: list[float] | None = None) -> dict:
    times = times or [1.0] * len(paces)
    steps = [{"phase": "warmup", "time_s": 3.0}]  # no reading: warm-up steps are not judged
    steps += [{"phase": "timed", "time_s": t, "host_pace_ms": p} for t, p in zip(times, paces)]
    return {"steps": steps, "host": {"host_pace_ms_end": end}}


def test_a_step_ran_on_a_slow_host_when_the_reading_before_or_after_it_is_slow():
    # readings 0..5 bracket steps 0..4: a slow reading 2 marks steps 1 and 2
    assert host_steady.rank_brackets(rank([FAST, FAST, SLOW, FAST, FAST], end=FAST)) == [FAST, SLOW, SLOW, FAST, FAST]
    assert host_steady.rank_brackets(rank([FAST, FAST], end=SLOW)) == [FAST, SLOW]  # the closing reading counts


def test_the_slowest_rank_sets_a_step_and_old_records_have_no_readings():
    a, b = rank([FAST, FAST, FAST], end=FAST), rank([FAST, FAST, SLOW], end=SLOW)
    assert host_steady.step_paces([a, b]) == [FAST, SLOW, SLOW]
    old = {"steps": [{"phase": "timed", "time_s": 1.0}], "host": {}}
    assert host_steady.step_paces([a, old]) is None
    assert host_steady.figures([old], [1.0]) == {}


def test_the_figure_is_the_median_of_the_steps_on_a_steady_host():
    paces = [FAST] * 6 + [SLOW] * 3 + [FAST] * 3
    times = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0, 1.6, 1.7, 1.8, 1.5, 1.0, 1.01]
    out = host_steady.figures([rank(paces, end=FAST)], times)
    # the slow readings 6-8 mark steps 5-8 (step 5 ends at reading 6); steps 9-11 are read fast on both sides
    assert out["host_steady_steps"] == 8 and out["host_slow_step_share"] == pytest.approx(4 / 12)
    assert out["host_pace_fastest_ms"] == FAST
    assert out["step_time_host_steady_s"] == pytest.approx(1.005)  # the steady steps' median
    assert sorted(times)[len(times) // 2] > 1.0  # ... where the plain median is pulled up by the slow steps


def test_a_host_slow_throughout_leaves_every_step_and_too_few_steady_steps_give_no_figure():
    slow_throughout = host_steady.figures([rank([SLOW] * 6, end=SLOW)], [1.5] * 6)
    assert slow_throughout["host_slow_step_share"] == 0 and slow_throughout["step_time_host_steady_s"] == 1.5
    few = host_steady.figures([rank([FAST, FAST, FAST, FAST, SLOW, SLOW], end=SLOW)], [1.0] * 6)
    assert few["host_steady_steps"] == 3 < host_steady.MIN_STEADY_STEPS and "step_time_host_steady_s" not in few


def test_the_committed_fsdp_cell_reads_faster_on_a_steady_host():
    """results/llama8b-steady-h200-a (1x H200): FSDP LoRA x1 waited on the host, 74 % of its steps on a slow host."""
    records = load_records(REPO / "results" / "llama8b-steady-h200-a")
    [row] = [metrics.figures(r) for r in records if "fsdp_full_shard" in r.label]
    assert row["host_slow_step_share"] == pytest.approx(31 / 42) and row["host_steady_steps"] == 11
    assert row["step_time_host_steady_s"] < 0.97 * row["step_time_s"]
    assert row["real_tokens_per_s_host_steady"] == pytest.approx(row["real_tokens_per_step"] / row["step_time_host_steady_s"])


def test_a_host_bound_cell_faster_on_a_steady_host_is_warned_of_and_the_end_probe_warning_steps_aside():
    from bench.records.store import latest_runs
    from bench.report import cautions
    from test_verdict import build

    df = build(latest_runs(load_records(REPO / "results" / "llama8b-steady-h200-a")))
    warning = cautions.steady_host_warning(df)
    # FSDP x1: cards 73 % busy, 74 % of its steps on a slow host, +4.4 % on a steady host; ZeRO-3 x1 (+0.9 %) and
    # ddp x1 (card-bound) are not named
    assert warning and warning.startswith("Warning: part of the timed steps of fsdp_full_shard x1 GPU (74% of steps; "
                                          "6,300 tok/s/GPU, +4.4%)")
    assert "zero3" not in warning and "ddp" not in warning and warning in cautions.verdict_warnings(df)
    # its end probes read 9.0 / 8.2 ms, the slowest of the table: measured inside the window now, so not warned twice
    assert cautions.slow_host_warning(df) is None
    assert cautions.steady_host_warning(build(latest_runs(load_records(REPO / "results" / "llama8b-h200-d")))) is None
