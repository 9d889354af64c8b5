"""What records mean beyond their figures, said wherever they are shown: CPU figures (the run's console
summary, the report's top), and a results folder's own erratum (the report's top)."""

from __future__ import annotations

from pathlib import Path

# CPU speedups and efficiencies look like findings and are not.
CPU_CAVEAT = ("CPU cells show that the path works, not how strategies compare: processes share this machine's "
              "cores, so speedups and efficiencies measure the harness. Compare strategies on GPU runs.")

# A results folder's records stay as measured; when a later finding makes some of them wrong (a bench bug
# found after the run), the folder carries this file, and every report rendered from the folder opens with it.
ERRATA_FILE = "ERRATA.md"


def folder_errata(results_dir: Path) -> str | None:
    """The folder's erratum, its text as written (stripped); None without one."""
    path = Path(results_dir) / ERRATA_FILE
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None
