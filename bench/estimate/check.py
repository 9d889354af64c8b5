"""`bench estimate-check [RESULTS...]`: the current estimator against measured GPU peaks of recorded runs.

Records store the prediction of the estimator that ran with them; this re-predicts every ok GPU cell
with the estimator as it is now (``predict_for_record``: the one path that reports and this check share)
and compares the per-rank peak (max over ranks) of torch reserved and allocated memory with
``torch.cuda.max_memory_reserved`` / ``max_memory_allocated`` as measured.

Errors are reported in-sample (folders the estimator was tuned on) and out-of-sample apart, per framework
(bench/estimate/protocol.py). Exit 1 when a judged out-of-sample cell is off by more than the tolerance,
naming it; 0 otherwise; 2 on bad input (a folder without records).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.estimate.additive import predict
from bench.estimate.auto_batch import with_micro_batch
from bench.estimate.prediction import ESTIMATOR_VERSION, GIB, Prediction
from bench.estimate.protocol import (MIN_JUDGED_GIB, MIN_JUDGED_PARAMS, TOLERANCE, framework_of, judge_folders, sample_of,
                                     tuning_folders)
from bench.estimate.terms import describe_strategy
from bench.spec import CellSettings
from bench.spec.models import ModelShape
from bench.records import ERRATA_FILE, RunRecord, load_records, stale_cells, without_stale


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
    reserved_model: str = ""  # "replay" (bench/estimate/replay/) or "additive"
    framework: str = ""  # bench.estimate.protocol.framework_of
    sample: str = ""  # "in-sample" or "out-of-sample" (the record's folder)
    folder: str = ""
    params: int = 0  # the model's parameter count

    @property
    def error(self) -> float:
        """(predicted - measured) / measured of torch reserved: positive over-predicts."""
        return self.predicted_reserved_gib / self.measured_reserved_gib - 1

    @property
    def allocated_error(self) -> float:
        return self.predicted_allocated_gib / self.measured_allocated_gib - 1


def measured_peaks(record: RunRecord) -> tuple[float, float] | None:
    """(reserved, allocated) in GiB, the max over ranks; None without a measurement.

    torch_peak_* are whole-run peaks (build included), which is what the estimator predicts."""
    reserved = [r.get("torch_peak_reserved_bytes") for r in record.ranks or []]
    allocated = [r.get("torch_peak_allocated_bytes") for r in record.ranks or []]
    if not reserved or any(v is None for v in reserved + allocated):
        return None
    return max(reserved) / GIB, max(allocated) / GIB


def built_on_meta(record: RunRecord) -> bool:
    """How the record's model was built; records from before ``model_init`` existed built on the GPU."""
    return any(str(rank.get("model_init", "")).startswith("meta") for rank in record.ranks or [])


def predict_for_record(record: RunRecord) -> Prediction | None:
    """The current estimator's prediction for a recorded GPU cell, built the way that record was built.

    The one path for every re-prediction of a record: this check and the report's "current estimator"
    column (bench/report/metrics.py). None for a CPU cell or a cell that cannot be described."""
    if (record.settings or {}).get("device") != "cuda":
        return None
    try:
        cell = CellSettings.model_validate(record.settings)
    except Exception:  # noqa: BLE001 - a record from an older schema has no current prediction
        return None
    if cell.train.micro_batch == "auto":  # the micro-batch its launch confirmed; none when none fit
        chosen = (getattr(record, "micro_batch_auto", None) or {}).get("chosen")
        if not chosen:
            return None
        cell = with_micro_batch(cell, chosen)
    return predict(cell, built_on_meta=built_on_meta(record))


def judged(row: CheckRow) -> bool:
    """Cells the protocol holds the estimator to: the model's memory dominates the measured peak."""
    return row.measured_reserved_gib >= MIN_JUDGED_GIB and row.params >= MIN_JUDGED_PARAMS


def check_records(records: list[RunRecord], folder: Path | None = None) -> list[CheckRow]:
    sample = sample_of(folder) if folder is not None else ""
    rows = []
    for record in records:
        if record.status != "ok":
            continue
        measured = measured_peaks(record)
        if measured is None:
            continue
        pred = predict_for_record(record)
        if pred is None:
            continue
        cell = CellSettings.model_validate(record.settings)
        rows.append(CheckRow(record.matrix, record.label, record.cell_id, pred.peak_reserved_gib, measured[0],
                             pred.peak_allocated_gib, measured[1], pred.peak_phase, cell.strategy,
                             pred.reserved_model, framework_of(describe_strategy(cell), cell.adapter.type), sample,
                             str(folder) if folder is not None else "", ModelShape.of(cell.model).params))
    return rows


def check_folder(results: Path) -> list[CheckRow]:
    kept = without_stale(load_records(Path(results)), Path(results))  # cells the folder's erratum calls wrong
    return check_records(kept, Path(results))


def summary(rows: list[CheckRow], tolerance: float = TOLERANCE) -> dict[str, float]:
    if not rows:
        return {}
    errs = [abs(r.error) for r in rows]
    return {"cells": len(rows), "max_abs_error": max(errs), "median_abs_error": statistics.median(errs),
            "median_error": statistics.median(r.error for r in rows),
            "max_under": max(0.0, -min(r.error for r in rows)), "max_over": max(0.0, max(r.error for r in rows)),
            "within": sum(e <= tolerance for e in errs)}


