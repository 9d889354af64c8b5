"""benchmarks/nightly_gate.py counts the floor (``step_floor_s``) beside the median step in its leave-one-out and
per-cell lines, on the committed nights of the current nightly matrix (results/nightly-h200-w60); nothing is
launched."""

from __future__ import annotations

import importlib.util
import re

from bench.check.gate import Thresholds
from conftest import REPO

spec = importlib.util.spec_from_file_location("nightly_gate", REPO / "benchmarks" / "nightly_gate.py")
ng = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ng)

W60 = sorted((REPO / "results" / "nightly-h200-w60").glob("2026-11-30-213e3ff*"))


def test_leave_one_out_counts_a_cell_caught_by_the_floor_or_the_median():
    lines = ng.leave_one_out(W60, 1.10, Thresholds())
    header = re.search(r"false alarm (\d+)/5; x1.1 slowdown flagged on (\d+)/(\d+) timed cells "
                       r"\(median (\d+), floor (\d+)\)", lines[0])
    assert header, lines[0]
    alarms, either, timed, median, floor = map(int, header.groups())
    assert alarms == 0 and timed == 20
    # ZeRO-3's median misses some scaled nights (its mix of episodes wanders); the floor catches every one.
    assert median < floor == either == 20
    assert all("detectable median/floor: " in line and "full zero3 " in line for line in lines[1:])


def test_components_of_the_floor_are_steadier_than_the_median_on_zero3():
    median, floor = ng.components(W60, Thresholds()), ng.components(W60, Thresholds(), "step_floor_s")
    assert median.keys() == floor.keys() and len(median) == 4
    (zero3,) = [cell for cell, row in median.items() if "zero3" in row[0]]
    assert floor[zero3][1] < median[zero3][1] / 2  # between-night s.d.: 0.8 % against 2.9 %
    assert floor[zero3][4] < median[zero3][4]  # so a smaller detectable change
