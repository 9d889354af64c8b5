"""One launch's interval: the worker's stopping rule, never a narrower one where the rule admits none.

Records are copies of results/llama8b's ddp x2 GPU launch (H100) with the timed steps and the worker's
``timing`` set as bench/worker/train.py writes them.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from bench.records import RunRecord, load_records
from bench.report import intervals, metrics, plots, repeats, speedups, tables, text, verdict
from bench.worker import timing
from test_metrics import by_label

from conftest import REPO

# 10 fast steps, then 10 slow ones: one episode each, so the below-median indicator is strongly dependent
EPISODES = [1.00 + 0.001 * i for i in range(10)] + [1.10 + 0.001 * i for i in range(10)]


@pytest.fixture(scope="module")
def ddp2() -> RunRecord:
    return by_label(load_records(REPO / "results" / "llama8b"))["llama-3.1-8b lora ddp x2gpu"]


def with_steps(record: RunRecord, times: list[float], interval: bool) -> RunRecord:
    """``record`` timed with ``times`` on every rank, and the worker's timing summary of them (the interval
    removed where ``interval`` is False: a cell stopped on its cap before the rule reached one)."""
    r = copy.deepcopy(record)
    rule = timing.StoppingRule(min_steps=len(times), max_steps=len(times))
    for rank in r.ranks:
        first = next(s for s in rank["steps"] if s["phase"] == "timed")
        warm = [s for s in rank["steps"] if s["phase"] == "warmup"]
        rank["steps"] = warm + [{**first, "step": len(warm) + i, "time_s": t} for i, t in enumerate(times)]
        summary = rule.summary(times, float(sum(times)), "max_steps")
        if not interval:
            summary.update(ci_low_s=None, ci_high_s=None, ci_coverage=None, ci_rel_half_width=None)
        rank["timing"] = summary
    return r


def test_episodes_have_no_interval_where_independent_steps_would_give_a_narrow_one(ddp2):
    assert timing.median_interval(EPISODES, 0.95, serial=True) is None  # n_eff < 6
    independent = intervals.median_interval(EPISODES)
    assert independent.high / independent.low < 1.11  # what the old fallback reported: a real-looking interval
    row = metrics.figures(with_steps(ddp2, EPISODES, interval=False))
    assert row["launch_interval_source"] == intervals.NO_INTERVAL == "no interval (n_eff < 6)"
    assert np.isnan(row["step_time_ci_low_s"]) and np.isnan(row["real_tokens_per_s_ci_low"])
    assert row["step_time_s"] == pytest.approx(np.median(EPISODES))
    cell = pd.Series(row)
    assert metrics.per_gpu_interval(cell) is None
    assert text.interval_text(cell) == "[no interval]" and "[no interval] (1 launch)" in text.throughput_text(cell)


def test_worker_without_an_interval_gets_the_rule_recomputed_with_serial_dependence(ddp2):
    rng = np.random.default_rng(3)
    steady = list(1.2 * (1 + 0.01 * rng.standard_normal(40)))
    row = metrics.figures(with_steps(ddp2, steady, interval=False))
    rule = timing.median_interval(steady, 0.95, serial=True)
    assert row["launch_interval_source"] == intervals.FROM_SERIAL
    assert (row["step_time_ci_low_s"], row["step_time_ci_high_s"]) == pytest.approx((rule.low, rule.high))
    # the worker's own interval, where it has one, stays the source
    assert metrics.figures(with_steps(ddp2, steady, interval=True))["launch_interval_source"] == "timing"


def test_old_records_keep_order_statistics_and_say_so(ddp2):
    row = metrics.figures(ddp2)  # no timing: 6 fixed steps
    assert row["launch_interval_source"] == intervals.FROM_INDEPENDENT
    assert "independent" in row["launch_interval_source"] and "before adaptive timing" in row["launch_interval_source"]


def test_every_consumer_copes_with_a_launch_without_interval(ddp2, llama8b_zero1, tmp_path):
    none = with_steps(ddp2, EPISODES, interval=False)
    df = metrics.add_flop_rates(speedups.add_speedups(repeats.aggregate_repeats(metrics.frame([none, llama8b_zero1]))))
    v = verdict.decide(df, 2)  # ddp's median (1.05 s) is the fastest: the answer, without an interval
    assert v.fastest["strategy"] == "ddp"
    table = tables.verdict_table(df).iloc[0]
    assert table["fastest that fits (tok/s/GPU [95% CI])"].endswith("[no interval]")
    assert tables.scaling_table(df).set_index("strategy").loc["ddp", "2 GPU: tok/s/GPU [95% CI]"].endswith(
        "[no interval] (1 launch)")
    h2h = tables.head_to_head_row(df[df["strategy"] == "ddp"].iloc[0], None, None)
    assert h2h["step time s [95% CI]"].endswith("[no interval]") and "nan" not in h2h["step time s [95% CI]"]
    assert plots.scaling_curves(df, "t", tmp_path / "s.png") is not None


@pytest.fixture(scope="module")
def llama8b_zero1() -> RunRecord:
    return by_label(load_records(REPO / "results" / "llama8b"))["llama-3.1-8b lora zero1 x2gpu"]
