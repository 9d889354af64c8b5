"""The pre-flight margins, per framework, from the estimator's measured out-of-sample errors.

Two ways to be wrong, two margins:
- ``fit``: the estimator under-predicts, a cell said to fit does not (the costly error: a user launches it,
  or picks that configuration, and it runs out of memory). A cell "fits" only when
  ``required * (1 + fit) <= capacity``; ``fit`` is the COVERAGE quantile of measured / predicted - 1 over
  the judged cells, so "fits" is right for at least that share of them.
- ``skip``: the estimator over-predicts, a cell said not to fit would have. ``bench run`` records a cell as
  ``predicted_oom`` (and launches nothing) only when ``required > capacity * (1 + skip)``; ``skip`` is the
  COVERAGE quantile of predicted / measured - 1, so a skipped cell really would not have fitted.

Both are floored at 0 and computed by ``bench estimate-margins`` from the judge folders
(bench/estimate/protocol.py) into ``MARGINS_FILE``, a committed, generated file: never typed in. A
framework with fewer than ``MIN_CELLS`` judged cells takes the margins of all judged cells together, but never
less than the stated defaults (``DEFAULT_FIT``, ``DEFAULT_SKIP``): other frameworks' errors say little about
its own (an offload path's allocator pools are not DDP's), and too small a margin is the costly mistake; with
no judged cell at all, the defaults hold.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.estimate.protocol import COVERAGE, framework_of, judge_folders

MARGINS_FILE = Path(__file__).with_name("margins.json")
MIN_CELLS = 3
# Until judge records exist. fit: the largest under-prediction reported out of sample before the protocol
# (issue 23: ZeRO-2 offload, Llama-3.2-1B full fine-tune on 2 H200, -14.3 %), rounded up to 15 %.
# skip: the margin bench used before (10 %): skip only a cell predicted more than 10 % over capacity.
DEFAULT_FIT = 0.15
DEFAULT_SKIP = 0.10


@dataclass(frozen=True)
class Margin:
    fit: float
    skip: float
    source: str  # how it was obtained, for the record and the report

    def describe(self) -> str:
        return f"fit +{self.fit:.1%}, skip +{self.skip:.1%} ({self.source})"


def _quantile(values: list[float]) -> float:
    # "higher": an observed error, never an interpolation below it; with fewer than 20 cells, the largest.
    # Rounded up to the file's 4 decimals: rounded to nearest, a margin could fall short of the very error it
    # was taken from (a 25.18 % under-prediction covered by 25.18 %).
    return max(0.0, float(np.ceil(np.quantile(values, COVERAGE, method="higher") * 1e4) / 1e4))


def compute(results_root: Path) -> dict:
    """The margins file's content, from the judge folders under ``results_root`` and the current estimator."""
    from bench.estimate.prediction import ESTIMATOR_VERSION
    from bench.estimate.check import check_folder, distinct_cells, judged

    folders = judge_folders(results_root)
    # One row per distinct cell: the nights of one nightly cell are one cell, not five.
    rows = distinct_cells([r for f in folders for r in check_folder(f) if judged(r)])
    by_fw: dict[str, list] = {}
    for r in rows:
        by_fw.setdefault(r.framework, []).append(r)

    def entry(group: list) -> dict:
        under = [r.measured_reserved_gib / r.predicted_reserved_gib - 1 for r in group]
        over = [r.predicted_reserved_gib / r.measured_reserved_gib - 1 for r in group]
        return {"cells": len(group), "fit": _quantile(under), "skip": _quantile(over),
                "max_under": round(max(under), 4), "max_over": round(max(over), 4),
                "median_error": round(float(np.median([r.error for r in group])), 4)}

    return {
        "generated_by": "bench estimate-margins",
        "estimator_version": ESTIMATOR_VERSION,
        "coverage": COVERAGE,
        "folders": [f.relative_to(results_root).as_posix() for f in folders],
        "defaults": {"fit": DEFAULT_FIT, "skip": DEFAULT_SKIP},
        "pooled": entry(rows) if rows else None,
        "frameworks": {fw: entry(group) for fw, group in sorted(by_fw.items())},
    }


def write(results_root: Path, out: Path = MARGINS_FILE) -> dict:
    data = compute(results_root)
    out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


def load(path: Path = MARGINS_FILE) -> dict | None:
    """The margins file's content (None if absent or unreadable); read once per version of the file."""
    try:
        return _read(str(path), Path(path).stat().st_mtime_ns)
    except OSError:
        return None


@functools.lru_cache(maxsize=4)
def _read(path: str, _mtime_ns: int) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def margin_for_framework(framework: str, data: dict | None) -> Margin:
    if not data or not data.get("pooled"):
        return Margin(DEFAULT_FIT, DEFAULT_SKIP, "default: no judged out-of-sample cell yet")
    own = data["frameworks"].get(framework)
    if own and own["cells"] >= MIN_CELLS:
        return Margin(own["fit"], own["skip"], f"{framework}: {own['cells']} judged cells, {COVERAGE:.0%} covered")
    pooled = data["pooled"]
    have = own["cells"] if own else 0
    return Margin(max(pooled["fit"], DEFAULT_FIT), max(pooled["skip"], DEFAULT_SKIP),
                  f"all frameworks: {pooled['cells']} judged cells ({framework} has {have}, under {MIN_CELLS}), "
                  f"{COVERAGE:.0%} covered, floored at the defaults ({DEFAULT_FIT:.0%} fit, {DEFAULT_SKIP:.0%} skip)")


def margin_for(strategy, adapter: str = "none", data: dict | None = None) -> Margin:
    """The margins for a cell's strategy (``bench.strategies.Strategy`` or None) and adapter type, from the
    committed file."""
    return margin_for_framework(framework_of(strategy, adapter), load() if data is None else data)


def as_dict(m: Margin) -> dict:
    return asdict(m)
