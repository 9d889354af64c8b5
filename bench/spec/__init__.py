"""The spec: what a matrix file says, before any strategy or machine is asked about it.

Rooms: ``schema`` (every setting of a cell and a matrix, typed; the cell id), ``loading`` (a YAML file in,
a validated Matrix out, or an error naming the key and the fix), ``expansion`` (the grid into cells, the
time budget, --only/--exclude), ``models`` (the shipped model configs and local model folders, read
without torch), ``data_source`` (a local data set: checked before launch, opened). The bottom layer:
it imports nothing else of bench.
"""

from bench.spec import models
from bench.spec.expansion import check_time_budget, detect_device, expand, parse_selector, select
from bench.spec.loading import format_validation_error, load_matrix
from bench.spec.schema import (Adapter, CellSettings, Data, Limits, Matrix, MatrixError, Timing, TokenBudget, Train,
                               known_keys, resolve_key)

__all__ = [
    "Adapter", "CellSettings", "Data", "Limits", "Matrix", "MatrixError", "Timing", "TokenBudget", "Train",
    "check_time_budget", "detect_device", "expand", "format_validation_error", "known_keys", "load_matrix", "models",
    "parse_selector", "resolve_key", "select",
]
