"""What records mean beyond their figures, said wherever they are shown: CPU figures (the run's console
summary, the report's top), and a results folder's own erratum (the report's top; the cells it names stale
are left out of reports and of the estimator's judging)."""

from __future__ import annotations

import re
from pathlib import Path

# CPU speedups and efficiencies look like findings and are not.
CPU_CAVEAT = ("CPU cells show that the path works, not how strategies compare: processes share this machine's "
              "cores, so speedups and efficiencies measure the harness. Compare strategies on GPU runs.")

# A results folder's records stay as measured; when a later finding makes some of them wrong (a bench bug
# found after the run), the folder carries this file, and every report rendered from the folder opens with it.
ERRATA_FILE = "ERRATA.md"
# A line of the erratum that names a cell whose records are wrong: "- stale cell `<cell_id>`: <label>".
# Those records stay on file (nothing recorded is lost) but reports and estimate-check leave them out.
STALE_LINE = re.compile(r"^- stale cell `([0-9a-f]+)`", re.MULTILINE)


def folder_errata(results_dir: Path) -> str | None:
    """The folder's erratum, its text as written (stripped); None without one."""
    path = Path(results_dir) / ERRATA_FILE
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def stale_cells(results_dir: Path) -> set[str]:
    """The cell ids the folder's erratum names stale (empty without an erratum)."""
    return set(STALE_LINE.findall(folder_errata(results_dir) or ""))


class ErratumError(ValueError):
    """A folder's erratum names a stale cell its runs.jsonl does not hold (a mistyped id would otherwise leave
    the wrong records in every report without a word)."""


def without_stale(records: list, results_dir: Path) -> list:
    """The records whose cells the folder's erratum does not name stale. Raises ErratumError when the erratum
    names a cell none of ``records`` is."""
    stale = stale_cells(results_dir)
    if unknown := stale - {r.cell_id for r in records}:
        raise ErratumError(f"{Path(results_dir) / ERRATA_FILE} names stale cell(s) {', '.join(sorted(unknown))} that "
                           f"{Path(results_dir) / 'runs.jsonl'} does not hold. Fix: copy each id from the record's "
                           "cell_id field (a report's cells.csv lists them)")
    return [r for r in records if r.cell_id not in stale]
