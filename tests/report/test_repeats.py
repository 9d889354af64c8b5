"""A cell's launches pooled: failed launches stay visible and keep the cell out of the verdict; launches of an
auto cell at different micro-batches are not pooled. Records: copies of results/llama8b's 2-GPU launches
(H100) with step times and statuses set (test_verdict.launch)."""

from __future__ import annotations

import copy

import pandas as pd
import pytest

from bench.records import RunRecord, load_records
from bench.report import metrics, repeats, tables, text, verdict
from test_metrics import by_label
from test_verdict import build, launch

from conftest import REPO


@pytest.fixture(scope="module")
def llama8b() -> dict[str, RunRecord]:
    return by_label(load_records(REPO / "results" / "llama8b"))


def failed(record: RunRecord, status: str, repeat: int) -> RunRecord:
    r = copy.deepcopy(record)
    r.status, r.repeat = status, repeat
    return r


def cells(llama8b, zero1_statuses: tuple[str, ...]):
    """ddp x2 in 3 ok launches at 1.3 s; zero1 x2 faster (1.0 s) in its first launch, then ``zero1_statuses``."""
    ddp, zero1 = llama8b["llama-3.1-8b lora ddp x2gpu"], llama8b["llama-3.1-8b lora zero1 x2gpu"]
    records = [launch(ddp, 1.3 + 0.01 * i, repeat=i) for i in range(3)] + [launch(zero1, 1.0, repeat=0)]
    records += [failed(zero1, status, i) for i, status in enumerate(zero1_statuses, 1)]
    return build(records)


def test_a_cell_that_failed_in_some_launches_does_not_win_the_verdict(llama8b):
    df = cells(llama8b, ("oom", "crash"))
    z1 = df[df["strategy"] == "zero1"].iloc[0]
    assert z1["status"] == "ok" and (z1["repeats"], z1["repeats_ok"]) == (3, 1)
    assert z1["failed_launches"] == "oom in 1 of 3 launches; crash in 1 of 3 launches"
    assert text.basis_text(z1) == "1 of 3 launches ok"
    assert text.throughput_text(z1).endswith("(1 of 3 launches ok)")
    v = verdict.decide(df, 2)
    assert v.fastest["strategy"] == "ddp" and not verdict.fits(z1)
    row = tables.verdict_table(df).iloc[0]
    assert row["did not fit"] == "zero1: oom in 1 of 3 launches; crash in 1 of 3 launches"
    assert row["fastest that fits (tok/s/GPU [95% CI])"].startswith("ddp (frozen-base)")


def test_interrupted_launches_are_the_operators_and_do_not_count_against_the_cell(llama8b):
    df = cells(llama8b, ("interrupted", "interrupted"))
    z1 = df[df["strategy"] == "zero1"].iloc[0]
    assert z1["failed_launches"] is None and text.basis_text(z1) == "1 of 3 launches ok"
    v = verdict.decide(df, 2)
    assert v.fastest["strategy"] == "zero1"
    assert "1 of 3 launches ok" in tables.verdict_table(df).iloc[0]["intervals from"]


def test_two_of_three_ok_says_so_and_pools_the_two(llama8b):
    zero1 = llama8b["llama-3.1-8b lora zero1 x2gpu"]
    df = build([launch(zero1, 1.0, repeat=0), launch(zero1, 1.02, repeat=1), failed(zero1, "hang", 2)])
    row = df.iloc[0]
    assert text.basis_text(row) == "2 of 3 launches ok" and row["interval_basis"] == "2 launches"
    assert row["failed_launches"] == "hang in 1 of 3 launches" and not verdict.fits(row)


def auto(record: RunRecord, step_s: float, repeat: int, chosen: int) -> RunRecord:
    """A launch of the cell as ``micro_batch: auto`` that confirmed ``chosen``."""
    r = launch(record, step_s, repeat=repeat)
    r.settings = {**r.settings, "train": {**r.settings["train"], "micro_batch": "auto"}}
    r.micro_batch_auto = {"proposed": 4, "capacity_gib": 80.0, "capacity_source": "card",
                          "trail": [{"mb": chosen, "status": "ok", "peak_gib": 30.0}], "chosen": chosen}
    return r


def test_launches_of_an_auto_cell_at_different_micro_batches_are_not_pooled(llama8b):
    zero1 = llama8b["llama-3.1-8b lora zero1 x2gpu"]
    one = metrics.figures(auto(zero1, 1.0, 0, 4))
    df = repeats.aggregate_repeats(metrics.frame([auto(zero1, 1.0, 0, 4), auto(zero1, 0.7, 1, 3),
                                                  auto(zero1, 1.02, 2, 4)]))
    row = df.iloc[0]
    assert row["micro_batch"] == 4 and (row["repeats_ok"], row["repeats_pooled"]) == (3, 2)
    assert row["repeats_other_micro_batch"] == 1
    assert row["micro_batch_note"] == ("launches chose different micro-batches: 2 at 4 (the most launches', on a "
                                       "tie the largest) pooled, 1 at 3 left out")
    # the median of the two launches at 4 (1.0 s and 1.02 s), not of all three (which would be 1.0 s)
    assert row["step_time_s"] == pytest.approx(1.01, rel=1e-3)
    assert row["real_tokens_per_s"] < one["real_tokens_per_s"]
    assert text.basis_text(row) == "3 launches, 2 pooled (1 at another micro-batch)"


def test_a_tie_between_two_runs_pools_the_larger_micro_batch_whatever_the_folder_order(llama8b):
    """Two runs of an auto cell, one launch each (results/kernels-h200 at mb 19 before the climb existed,
    kernels-h200-b at 23 after it): the report pools the best fit found, not whichever folder came first."""
    zero1 = llama8b["llama-3.1-8b lora zero1 x2gpu"]
    first = metrics.frame([auto(zero1, 3.8, 0, 19)]).assign(results_folder="results/kernels-h200")
    second = metrics.frame([auto(zero1, 4.6, 0, 23)]).assign(results_folder="results/kernels-h200-b")
    for order in ([first, second], [second, first]):
        row = repeats.aggregate_repeats(pd.concat(order, ignore_index=True)).iloc[0]
        assert row["micro_batch"] == 23 and row["step_time_s"] == pytest.approx(4.6)
        assert (row["repeats_pooled"], row["repeats_other_micro_batch"]) == (1, 1)


def test_most_launches_at_one_micro_batch_outweigh_a_larger_one(llama8b):
    zero1 = llama8b["llama-3.1-8b lora zero1 x2gpu"]
    df = repeats.aggregate_repeats(metrics.frame([auto(zero1, 1.1, 0, 5), auto(zero1, 1.0, 1, 4),
                                                  auto(zero1, 1.02, 2, 4)]))
    assert df.iloc[0]["micro_batch"] == 4 and df.iloc[0]["repeats_pooled"] == 2
