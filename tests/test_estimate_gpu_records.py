"""The estimator against the committed GPU records (H100 80GB, and H200 since session 3): re-predicted with the
current code, the per-rank peak of torch reserved memory (max over ranks) must match the measured one.

Tolerances, and why:
- 10% on every ok cell (the long-standing target), except the exceptions below.
- 5% where reserved comes from the allocation replay (bench/estimate_trace.py: full fine-tuning on CUDA) of a
  deterministic strategy (DDP, ZeRO-1/2/3, FSDP2): these records repeat to the MiB on every rank and
  rerun (results/llama-full-h100x4-1b-rerun), and the replay meets them within 3.7% (FSDP2 on 3B, 4 GPUs:
  +3.7%; DDP +1.2% at most; ZeRO-1/2 within 0.5%; ZeRO-3 +3.4% at most).
- FSDP1 is not deterministic: it frees blocks used on two streams through record_stream, reusable only once
  the GPU has caught up, so the same cell reads 0.3-0.8 GiB apart between ranks and reruns (1B, 4 GPUs,
  hybrid shard: 16.67-17.43 GiB). The replay takes the GPU to be as far behind as FSDP1's rate limiter
  (limit_all_gathers) allows: sharded FSDP1 measures -9.5%..+2.6% against it (10%). NO_SHARD has no rate
  limiter, the lag is bounded only by the worker's synchronisations: 1B measures at that bound (-2..+2%),
  3B 10-12% below it (the replay over-predicts by +10.4% at 2 GPUs, +12.3% at 4): 15% for fsdp_no_shard.

Runs on CPU: it reads results/*/runs.jsonl and predicts, nothing is launched.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.estimate_check import check_folder, render
from bench.estimate_trace import replay
from bench.matrix import CellSettings
from bench.models import ModelShape
from bench.results import load_records
from bench.strategies import get as get_strategy

RESULTS = Path(__file__).resolve().parent.parent / "results"
GPU_FOLDERS = ("llama8b", "llama-full", "oom", "smoke-gpu", "nightly", "llama70b-qlora",  # H100
               "llama-full-h100x4", "llama-full-h100x4-1b-rerun",  # H100 x4, FSDP built on meta
               "nightly-rerun-3", "nightly-rerun-4", "nightly-rerun-5", "llama-full-h200", "qlora-1b-h200",  # H200
               "llama8b-meta-h200", "llama8b-meta-h200-b")  # H200, LoRA under FSDP built on meta (llama8b's FSDP cells were built on the GPU)
# Not here: results/qlora-1b (H100), measured before the fix that keeps Llama-3.2's tied embeddings tied in
# the 4-bit build (its records hold a second, untied copy of the 263M-parameter embedding); qlora-1b-h200
# is its re-measurement. Nor the tiny-llama GPU test folders: fixed overheads are most of their memory.
TOLERANCE = 0.10
REPLAY_TOLERANCE = 0.05  # replayed, deterministic strategies (module docstring)
DETERMINISTIC = ("ddp", "single", "zero1", "zero2", "zero3", "fsdp2", "fsdp2_no_reshard")
STRATEGY_TOLERANCE = {"fsdp_no_shard": 0.15}  # record_stream frees without a rate limiter (module docstring)
# Cells the 10% target does not cover, with the reason.
EXCEPTIONS = {
    # tiny-llama (a few MB of states) under plain torch: the measured 0.17 GiB is fixed overhead (cuBLAS
    # workspaces, the CUDA caching allocator's minimum segments, the data batch), not model memory.
    "tiny-llama full ddp x1gpu": "fixed overheads dominate a 0.17 GiB peak",
    # QLoRA 70B: allocated within 8% (test below), reserved under by 35-45%: the caching allocator holds
    # far more than the freed build segments modelled here after the layer-by-layer 4-bit build (8 GiB
    # under FSDP offload, 37 GiB under ZeRO-3); not explained yet.
    "llama-3-70b qlora fsdp_full_shard_offload x2gpu": "reserved after the 4-bit build not modelled",
    "llama-3-70b qlora fsdp_full_shard_offload x2gpu cap24G": "reserved after the 4-bit build not modelled",
    "llama-3-70b qlora zero3_offload x2gpu": "reserved after the 4-bit build not modelled",
    # QLoRA 1B (H200, after the tie fix): FSDP and ZeRO-3 over in reserved by 0.7-0.85 GiB on ~4-6 GiB
    # (allocated within 8%), not investigated yet. (Its ddp cells were 12% under until the autocast copy of
    # the fp32-upcast LM head was modelled.)
    "llama-3.2-1b qlora fsdp_full_shard x2gpu": "QLoRA 1B FSDP: reserved over by 0.7 GiB (allocated -2%)",
    "llama-3.2-1b qlora zero3 x2gpu": "QLoRA 1B ZeRO-3: reserved over by 0.85 GiB (allocated -7%)",
}


def _rows():
    return [row for name in GPU_FOLDERS if (RESULTS / name / "runs.jsonl").is_file() for row in check_folder(RESULTS / name)]


def _tolerance(row) -> float:
    return STRATEGY_TOLERANCE.get(row.strategy, TOLERANCE)


def test_every_shipped_gpu_folder_has_ok_cells():
    for name in ("llama8b", "llama-full", "oom", "llama-full-h100x4", "llama-full-h100x4-1b-rerun"):
        assert check_folder(RESULTS / name), name


@pytest.mark.parametrize("row", _rows(), ids=lambda r: f"{r.matrix}:{r.label}")
def test_predicted_reserved_peak_within_tolerance(row):
    if row.label in EXCEPTIONS:
        pytest.skip(EXCEPTIONS[row.label])
    assert abs(row.error) <= _tolerance(row), render([row], row.matrix)


@pytest.mark.parametrize("row", [r for r in _rows() if r.reserved_model == "replay" and r.strategy in DETERMINISTIC
                                 and not r.label.startswith("tiny-llama")],
                         ids=lambda r: f"{r.matrix}:{r.label}")
def test_replayed_reserved_peak_within_5_percent(row):
    """Where the allocations are replayed and the strategy frees nothing across streams by record_stream, the
    reserved peak is predicted within 5% and the allocated one within 3%."""
    assert abs(row.error) <= REPLAY_TOLERANCE, render([row], row.matrix)
    assert abs(row.allocated_error) <= 0.03, render([row], row.matrix)


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
    records where the build is written down op by op: FSDP1 and FSDP2 on meta, ZeRO-1/2's flattening.
    Not DDP (the replay holds 0.95 GiB less after DDP's construction on 1B, 2 GPUs: its broadcast and bucket
    building are coarser than DDP's C++ does them) nor ZeRO-3 (the records hold one gathered embedding
    more after prepare, 0.49 GiB on 1B, not traced to its source)."""
    checked = 0
    for record, build_peak, reserved in _before_first_step(folder):
        cell = CellSettings.model_validate(record.settings)
        strategy = get_strategy(cell.strategy)
        if strategy.family not in ("fsdp", "fsdp2") and not (strategy.family == "deepspeed" and strategy.zero_stage < 3):
            continue
        rep = replay(cell, ModelShape.of(cell.model), strategy)
        assert rep.build_peak_allocated == pytest.approx(build_peak, rel=0.01), record.label
        assert rep.reserved_after_prepare == pytest.approx(reserved, rel=0.02), record.label
        checked += 1
    assert checked >= 9


def test_qlora_70b_allocated_peak_within_10_percent():
    """The 70B QLoRA cells' allocated peak (what the model holds, build included) is predicted within 10%."""
    rows = check_folder(RESULTS / "llama70b-qlora")
    assert len(rows) >= 3
    for row in rows:
        assert abs(row.allocated_error) <= TOLERANCE, render([row], row.matrix)


def test_exceptions_are_still_needed():
    """An exception that the estimator now meets should be dropped from the list."""
    rows = {r.label: r for r in _rows()}
    for label in EXCEPTIONS:
        assert label in rows and abs(rows[label].error) > TOLERANCE, label


def test_the_wider_fsdp_no_shard_tolerance_is_still_needed():
    rows = [r for r in _rows() if r.strategy in STRATEGY_TOLERANCE]
    assert rows and max(abs(r.error) for r in rows) > TOLERANCE
