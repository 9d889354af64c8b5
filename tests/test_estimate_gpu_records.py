"""The estimator against the committed GPU records (H100 80GB, and H200 since session 3): re-predicted with the current code, the
per-rank peak of torch reserved memory must be within 10% of the measured one on every ok cell.

Runs on CPU: it reads results/*/runs.jsonl and predicts, nothing is launched.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.estimate_check import check_folder, render

RESULTS = Path(__file__).resolve().parent.parent / "results"
GPU_FOLDERS = ("llama8b", "llama-full", "oom", "smoke-gpu", "nightly", "llama70b-qlora",  # H100
               "nightly-rerun-3", "nightly-rerun-4", "nightly-rerun-5", "llama-full-h200", "qlora-1b-h200")  # H200
# Not here: results/qlora-1b (H100), measured before the fix that keeps Llama-3.2's tied embeddings tied in
# the 4-bit build (its records hold a second, untied copy of the 263M-parameter embedding); qlora-1b-h200
# is its re-measurement. Nor the tiny-llama GPU test folders: fixed overheads are most of their memory.
TOLERANCE = 0.10
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


def test_every_shipped_gpu_folder_has_ok_cells():
    for name in ("llama8b", "llama-full", "oom"):
        assert check_folder(RESULTS / name), name


@pytest.mark.parametrize("row", _rows(), ids=lambda r: f"{r.matrix}:{r.label}")
def test_predicted_reserved_peak_within_10_percent(row):
    if row.label in EXCEPTIONS:
        pytest.skip(EXCEPTIONS[row.label])
    assert abs(row.error) <= TOLERANCE, render([row], row.matrix)


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
