"""Baselines: the records of several trusted nights of a matrix, one file per hardware, kept in the repository.

    bench nightly matrices/nightly.yaml --no-verdict        (3 or more times: each run is one night)
    bench baseline promote results/nightly/<hw>/<night-1> <night-2> <night-3>
                                                         -> results/baselines/<hardware-slug>.jsonl
    bench check RESULTS --baseline auto                    -> compares against that file

A baseline file is a plain runs.jsonl (the same RunRecord lines, every launch kept, raw per-step times
included) so that ``bench check`` re-derives every figure from it exactly as from fresh results; each line
also carries ``night``: the name of the folder (one night) it was promoted from, because the gate compares
tonight with the spread between nights (bench/check/gate.py). The file is named after the hardware the records
were measured on (``env.hardware``: GPU model and count, or the CPU), so one repository can hold a baseline
per CI runner type and ``auto`` picks the right one.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

from bench.records import RunRecord, RUNS_FILE, SCHEMA_VERSION, SchemaError, latest_runs, load_records
from bench.worker.slowdown import injected_slowdown

DEFAULT_DIR = Path("results/baselines")
MIN_NIGHTS = 3  # fewer nights cannot say how far nights wander (t with nights-1 degrees of freedom)


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
                            f"Fix: record 3 or more nights on that machine (`bench nightly MATRIX --no-verdict`), "
                            f"then `bench baseline promote NIGHT_DIR...`")
    return path


def night_of(record: RunRecord) -> str | None:
    """The night a baseline record came from (absent in records not promoted, and in old baselines)."""
    return getattr(record, "night", None)


def load_nights(paths: list[Path]) -> list[RunRecord]:
    """Records of several nights, each record carrying its ``night``, the latest run of each (cell, repeat)
    of each night: a results folder is one night named after the folder; a baseline file keeps the nights
    its records carry (a file without them counts as one night, named after the file)."""
    records: list[RunRecord] = []
    names: set[str] = set()
    for path in map(Path, paths):
        name = path.name if path.name not in names else str(path)
        names.add(name)
        by_night: dict[str, list[RunRecord]] = {}
        for r in load_any(path):
            by_night.setdefault(night_of(r) or name, []).append(r)
        for night, runs in by_night.items():
            records += [RunRecord.model_validate({**r.model_dump(), "night": night}) for r in latest_runs(runs)]
    return records


def validate_nights(records: list[RunRecord], source: str, min_nights: int = MIN_NIGHTS) -> list[str]:
    """The nights of a baseline; too few, or a night slowed on purpose (--slow-step), is bad input."""
    nights = sorted({night_of(r) or "" for r in records})
    if len(nights) < min_nights:
        raise BaselineError(
            f"{source}: {len(nights)} night(s) ({', '.join(n or '<unnamed>' for n in nights)}); a baseline needs "
            f"at least {min_nights} to tell a change from the spread between nights. Fix: record more nights on "
            f"this machine (`bench nightly MATRIX --no-verdict`), then `bench baseline promote NIGHT1 NIGHT2 "
            f"NIGHT3 ...` (each folder one night)")
    slowed = sorted({night_of(r) or "" for r in records if injected_slowdown(r)})
    if slowed:
        raise BaselineError(f"{source}: night(s) {', '.join(slowed)} were slowed on purpose (--slow-step) and "
                            "cannot be a baseline. Fix: promote nights run without --slow-step")
    return nights


def promote(nights: Path | list[Path], directory: Path = DEFAULT_DIR,
            min_nights: int = MIN_NIGHTS) -> tuple[Path, list[RunRecord]]:
    """Write the latest run of every (cell, repeat) of each night folder as the baseline for their hardware.

    Each record keeps its night (the folder's name) so that the check can tell the spread between nights
    from the spread between launches of one night. Repeats are renumbered after the previous night's (night
    2's repeat 0 becomes repeat 3 where night 1 had 3), so that every launch stays one of its own. An existing
    baseline for that hardware is replaced whole; git keeps the previous one.
    """
    folders = [nights] if isinstance(nights, (str, Path)) else list(nights)
    source = ", ".join(map(str, folders))
    records = _renumber(load_nights(folders))
    hardware = single_hardware(records, source)
    validate_nights(records, source, min_nights)
    path = baseline_path(hardware, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(r.model_dump_json() + "\n" for r in records))
    os.replace(tmp, path)  # never a half-written baseline in the repository
    return path, records


def _renumber(records: list[RunRecord]) -> list[RunRecord]:
    """Repeats made unique over nights, in order: each night's after the previous night's highest."""
    out: list[RunRecord] = []
    offset, night, top = 0, object(), -1
    for r in records:
        if night_of(r) != night:
            night, offset = night_of(r), top + 1
        out.append(r.model_copy(update={"repeat": r.repeat + offset}))
        top = max(top, r.repeat + offset)
    return out


def describe(records: list[RunRecord]) -> str:
    """One line: cells, runs, statuses, card, commits: what a promotion just wrote."""
    statuses = Counter(r.status for r in records)
    cells = len({r.cell_id for r in records})
    shas = sorted({str(r.env.get("git_sha")) for r in records})
    nights = sorted({str(night_of(r)) for r in records})
    return (f"{len(nights)} nights ({', '.join(nights)}), {cells} cells, {len(records)} runs "
            f"({', '.join(f'{n} {s}' for s, n in statuses.items())}) on {records[0].env.get('hardware')}, "
            f"git {', '.join(shas)}")
