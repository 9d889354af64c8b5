"""The order a matrix's launches run in: round robin over the cells, so a cell's repeats lie apart in time."""

from __future__ import annotations

from pathlib import Path

from bench.launch.campaign import RunOptions, prepare
from bench.records import RunRecord, append_record

SMOKE = str(Path(__file__).resolve().parents[2] / "matrices" / "smoke.yaml")


def _order(prep) -> list[tuple[str, int]]:
    return [(cell.label, repeat) for cell, repeat in prep.todo]


def test_repeats_run_round_robin_not_back_to_back(tmp_path):
    prep = prepare(SMOKE, RunOptions(results_dir=tmp_path / "r", repeats=3, device="cpu"))
    labels = [c.label for c in prep.cells]
    assert len(labels) >= 2
    # every cell's first launch before any cell's second: a cell's three launches are a whole pass apart
    assert _order(prep) == [(label, r) for r in range(3) for label in labels]


def test_resume_keeps_the_round_robin_for_what_is_left(tmp_path):
    folder = tmp_path / "r"
    first = prepare(SMOKE, RunOptions(results_dir=folder, repeats=2, device="cpu"))
    cell = first.cells[0]
    from bench.machine import envinfo

    append_record(folder, RunRecord(matrix=first.matrix.name, cell_id=cell.cell_id, label=cell.label, repeat=0,
                                    settings=cell.model_dump(mode="json"), status="ok", started_at=1.0, wall_s=1.0,
                                    env=envinfo.fingerprint()))
    again = prepare(SMOKE, RunOptions(results_dir=folder, repeats=2, device="cpu"))
    labels = [c.label for c in again.cells]
    assert _order(again) == [(label, 0) for label in labels[1:]] + [(label, 1) for label in labels]
