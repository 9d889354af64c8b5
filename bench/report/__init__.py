"""The report: records in, tables, plots and a verdict out (``bench report``).

Rooms: ``metrics`` (each record's figures, recomputed from what it measured), ``flops`` (the FLOP
convention and the peak table), ``intervals`` (intervals of medians and across launches), ``verdict``
(which strategy to use, and why), ``text`` (a figure as the report writes it), ``tables`` (the report's
tables), ``plots``, ``render`` (Markdown, HTML and CSV), ``document`` (the whole report, section by
section).

The front is lazy (a name loads its room on first use): the report pulls in pandas and matplotlib.
"""

from importlib import import_module

_ROOM = {
    "ReportOptions": "document", "parse_count": "document", "write_report": "document",
}

__all__ = [
    "ReportOptions", "parse_count", "write_report",
]


def __getattr__(name: str):
    if name not in _ROOM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_ROOM[name]}"), name)
    globals()[name] = value  # loaded once; later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
