"""Records: what each cell run leaves behind.

Rooms: ``store`` (the versioned RunRecord schema and the append-only ``runs.jsonl`` it is kept in: append,
tolerant load, the latest launch per cell), ``rank_files`` (what each rank writes for the runner: heartbeat,
report, error, written atomically; the only room the worker imports), ``caveats`` (what CPU figures mean,
and a folder's own erratum, said wherever records are shown, its stale cells left out). The rest of bench
reads records through the names below.

The front is lazy (a name loads its room on first use) so that a rank importing ``bench.records.rank_files``
does not load the parent's storage machinery with it.
"""

from bench.lazy_front import lazy_front

_ROOM = {
    "CellError": "store", "DETERMINISTIC_FAILURES": "store", "MATRIX_COPY": "store", "RUNS_FILE": "store",
    "RunRecord": "store", "SCHEMA_VERSION": "store", "SchemaError": "store", "Status": "store",
    "append_record": "store", "check_writable": "store", "latest_runs": "store", "load_records": "store",
    "not_launched_record": "store", "runs_path": "store", "save_matrix_copy": "store",
    "RankFiles": "rank_files", "classify_exception": "rank_files", "read_json_files": "rank_files",
    "CPU_CAVEAT": "caveats", "ERRATA_FILE": "caveats", "folder_errata": "caveats", "stale_cells": "caveats",
    "without_stale": "caveats", "ErratumError": "caveats",
}

__all__ = [
    "CPU_CAVEAT", "CellError", "DETERMINISTIC_FAILURES", "ERRATA_FILE", "ErratumError", "MATRIX_COPY", "RUNS_FILE",
    "RankFiles", "RunRecord", "SCHEMA_VERSION",
    "SchemaError", "Status", "append_record", "check_writable", "classify_exception", "folder_errata", "latest_runs",
    "load_records", "not_launched_record", "read_json_files", "runs_path", "save_matrix_copy", "stale_cells",
    "without_stale",
]

__getattr__, __dir__ = lazy_front(__name__, _ROOM, globals(), __all__)
