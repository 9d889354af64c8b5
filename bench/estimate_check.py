"""`bench estimate-check RESULTS`: the current estimator against measured GPU peaks of recorded runs.

Records store the prediction of the estimator that ran with them; this re-predicts every ok GPU cell
with the estimator as it is now and compares the per-rank peak (max over ranks) of torch reserved and
allocated memory with ``torch.cuda.max_memory_reserved`` / ``max_memory_allocated`` as measured.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from bench.estimate import GIB, predict
from bench.matrix import CellSettings
from bench.results import RunRecord, load_records


@dataclass(frozen=True)
class CheckRow:
    matrix: str
    label: str
    cell_id: str
    predicted_reserved_gib: float
    measured_reserved_gib: float
    predicted_allocated_gib: float
    measured_allocated_gib: float
    phase: str
    strategy: str = ""
    reserved_model: str = ""  # "replay" (bench/estimate_trace.py) or "additive"

    @property
    def error(self) -> float:
        """(predicted - measured) / measured of torch reserved: positive over-predicts."""
        return self.predicted_reserved_gib / self.measured_reserved_gib - 1

    @property
    def allocated_error(self) -> float:
        return self.predicted_allocated_gib / self.measured_allocated_gib - 1


def measured_peaks(record: RunRecord) -> tuple[float, float] | None:
    """(reserved, allocated) in GiB, the max over ranks; None without a measurement."""
    reserved = [r.get("torch_peak_reserved_bytes") for r in record.ranks or []]
    allocated = [r.get("torch_peak_allocated_bytes") for r in record.ranks or []]
    if not reserved or any(v is None for v in reserved + allocated):
        return None
    return max(reserved) / GIB, max(allocated) / GIB


def built_on_meta(record: RunRecord) -> bool:
    """How the record's model was built; records from before ``model_init`` existed built on the GPU."""
    return any(str(rank.get("model_init", "")).startswith("meta") for rank in record.ranks or [])


def check_records(records: list[RunRecord]) -> list[CheckRow]:
    rows = []
    for record in records:
        if record.status != "ok":
            continue
        cell = CellSettings.model_validate(record.settings)
        measured = measured_peaks(record)
        if cell.device != "cuda" or measured is None:
            continue
        pred = predict(cell, built_on_meta=built_on_meta(record))
        if pred is None:
            continue
        rows.append(CheckRow(record.matrix, record.label, record.cell_id, pred.peak_reserved_gib, measured[0],
                             pred.peak_allocated_gib, measured[1], pred.peak_phase, cell.strategy,
                             pred.reserved_model))
    return rows


def check_folder(results: Path) -> list[CheckRow]:
    return check_records(load_records(Path(results)))


def summary(rows: list[CheckRow]) -> dict[str, float]:
    if not rows:
        return {}
    errs = [abs(r.error) for r in rows]
    return {"cells": len(rows), "max_abs_error": max(errs), "median_abs_error": statistics.median(errs),
            "median_error": statistics.median(r.error for r in rows),
            "within_10pct": sum(e <= 0.10 for e in errs)}


def render(rows: list[CheckRow], title: str) -> str:
    lines = [f"{title}: predicted (current estimator) vs measured peak per rank, GiB (max over ranks)",
             f"{'cell':<46} {'pred res':>9} {'meas res':>9} {'err':>7}   {'pred alloc':>10} {'meas alloc':>10} {'err':>7}  phase"]
    for r in rows:
        lines.append(f"{r.label:<46} {r.predicted_reserved_gib:9.2f} {r.measured_reserved_gib:9.2f} {r.error:+7.1%}   "
                     f"{r.predicted_allocated_gib:10.2f} {r.measured_allocated_gib:10.2f} {r.allocated_error:+7.1%}  {r.phase}")
    s = summary(rows)
    if s:
        lines.append(f"reserved: {s['cells']} ok cells, max |error| {s['max_abs_error']:.1%}, median |error| "
                     f"{s['median_abs_error']:.1%}, median error {s['median_error']:+.1%}, "
                     f"{s['within_10pct']}/{s['cells']} within 10%")
    else:
        lines.append("no ok GPU cell with measured torch peaks")
    return "\n".join(lines)


def run_check(results: list[Path]) -> int:
    for folder in results:
        rows = check_folder(folder)
        print(render(rows, str(folder)))
        print()
    return 0
