"""Baselines: the records of one or more trusted runs of a matrix, one file per hardware, kept in the repository.

    bench baseline promote results/nightly      -> results/baselines/<hardware-slug>.jsonl
    bench baseline promote results/night-1 results/night-2 results/night-3   (several trusted runs, pooled)
    bench check results/nightly --baseline auto  -> compares against that file

A baseline file is a plain runs.jsonl (the same RunRecord lines, every repeat kept, raw per-step times
included) so that ``bench check`` re-derives every figure from it exactly as from fresh results. The
file is named after the hardware the records were measured on (``env.hardware``: GPU model and count,
or the CPU), so one repository can hold a baseline per CI runner type and ``auto`` picks the right one.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

from bench.results import RUNS_FILE, SCHEMA_VERSION, RunRecord, SchemaError, latest_runs, load_records

DEFAULT_DIR = Path("results/baselines")


class BaselineError(Exception):
    """Bad input for a baseline (no records, mixed hardware, missing file); the CLI exits 2 on it."""


def hardware_slug(hardware: str) -> str:
    """'2x NVIDIA H100 80GB HBM3' -> '2x-nvidia-h100-80gb-hbm3': a file name that says the card."""
    return re.sub(r"[^a-z0-9]+", "-", hardware.lower()).strip("-") or "unknown"


def load_any(path: Path) -> list[RunRecord]:
    """Records from a results folder (its runs.jsonl) or from a .jsonl file such as a baseline."""
    path = Path(path)
    if path.is_dir():
        if not (path / RUNS_FILE).is_file():
            raise BaselineError(f"{path}: no {RUNS_FILE} in this folder. Fix: give a results folder written by "
                                "`bench run`, or a baseline .jsonl file")
        return load_records(path)
    if not path.is_file():
        raise BaselineError(f"{path}: no such results folder or records file")
    return _read_jsonl(path)


def _read_jsonl(path: Path) -> list[RunRecord]:
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            # A baseline is committed, not appended by a running writer: a bad line is bad input.
            raise BaselineError(f"{path}:{n}: not a JSON record ({e}). Fix: restore the file from git") from None
        if raw.get("schema_version", 0) > SCHEMA_VERSION:
            raise SchemaError(f"{path}:{n}: written by a newer bench (schema {raw['schema_version']}). "
                              "Fix: upgrade bench")
        records.append(RunRecord.model_validate(raw))
    return records


def single_hardware(records: list[RunRecord], source: str) -> str:
    """The one hardware key the records were measured on; mixed or missing hardware is refused."""
    kinds = Counter(r.env.get("hardware") for r in records)
    if not records:
        raise BaselineError(f"{source}: no records. Fix: run the matrix first (`bench run ...`)")
    if None in kinds:
        raise BaselineError(f"{source}: {kinds[None]} record(s) carry no env.hardware fingerprint")
    if len(kinds) > 1:
        listed = ", ".join(f"{h!r} ({n} records)" for h, n in kinds.items())
        raise BaselineError(f"{source}: records from several machines ({listed}); a baseline or a check "
                            "compares one hardware at a time. Fix: split the results by machine")
    return next(iter(kinds))


def baseline_path(hardware: str, directory: Path = DEFAULT_DIR) -> Path:
    return Path(directory) / f"{hardware_slug(hardware)}.jsonl"


def resolve_auto(results_records: list[RunRecord], source: str, directory: Path = DEFAULT_DIR) -> Path:
    """The committed baseline for the hardware the results were measured on (on a CI runner: this machine)."""
    hardware = single_hardware(results_records, source)
    path = baseline_path(hardware, directory)
    if not path.is_file():
        have = sorted(p.name for p in Path(directory).glob("*.jsonl")) if Path(directory).is_dir() else []
        raise BaselineError(f"no baseline for hardware {hardware!r}: {path} does not exist "
                            f"(baselines present: {', '.join(have) or 'none'}). "
                            f"Fix: promote one from a trusted run with `bench baseline promote {source}`")
    return path


def promote(results: Path | list[Path], directory: Path = DEFAULT_DIR) -> tuple[Path, list[RunRecord]]:
    """Write the latest run of every (cell, repeat) of one or more results folders as the baseline for their
    hardware.

    Several trusted runs (nights, or sessions on the same runner type) make a better baseline than one:
    repeats within one run share that run's conditions (the host's other load, clocks, the card), so only
    a baseline spanning runs lets the run-level test see how far whole runs drift apart. Each folder's
    repeats are renumbered after the previous folder's (folder 2's repeat 0 becomes repeat 3 where folder 1
    had 3), so that every run stays a run of its own. An existing baseline for that hardware is replaced
    whole; git keeps the previous one.
    """
    folders = [results] if isinstance(results, (str, Path)) else list(results)
    records: list[RunRecord] = []
    for folder in folders:
        runs = latest_runs(load_any(folder))
        offset = max((r.repeat for r in records), default=-1) + 1
        records += [r.model_copy(update={"repeat": r.repeat + offset}) for r in runs]
    hardware = single_hardware(records, ", ".join(map(str, folders)))
    path = baseline_path(hardware, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(r.model_dump_json() + "\n" for r in records))
    os.replace(tmp, path)  # never a half-written baseline in the repository
    return path, records


def describe(records: list[RunRecord]) -> str:
    """One line: cells, runs, statuses, card, commits: what a promotion just wrote."""
    statuses = Counter(r.status for r in records)
    cells = len({r.cell_id for r in records})
    shas = sorted({str(r.env.get("git_sha")) for r in records})
    return (f"{cells} cells, {len(records)} runs ({', '.join(f'{n} {s}' for s, n in statuses.items())}) "
            f"on {records[0].env.get('hardware')}, git {', '.join(shas)}")
