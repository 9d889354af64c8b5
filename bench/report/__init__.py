"""The report: records in, tables, plots and a verdict out (``bench report``).

Rooms: ``metrics`` (each record's figures, recomputed from what it measured), ``speedups`` (like-for-like
baselines and the speedups against them), ``repeats`` (a cell's launches pooled into one row), ``flops`` (the FLOP convention and the peak table), ``intervals`` (intervals
of medians and across launches), ``verdict`` (which strategy to use, and why), ``text`` (a figure as the
report writes it), ``tables`` (the report's tables), ``cautions`` (the warnings beside them),
``fast_paths`` (the fast paths like for like and each at its best), ``nodes`` (scaling across nodes),
``plots``, ``render`` (Markdown, HTML and CSV), ``document`` (the whole report, section by section).

The front is lazy (a name loads its room on first use): the report pulls in pandas and matplotlib.
"""

from bench.lazy_front import lazy_front

_ROOM = {
    "ReportOptions": "document", "parse_count": "document", "write_report": "document",
}

__all__ = [
    "ReportOptions", "parse_count", "write_report",
]

__getattr__, __dir__ = lazy_front(__name__, _ROOM, globals(), __all__)