def render(rows: list[CheckRow], title: str, tolerance: float = TOLERANCE) -> str:
    lines = [f"{title}: predicted (current estimator) vs measured peak per rank, GiB (max over ranks)",
             f"{'cell':<46} {'pred res':>9} {'meas res':>9} {'err':>7}   {'pred alloc':>10} {'meas alloc':>10} {'err':>7}  phase"]
    for r in rows:
        lines.append(f"{r.label:<46} {r.predicted_reserved_gib:9.2f} {r.measured_reserved_gib:9.2f} {r.error:+7.1%}   "
                     f"{r.predicted_allocated_gib:10.2f} {r.measured_allocated_gib:10.2f} {r.allocated_error:+7.1%}  {r.phase}")
    s = summary(rows, tolerance)
    if s:
        lines.append(f"reserved: {s['cells']} ok cells, max |error| {s['max_abs_error']:.1%}, median |error| "
                     f"{s['median_abs_error']:.1%}, median error {s['median_error']:+.1%}, "
                     f"{s['within']}/{s['cells']} within {tolerance:.0%}")
    else:
        lines.append("no ok GPU cell with measured torch peaks")
    return "\n".join(lines)


def distinct_cells(rows: list[CheckRow]) -> list[CheckRow]:
    """One row per judged cell: a cell launched several times (a nightly cell, night after night) is one cell,
    represented by its launch of median measured peak (the upper one of an even count), so that repeats
    of one cell do not outvote the other cells in the table or the margins."""
    groups: dict[tuple[str, str], list[CheckRow]] = {}
    for r in rows:
        groups.setdefault((r.sample, r.cell_id), []).append(r)
    out = []
    for group in groups.values():
        middle = statistics.median_high(r.measured_reserved_gib for r in group)
        out.append(next(r for r in group if r.measured_reserved_gib == middle))
    return out


def framework_table(rows: list[CheckRow], tolerance: float = TOLERANCE) -> str:
    """Judged cells' reserved error per sample and framework (the table the README publishes); a cell
    launched several times counts once (distinct_cells)."""
    lines = [f"| sample | framework | judged cells | median error | worst under | worst over | within {tolerance:.0%} |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    groups: dict[tuple[str, str], list[CheckRow]] = {}
    for r in distinct_cells([r for r in rows if judged(r)]):
        groups.setdefault((r.sample, r.framework), []).append(r)
    for (sample, fw), group in sorted(groups.items()):
        s = summary(group, tolerance)
        lines.append(f"| {sample} | {fw} | {s['cells']} | {s['median_error']:+.1%} | {-s['max_under']:+.1%} | "
                     f"{s['max_over']:+.1%} | {s['within']}/{s['cells']} |")
    return "\n".join(lines)


def misses(rows: list[CheckRow], tolerance: float = TOLERANCE) -> list[CheckRow]:
    """Judged out-of-sample cells off by more than the tolerance: what makes the check fail."""
    return [r for r in rows if r.sample == "out-of-sample" and judged(r) and abs(r.error) > tolerance]


def default_folders(results_root: Path = Path("results")) -> list[Path]:
    return tuning_folders(results_root) + judge_folders(results_root)


def run_check(results: list[Path], tolerance: float = TOLERANCE) -> int:
    folders = list(results) or default_folders()
    missing = [f for f in folders if not (Path(f) / "runs.jsonl").is_file() and not str(f).endswith(".jsonl")]
    if missing or not folders:
        print(f"error: no records in {', '.join(map(str, missing)) or 'results/'}. Fix: give results folders "
              "holding a runs.jsonl, e.g. results/estimate-judge-h200", file=sys.stderr)
        return 2
    rows = []
    for folder in folders:
        folder_rows = check_folder(Path(folder))
        rows += folder_rows
        print(render(folder_rows, f"{folder} ({sample_of(Path(folder))})", tolerance))
        if stale := stale_cells(Path(folder)):
            print(f"left out: the records of {len(stale)} cell(s) that {folder}/{ERRATA_FILE} names stale")
        print()
    print(f"Reserved-peak error of judged cells (measured >= {MIN_JUDGED_GIB:g} GiB, models of "
          f"{MIN_JUDGED_PARAMS / 1e6:.0f}M parameters or more), estimator version "
          f"{ESTIMATOR_VERSION}; in-sample errors were seen while tuning, out-of-sample ones were not:")
    print(framework_table(rows, tolerance))
    if note := stale_margins_note():
        print(note)
    bad = misses(rows, tolerance)
    for r in bad:
        print(f"MISS {r.folder}: {r.label} ({r.cell_id}): predicted {r.predicted_reserved_gib:.2f} GiB, "
              f"measured {r.measured_reserved_gib:.2f} GiB ({r.error:+.1%}, tolerance {tolerance:.0%})")
    # Counted like the table (a cell launched several times once), with its launches beside: the misses
    # above are launches, so one bad launch of a repeated cell still fails the check.
    cells = distinct_cells([r for r in rows if r.sample == "out-of-sample" and judged(r)])
    launches = len([r for r in rows if r.sample == "out-of-sample" and judged(r)])
    within = sum(abs(r.error) <= tolerance for r in cells)
    print(f"out-of-sample: {within}/{len(cells)} judged cells within {tolerance:.0%} "
          f"({launches} launches, {len(bad)} off by more)")
    return 1 if bad else 0


def stale_margins_note() -> str | None:
    from bench.estimate.margins import load

    data = load()
    if data is None:
        return "note: no margins file (bench/estimate/margins.json): run bench estimate-margins"
    if data.get("estimator_version") != ESTIMATOR_VERSION:
        return (f"note: the margins file was made by estimator version {data.get('estimator_version')}, "
                f"this is {ESTIMATOR_VERSION}: run bench estimate-margins")
    return None
