"""From a matrix to its cells: the grid's product less exclusions plus inclusions, the time budget a cell
may use, and the --only/--exclude selection."""

from __future__ import annotations

import itertools
import json
from typing import Any

import yaml
from pydantic import ValidationError

from bench.spec.loading import format_validation_error
from bench.spec.schema import (CellSettings, Limits, Matrix, MatrixError, _flatten, _SECTIONS, _set_path, known_keys,
                               resolve_key)


def detect_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _base_settings(matrix: Matrix, device: str) -> dict[str, Any]:
    base = matrix.model_dump(mode="json", include=set(CellSettings.model_fields))
    base["device"] = device
    return base


def _matches(flat: dict[str, Any], rule: dict[str, Any]) -> bool:
    for key, want in rule.items():
        path = resolve_key(key)
        if path in _SECTIONS and isinstance(want, dict):  # a whole section compared by the fields given
            if any(flat.get(k) != v for k, v in _flatten(want, f"{path}.").items()):
                return False
        elif flat.get(path) != want:
            return False
    return True


def expand(matrix: Matrix, source: str = "matrix", device: str | None = None) -> list[CellSettings]:
    """The cells of a matrix, in grid order, validated; duplicates (same id) appear once."""
    device = device or (detect_device() if matrix.device == "auto" else matrix.device)
    base = _base_settings(matrix, device)
    axes = [(resolve_key(k), v) for k, v in matrix.grid.items()]
    combos = [dict(zip([a for a, _ in axes], values)) for values in itertools.product(*[v for _, v in axes])]
    combos += [{resolve_key(k): v for k, v in inc.items()} for inc in matrix.include]
    cells: dict[str, CellSettings] = {}
    for combo in combos:
        settings = json.loads(json.dumps(base))
        for path, value in combo.items():
            _set_path(settings, path, value)
        try:
            cell = CellSettings.model_validate(settings)
        except ValidationError as e:
            raise MatrixError(format_validation_error(source, e, f" in the cell {combo}")) from e
        if any(_matches(cell.flat(), rule) for rule in matrix.exclude) and combo not in matrix.include:
            continue
        cells.setdefault(cell.cell_id, cell)
    return list(cells.values())


def check_time_budget(cells: list[CellSettings], limits: Limits, source: str) -> None:
    """The runner must not stop a cell for taking the time its settings allow.

    A cell may take up to limits.startup_s before its first step and then time up to
    train.timing.max_timed_s (plus one step past the cap, warm-up and teardown, which a timeout should
    leave room for): both must fit inside limits.timeout_s, else a slow start and a noisy card turn a cell
    that stops on its time cap into a timeout.
    """
    if not cells:
        return
    worst = max(cells, key=lambda c: c.train.timing.max_timed_s)
    need = limits.startup_s + worst.train.timing.max_timed_s
    if need > limits.timeout_s:
        raise MatrixError(
            f"{source}: limits.timeout_s ({limits.timeout_s:g} s) is below limits.startup_s ({limits.startup_s:g} s) + "
            f"train.timing.max_timed_s ({worst.train.timing.max_timed_s:g} s, cell {worst.label}) = {need:g} s: a cell "
            f"that starts slowly and times up to its cap would be stopped as a timeout. Fix: raise limits.timeout_s "
            f"to at least {need:g}, or lower limits.startup_s or train.timing.max_timed_s")


# ---------------------------------------------------------------- selection (--only / --exclude)

def parse_selector(text: str) -> tuple[str, list[Any]]:
    """``gpus=1,2`` -> ("gpus", [1, 2]); values are parsed as YAML scalars."""
    if "=" not in text:
        raise MatrixError(f"selector {text!r}: write KEY=VALUE[,VALUE...], e.g. --only strategy=ddp,zero3")
    key, values = text.split("=", 1)
    try:
        path = resolve_key(key.strip())
    except KeyError:
        raise MatrixError(f"selector {text!r}: {key!r} is not a setting. Fix: use one of {', '.join(known_keys())}") from None
    return path, [yaml.safe_load(v) for v in values.split(",")]


def select(cells: list[CellSettings], only: list[str], exclude: list[str]) -> list[CellSettings]:
    def hit(cell: CellSettings, selectors: list[str]) -> bool:
        flat = cell.flat()
        return all(flat.get(path) in values for path, values in map(parse_selector, selectors))

    return [c for c in cells if (not only or hit(c, only)) and not any(hit(c, [e]) for e in exclude)]
