"""CPU figures are labelled as such: the caveat in the console, a warning when processes exceed cores."""

from __future__ import annotations

import os

from bench.launch.campaign import oversubscription_warning
from bench.records.caveats import CPU_CAVEAT
from bench.spec import CellSettings


def test_more_processes_than_cores_is_warned_about():
    cores = len(os.sched_getaffinity(0))
    too_many = CellSettings(device="cpu", gpus=cores + 1)
    fits = CellSettings(device="cpu", gpus=1)
    warning = oversubscription_warning([fits, too_many])
    assert warning and f"{cores + 1} processes" in warning and f"{cores} core(s)" in warning
    assert oversubscription_warning([fits]) is None
    assert oversubscription_warning([CellSettings(device="cuda", gpus=cores + 1)]) is None


def test_the_cores_counted_are_those_this_process_may_use(monkeypatch):
    """A container or taskset may give bench 1 of the host's 64 cores: 2 processes then share it."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    warning = oversubscription_warning([CellSettings(device="cpu", gpus=2)])
    assert warning and "2 processes on a machine with 1 core(s)" in warning


def test_a_dry_run_warns_too(tmp_path, monkeypatch):
    from io import StringIO

    from rich.console import Console

    from bench.launch.campaign import RunOptions, run_matrix
    from conftest import write_matrix

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    out = StringIO()
    run_matrix(str(write_matrix(tmp_path, gpus=2)), RunOptions(results_dir=tmp_path / "res", dry_run=True),
               Console(file=out, width=300))
    assert "warning: CPU cells with 2 processes on a machine with 1 core(s)" in out.getvalue()


def test_cpu_run_ends_with_the_caveat(cpu_results):
    console = " ".join((cpu_results.parent / "run-console.txt").read_text().split())
    assert " ".join(CPU_CAVEAT.split()) in console


def test_cpu_report_opens_with_the_caveat(cpu_results, tmp_path):
    from io import StringIO

    from rich.console import Console

    from bench.report.document import write_report

    console = Console(file=StringIO(), width=200)
    out = write_report([cpu_results], tmp_path / "rep", console=console)
    md = (out / "index.md").read_text()
    first_figures = md.index("## ")  # the caveat comes before any section, and so before any speedup
    assert 0 < md.index(CPU_CAVEAT) < first_figures
    import html

    assert html.escape(CPU_CAVEAT) in (out / "index.html").read_text()
    said = " ".join(console.file.getvalue().split())
    assert said.startswith(f"note: {' '.join(CPU_CAVEAT.split())}")
