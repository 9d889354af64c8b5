"""The verdict's test of "indistinguishable" (the ratio's interval, not two overlapping intervals) and its
grouping by layout (nodes x GPUs per node). Records: copies of results/llama8b's 2-GPU launches (H100)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.records import RunRecord, load_records
from bench.report import intervals, tables, verdict
from test_launch_interval import EPISODES, with_steps
from test_metrics import by_label
from test_verdict import build, launch

from conftest import REPO


@pytest.fixture(scope="module")
def llama8b() -> dict[str, RunRecord]:
    return by_label(load_records(REPO / "results" / "llama8b"))


def three(record: RunRecord, centre: float, clock: float | None = None) -> list[RunRecord]:
    """Three launches at centre x (1, 1.01, 0.99) s: 1 % launch-to-launch spread."""
    return [launch(record, centre * f, repeat=i, clock=clock) for i, f in enumerate((1.0, 1.01, 0.99))]


def test_overlapping_intervals_are_not_enough_the_ratio_must_hold_one(llama8b):
    z1, z2 = llama8b["llama-3.1-8b lora zero1 x2gpu"], llama8b["llama-3.1-8b lora zero2 x2gpu"]
    df = build(three(z1, 1.0) + three(z2, 1.04))  # zero2 4 % slower; each interval about +-2.5 %
    fast, slow = (df[df["strategy"] == s].iloc[0] for s in ("zero1", "zero2"))
    assert intervals.overlap(verdict.interval(slow), verdict.interval(fast))  # the former test: indistinguishable
    ratio = verdict.ratio_to(slow, fast)
    assert ratio.high < 1.0  # a 95 % test: zero2 is slower
    v = verdict.decide(df, 2)
    assert v.fastest["strategy"] == "zero1" and v.indistinguishable == []
    assert tables.verdict_table(df).iloc[0][tables.INDISTINGUISHABLE] == "none"
    close = build(three(z1, 1.0) + three(z2, 1.01))  # 1 % apart: the ratio's interval holds 1
    v = verdict.decide(close, 2)
    assert [r["strategy"] for r in v.indistinguishable] == ["zero2"]
    entry = tables.verdict_table(close).iloc[0][tables.INDISTINGUISHABLE]
    r = verdict.ratio_to(v.indistinguishable[0], v.fastest)
    assert entry.startswith("zero2 (pure): ") and entry.endswith(f"0.99x [{r.low:.2f}-{r.high:.2f}]")


def test_without_an_interval_the_verdict_falls_back_to_overlap_and_says_so(llama8b):
    z1, ddp = llama8b["llama-3.1-8b lora zero1 x2gpu"], llama8b["llama-3.1-8b lora ddp x2gpu"]
    steps = [t * 1.005 / float(np.median(EPISODES)) for t in EPISODES]  # median 1.005 s, no interval (n_eff < 6)
    df = build(three(z1, 1.0) + [with_steps(ddp, steps, interval=False)])
    fast = df[df["real_tokens_per_s"] == df["real_tokens_per_s"].max()].iloc[0]
    other = df[df["cell_id"] != fast["cell_id"]].iloc[0]
    assert verdict.ratio_to(other, fast) is None and verdict.indistinguishable(other, fast)
    entry = tables.verdict_table(df).iloc[0][tables.INDISTINGUISHABLE]
    assert entry.endswith("[no interval: the figures overlap]")


def test_two_nodes_of_two_gpus_are_their_own_layout(llama8b):
    z1, ddp = llama8b["llama-3.1-8b lora zero1 x2gpu"], llama8b["llama-3.1-8b lora ddp x2gpu"]
    df = build(three(z1, 1.0, clock=1950.0) + three(ddp, 1.3, clock=1950.0))
    across = df[df["strategy"] == "ddp"].copy()  # the same setting over 2 nodes x 2 GPUs: faster, slower clock
    across = across.assign(nodes=2, processes=4, cell_id="two-nodes", sm_clock_mean_mhz=1700.0,
                           real_tokens_per_s_per_gpu=across["real_tokens_per_s_per_gpu"] * 2,
                           real_tokens_per_s=across["real_tokens_per_s"] * 8)
    both = pd.concat([df, across], ignore_index=True)
    one_node = verdict.decide(both, 2)
    assert one_node.fastest["strategy"] == "zero1" and one_node.nodes == 1  # the 2 x 2 cell is not compared here
    found = verdict.verdicts(both)
    assert [v.layout for v in found] == [2, "2 x 2"]
    assert found[1].fastest["cell_id"] == "two-nodes"
    table = tables.verdict_table(both)
    assert list(table.iloc[:, 0]) == [2, "2 x 2"] and table.columns[0] == "GPUs (nodes x GPUs per node across nodes)"
    assert table.iloc[0]["mean SM clock MHz"] == "1950-1950"  # no warning: the 1700 MHz cell is another layout's
    assert tables.verdict_table(df).columns[0] == "GPUs"  # one node: as before


def test_head_to_head_at_n_gpus_leaves_cells_over_several_nodes_to_their_own_table(llama8b):
    ddp1, ddp2 = llama8b["llama-3.1-8b lora ddp x1gpu"], llama8b["llama-3.1-8b lora ddp x2gpu"]
    df = build(three(ddp1, 1.0) + three(ddp2, 1.05))
    across = df[df["gpus"] == 2].assign(nodes=2, processes=4, cell_id="two-nodes")
    table = tables.head_to_head(pd.concat([df, across], ignore_index=True), tables.TableOptions(compare_gpus=2))
    assert len(table) == 2  # the 1-GPU baseline and ddp on 2 GPUs of one node, not ddp over 2 x 2
    assert list(table["baseline (same policy)"]) == ["(a baseline)", "ddp x1 GPU"]
