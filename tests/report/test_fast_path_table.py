"""The fast-path table (issue 21): like for like at the same micro-batch and each at its best (auto), with
intervals, never a ratio across precision policies or timing protocols.

Records are real llama8b GPU records (results/llama8b, ddp at 1 and 2 GPUs) re-set through the record
schema: kernels and micro-batch changed in their settings (so their cell ids and labels are the real
ones), three launches each with known step times, tokens scaled to the micro-batch, peaks set.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.records import RunRecord, append_record, load_records
from bench.report import document as report, fast_paths, intervals
from bench.spec import CellSettings
from conftest import REPO
from test_metrics import by_label
from test_verdict import build

GIB = 2**30
LAUNCH_FACTORS = (0.98, 1.0, 1.02)  # each launch's step time, as a factor of the cell's


@pytest.fixture(scope="module")
def templates() -> dict[int, RunRecord]:
    records = by_label(load_records(REPO / "results" / "llama8b"))
    return {n: records[f"llama-3.1-8b lora ddp x{n}gpu"] for n in (1, 2)}


def cell(template: RunRecord, kernels: str, mb, step_s: float, reserved_gib: float, repeat: int,
         chosen: int | None = None, policy: str | None = None, timing: bool = False) -> RunRecord:
    """A launch of ``template`` with kernels and micro-batch set, timed steps of ``step_s`` (times the
    launch's factor), tokens for the micro-batch run (``chosen`` for auto) and the given peak reserved."""
    r = copy.deepcopy(template)
    r.settings = {**r.settings, "train": {**r.settings["train"], "kernels": kernels, "micro_batch": mb}}
    settings = CellSettings.model_validate(r.settings)
    r.cell_id, r.label, r.repeat = settings.cell_id, settings.label, repeat
    run_mb = chosen if mb == "auto" else mb
    if mb == "auto":
        r.micro_batch_auto = {"proposed": chosen, "capacity_gib": 80.0, "capacity_source": "card",
                              "trail": [{"mb": chosen, "status": "ok", "peak_gib": reserved_gib}], "chosen": chosen}
    for rank in r.ranks:
        rank["torch_peak_reserved_bytes"] = int(reserved_gib * GIB)
        if policy:
            rank["precision_policy"] = policy
        if timing:
            rank["timing"] = {"stop_reason": "ci_target"}  # the adaptive rule's record (no interval: order stats)
        for s in rank["steps"]:
            s["tokens"] = s["real_tokens"] = 2048 * run_mb
            if s["phase"] == "timed":
                s["time_s"] = step_s * LAUNCH_FACTORS[repeat] * (1 + 0.001 * (s["step"] % 3 - 1))
    return RunRecord.model_validate(r.model_dump())


def launches(template, kernels, mb, step_s, reserved_gib, **kw) -> list[RunRecord]:
    return [cell(template, kernels, mb, step_s, reserved_gib, i, **kw) for i in range(len(LAUNCH_FACTORS))]


@pytest.fixture(scope="module")
def records(templates) -> list[RunRecord]:
    one, two = templates[1], templates[2]
    return [*launches(one, "none", 4, 1.00, 40.0), *launches(one, "liger", 4, 0.80, 28.0),
            *launches(one, "none", "auto", 1.50, 70.0, chosen=6), *launches(one, "liger", "auto", 2.00, 72.0, chosen=10),
            # at 2 GPUs: the plain step ran out of memory at auto's choice, Liger's cell reports another policy
            *launches(two, "none", 4, 1.10, 41.0), *launches(two, "liger", 4, 0.90, 29.0, policy="autocast")]


@pytest.fixture(scope="module")
def rows(records) -> dict[tuple, fast_paths.Comparison]:
    found = list(fast_paths.groups(build(records)))
    assert len(found) == 1  # one machine, one base setting: the four axes' cells paired
    return {(c.processes, c.compared): c for c in fast_paths.comparisons(found[0][1])}


def expected_ratio_interval(ratio: float) -> tuple[float, float]:
    """Both cells' launches spread by the same factors: each log-scale t half-width h, the ratio's sqrt(2) h."""
    log_sd = np.log(1 / np.asarray(LAUNCH_FACTORS)).std(ddof=1)
    half = stats.t.ppf(0.975, len(LAUNCH_FACTORS) - 1) * log_sd / math.sqrt(len(LAUNCH_FACTORS))
    return ratio * math.exp(-math.sqrt(2) * half), ratio * math.exp(math.sqrt(2) * half)


def test_like_for_like_is_the_same_micro_batch_with_its_interval(rows):
    c = rows[(1, fast_paths.LIKE_FOR_LIKE)]
    assert c.fast_path == "kernels liger" and c.plain["micro_batch"] == c.fast["micro_batch"] == 4
    assert c.ratio_value == pytest.approx(1.00 / 0.80, rel=1e-3)  # same tokens, step 0.8 s against 1.0 s
    low, high = expected_ratio_interval(1.25)
    assert (c.ratio.low, c.ratio.high) == (pytest.approx(low, rel=2e-3), pytest.approx(high, rel=2e-3))
    assert c.memory_share == pytest.approx(28.0 / 40.0)
    assert c.no_ratio is None


def test_each_at_its_best_uses_the_micro_batch_each_launch_confirmed(rows):
    c = rows[(1, fast_paths.EACH_AT_BEST)]
    assert (c.plain["micro_batch"], c.fast["micro_batch"]) == (6, 10)
    # tokens/s: 10 x 2048 / 2.0 s against 6 x 2048 / 1.5 s
    assert c.ratio_value == pytest.approx((10 / 2.0) / (6 / 1.5), rel=1e-3)
    assert c.ratio.low < c.ratio_value < c.ratio.high


def test_no_ratio_across_precision_policies_and_a_missing_cell_is_named(rows):
    mixed = rows[(2, fast_paths.LIKE_FOR_LIKE)]
    assert mixed.ratio is None and mixed.ratio_value is None
    assert "precision policies differ" in mixed.no_ratio
    assert (2, fast_paths.EACH_AT_BEST) not in rows  # no auto cell at 2 GPUs: no such row


def test_no_ratio_across_timing_protocols(templates):
    one = templates[1]
    df = build([*launches(one, "none", 4, 1.0, 40.0), *launches(one, "liger", 4, 0.8, 28.0, timing=True)])
    (_title, group), = fast_paths.groups(df)
    (c,) = fast_paths.comparisons(group)
    assert c.ratio is None and "timing protocols differ" in c.no_ratio


def test_a_failed_side_shows_its_status(templates):
    one = templates[1]
    plain = launches(one, "none", 8, 1.0, 80.0)
    for r in plain:
        r.status, r.ranks = "oom", []
    (_title, group), = fast_paths.groups(build([*plain, *launches(one, "liger", 8, 1.6, 50.0)]))
    (c,) = fast_paths.comparisons(group)
    assert c.no_ratio == "plain oom" and c.ratio is None
    table = fast_paths.table([c], "cuda")
    assert table.iloc[0]["plain: tok/s/GPU [95% CI]"].startswith("oom")


def test_ratio_interval_adds_log_half_widths_in_quadrature():
    got = intervals.ratio((2.0, 1.0, 4.0), (1.0, 0.5, 2.0))  # each half-width log(2)
    assert got.low == pytest.approx(2.0 * 2 ** -math.sqrt(2)) and got.high == pytest.approx(2.0 * 2 ** math.sqrt(2))
    assert intervals.ratio((2.0, float("nan"), 4.0), (1.0, 0.5, 2.0)) is None


def test_rendered_in_the_report_and_absent_without_a_fast_path(records, templates, tmp_path):
    folder = tmp_path / "res"
    for r in records:
        append_record(folder, r)
    report.write_report([folder], tmp_path / "rep")
    md = (tmp_path / "rep" / "index.md").read_text()
    assert "Fast paths: like for like and each at its best" in md
    assert "Fast paths" in (tmp_path / "rep" / "index.html").read_text()
    table = pd.read_csv(tmp_path / "rep" / "fast_paths_1.csv", dtype=str, keep_default_na=False)
    assert list(table["compared at"]) == [fast_paths.LIKE_FOR_LIKE, fast_paths.EACH_AT_BEST, fast_paths.LIKE_FOR_LIKE]
    assert table.iloc[0]["fast / plain tok/s [95% CI]"].startswith("1.25x [")
    assert "mb 10 (auto: proposed 10, 10 ok)" in table.iloc[1]["fast path: tok/s/GPU [95% CI]"]
    assert table.iloc[2]["fast / plain tok/s [95% CI]"].startswith("no ratio: precision policies differ")
    assert fast_paths.section(build(launches(templates[1], "none", 4, 1.0, 40.0))) is None
