"""The estimator against the committed in-sample GPU records (bench/estimate/protocol.py TUNING_FOLDERS):
re-predicted with the current code, the per-rank peak of torch reserved memory (max over ranks) must be within
the protocol's tolerance, fixed before these tests were written: TOLERANCE (10 %), the same for every cell.

In-sample means the estimator was built looking at these records: passing here is a floor, not evidence. The
evidence is out of sample: `bench estimate-check` on the judge folders (results/ESTIMATOR.md).

Cells known to miss the tolerance are expected failures (xfail, not strict): an estimator that gets better
turns them into passes and nothing fails. No tolerance here depends on what a record measured.

Runs on CPU: it reads results/*/runs.jsonl and predicts, nothing is launched.
"""

from __future__ import annotations


import pytest

from bench.estimate.check import check_folder, judged, render
from bench.estimate.protocol import TOLERANCE, TUNING_FOLDERS
from bench.estimate.replay import replay
from bench.records import load_records
from bench.spec import CellSettings
from bench.spec.models import ModelShape
from bench.strategies import get as get_strategy

from conftest import REPO

RESULTS = REPO / "results"
# In-sample folders not held to the target, with the reason. qlora-1b (H100) was measured before the fix that
# keeps Llama-3.2's tied embeddings tied in the 4-bit build (its records hold a second, untied copy of the
# 263M-parameter embedding); qlora-1b-h200 is its re-measurement.
SUPERSEDED = {"qlora-1b": "measured before the tied-embedding fix of the 4-bit build"}
# In-sample cells that miss the tolerance today, and why (expected failures, not strict).
KNOWN_MISSES = {
    "llama-3-70b qlora zero3_offload x2gpu": "reserved after the 4-bit build not modelled (allocated within 5 %)",
    "llama-3.2-1b qlora fsdp_full_shard x2gpu": "QLoRA 1B FSDP: cached build blocks over-counted (allocated -2 %)",
    "llama-3.2-1b qlora zero3 x2gpu": "QLoRA 1B ZeRO-3: cached build blocks over-counted (allocated -7 %)",
    "llama-3.2-3b full fsdp_no_shard x4gpu": "NO_SHARD frees by record_stream without a rate limiter",
    "llama-3.2-3b full fsdp_no_shard x2gpu": "NO_SHARD over-predicted (+8.8 % before the unshard stream's flat "
                                             "gradients, +11.4 % since): the excess not traced to a snapshot",
}


def _rows():
    return [row for name in TUNING_FOLDERS if name not in SUPERSEDED and (RESULTS / name / "runs.jsonl").is_file()
            for row in check_folder(RESULTS / name) if judged(row)]


def _param(row):
    marks = [pytest.mark.xfail(reason=KNOWN_MISSES[row.label], strict=False)] if row.label in KNOWN_MISSES else []
    return pytest.param(row, marks=marks, id=f"{row.matrix}:{row.label}")


def test_every_shipped_gpu_folder_has_judged_cells():
    for name in ("llama8b", "llama-full", "oom", "llama-full-h100x4", "llama-full-h100x4-1b-rerun"):
        assert [r for r in check_folder(RESULTS / name) if judged(r)], name


def test_every_row_is_in_sample():
    assert {r.sample for r in _rows()} == {"in-sample"}


@pytest.mark.parametrize("row", [_param(r) for r in _rows()])
def test_predicted_reserved_peak_within_tolerance(row):
    assert abs(row.error) <= TOLERANCE, render([row], row.matrix)


def test_all_llama_full_h100x4_cells_are_replayed():
    rows = check_folder(RESULTS / "llama-full-h100x4")
    assert len(rows) == 42
    assert {r.reserved_model for r in rows} == {"replay"}


def _before_first_step(folder: str):
    for record in load_records(RESULTS / folder):
        ranks = record.ranks or []
        if record.status != "ok" or not ranks or any(r.get("reserved_after_prepare_bytes") is None for r in ranks):
            continue
        yield record, max(r["peak_allocated_after_prepare_bytes"] for r in ranks), \
            max(r["reserved_after_prepare_bytes"] for r in ranks)


@pytest.mark.parametrize("folder", ["llama-full-h100x4"])
def test_replayed_build_matches_the_records_before_the_first_step(folder):
    """What building and preparing leaves, before any step: the replay's build peak and reserved match the
    records where the build is written down op by op: FSDP1 and FSDP2 on meta, ZeRO-1/2's flattening."""
    checked = 0
    for record, build_peak, reserved in _before_first_step(folder):
        cell = CellSettings.model_validate(record.settings)
        strategy = get_strategy(cell.strategy)
        if not strategy.is_fsdp and not (strategy.uses_deepspeed and strategy.zero_stage < 3):
            continue
        rep = replay(cell, ModelShape.of(cell.model), strategy)
        assert rep.build_peak_allocated == pytest.approx(build_peak, rel=0.01), record.label
        assert rep.reserved_after_prepare == pytest.approx(reserved, rel=0.02), record.label
        checked += 1
    assert checked >= 9


def test_qlora_70b_allocated_peak_within_tolerance():
    """The 70B QLoRA cells' allocated peak (what the model holds, build included) is within the tolerance."""
    rows = check_folder(RESULTS / "llama70b-qlora")
    assert rows  # ZeRO-3 offload; its two FSDP1 offload cells are stale (the folder's ERRATA.md) until rerun
    for row in rows:
        assert abs(row.allocated_error) <= TOLERANCE, render([row], row.matrix)
