"""The estimator against the committed GPU records (H100 80GB): re-predicted with the current code, the
per-rank peak of torch reserved memory must be within 10% of the measured one on every ok cell.

Runs on CPU: it reads results/*/runs.jsonl and predicts, nothing is launched.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.estimate_check import check_folder, render

RESULTS = Path(__file__).resolve().parent.parent / "results"
GPU_FOLDERS = ("llama8b", "llama-full", "oom", "smoke-gpu")
TOLERANCE = 0.10
# Cells the 10% target does not cover, with the reason.
EXCEPTIONS = {
    # tiny-llama (a few MB of states) under plain torch: the measured 0.17 GiB is fixed overhead (cuBLAS
    # workspaces, the CUDA caching allocator's minimum segments, the data batch), not model memory.
    "tiny-llama full ddp x1gpu": "fixed overheads dominate a 0.17 GiB peak",
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


def test_exceptions_are_still_needed():
    """An exception that the estimator now meets should be dropped from the list."""
    rows = {r.label: r for r in _rows()}
    for label in EXCEPTIONS:
        assert label in rows and abs(rows[label].error) > TOLERANCE, label
