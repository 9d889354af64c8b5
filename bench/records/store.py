"""Run records: the schema (versioned), append-only JSONL storage, tolerant loading.

One line per cell run in ``results/<matrix>/runs.jsonl``. A line is written whole with one write, then
flushed and fsynced under a file lock; a torn last line (a killed writer) is skipped with a warning;
a line from a newer schema is refused rather than misread. Nothing already written is rewritten.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

SCHEMA_VERSION = 1
RUNS_FILE = "runs.jsonl"
MATRIX_COPY = "matrix.yaml"  # the matrix a results folder was last run from (informational; the report reads
                             # its token_budget)

# What became of a run (bench/launch/failures.py decides the launched ones):
#   ok; oom (CUDA OOM on any rank, or the host's OOM killer); timeout (limits.timeout_s); hang (no step
#   progress for limits.hang_s, start-up past limits.startup_s, or a collective past
#   limits.collective_timeout_s); crash (non-zero exit or a signal: rank and root cause in the error);
#   unsupported (the stack refused the combination at run time); interrupted (Ctrl-C or SIGTERM to bench);
#   predicted_oom (not launched: the estimate says it cannot fit); busy (not launched: its GPUs were in use);
#   skipped (not launched on purpose, reason in the error; cells left unrun by a stopped matrix get no record).
#   cancelled (a Slurm job that the scheduler or a person ended: scancel, preemption).
Status = Literal["ok", "oom", "timeout", "hang", "crash", "unsupported", "skipped", "interrupted", "predicted_oom", "busy",
                 "cancelled"]
# Failures that happen again on a rerun of the same cell on the same machine: resume does not retry them.
DETERMINISTIC_FAILURES = {"oom", "unsupported", "predicted_oom"}


class SchemaError(Exception):
    """A results file this version cannot read; the CLI exits 2 on it."""


class CellError(BaseModel):
    model_config = ConfigDict(extra="allow")
    kind: str
    rank: int | None = None
    message: str = ""
    log_tail: str = ""


class RunRecord(BaseModel):
    model_config = ConfigDict(extra="allow")  # newer minor fields survive a round trip

    schema_version: int = SCHEMA_VERSION
    matrix: str
    cell_id: str
    label: str
    repeat: int = 0
    settings: dict[str, Any]
    strategy_info: dict[str, Any] = {}
    status: Status
    error: CellError | None = None
    env: dict[str, Any] = {}
    ranks: list[dict[str, Any]] = []  # the rank reports as the workers wrote them
    nvml: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    started_at: float
    wall_s: float
    first_step_s: float | None = None  # launch to first heartbeat of a step
    cell_dir: str | None = None
    command: str | None = None
    # Processes of the cell found alive after it and killed (should be empty); NVML compute processes
    # left on the GPUs after it (None where NVML is absent, e.g. on CPU).
    leftover_processes: list[dict[str, Any]] = []
    leftover_gpu_processes: list[dict[str, Any]] | None = None
    # torch extension build locks (DeepSpeed op builds) this cell left when stopped, deleted after it
    # (bench/launch/build_locks.py)
    released_build_locks: list[str] = []
    # train.micro_batch auto: {proposed, capacity_gib, capacity_source, trail: [{mb, status, peak_gib,
    # corrected_gib?, reused_from_repeat?}], chosen (the largest ok mb), stopped (why the search ended; absent in
    # records from before the climb), reused_from_repeat?} (bench/launch/auto_batch.py); the record is the largest
    # ok launch's, settings keep "auto", the cell id is the auto cell's. Absent otherwise.
    micro_batch_auto: dict[str, Any] | None = None
    # A cell run as a Slurm job (launcher: slurm): job_id, node_list, nodes, state, exit_code, signal, failed_node,
    # memory_kills (slurmstepd's --mem kills: node, step, used_bytes, limit_bytes; absent in older records).
    # None locally.
    slurm: dict[str, Any] | None = None
    # Launches before this one that failed only because their rendezvous port was taken (bench/launch/runner.py):
    # [{port, error}], each attempt's log in the cell folder's attempt-<n>/. Empty when the first launch bound.
    port_retries: list[dict[str, Any]] = []


def not_launched_record(matrix: str, cell_settings: Any, repeat: int, fingerprint: dict, status: Status,
                        message: str, strategy_info: dict, **fields: Any) -> RunRecord:
    """The record of a cell bench decided not to launch (unsupported, busy, predicted_oom): why, and no figures.

    ``cell_settings`` is the cell (bench.spec.schema.CellSettings); ``fields`` are further record fields
    (prediction, cell_dir, command)."""
    return RunRecord(matrix=matrix, cell_id=cell_settings.cell_id, label=cell_settings.label, repeat=repeat,
                     settings=cell_settings.model_dump(mode="json"), strategy_info=strategy_info, status=status,
                     error=CellError(kind=status, message=message), env=fingerprint, started_at=time.time(),
                     wall_s=0.0, **fields)


def runs_path(results_dir: Path) -> Path:
    return Path(results_dir) / RUNS_FILE


def append_record(results_dir: Path, record: RunRecord) -> None:
    """Append one record as one line: whole, under a lock, flushed and fsynced before returning."""
    path = runs_path(results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (record.model_dump_json() + "\n").encode()
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _end_torn_line(fd, path)
        view = memoryview(line)
        while view:  # os.write may write less than asked (a signal, a full disk): finish the line
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    if created:
        _fsync_dir(path.parent)  # the new file's name must survive a crash too


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _end_torn_line(fd: int, path: Path) -> None:
    """If a killed writer left a line without its newline, end it so the next record stays whole."""
    size = path.stat().st_size
    if size:
        with open(path, "rb") as f:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                os.write(fd, b"\n")


def load_records(results_dir: Path) -> list[RunRecord]:
    """Every record, in the order written. A torn line (a writer killed mid-line) is skipped with a
    warning; a record from a newer schema, or one that does not parse as a record, is an error."""
    path = runs_path(results_dir)
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{n}: skipping a torn or corrupt line ({len(line)} bytes)", stacklevel=2)
            continue
        version = raw.get("schema_version", 0) if isinstance(raw, dict) else 0
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise SchemaError(f"{path}:{n}: written by a newer bench (schema {version}, this one reads "
                              f"up to {SCHEMA_VERSION}). Fix: upgrade bench, or use another results folder")
        try:
            records.append(RunRecord.model_validate(raw))
        except ValidationError as e:
            raise SchemaError(f"{path}:{n}: not a run record ({e.error_count()} problem(s), first: "
                              f"{e.errors()[0]['loc']}: {e.errors()[0]['msg']}). Fix: remove that line or "
                              f"use another results folder") from None
    return records


def latest_runs(records: list[RunRecord]) -> list[RunRecord]:
    """The last record of each (cell, repeat): what a resumed matrix ended with. Earlier ones stay on file."""
    latest: dict[tuple[str, int], RunRecord] = {}
    for r in records:
        latest[(r.cell_id, r.repeat)] = r
    return list(latest.values())


def save_matrix_copy(matrix_path: Path, results_dir: Path) -> str | None:
    """Copy the matrix file into the results folder as matrix.yaml, as it is now, when a run starts.

    matrix.yaml is always the newest copy. A different one already there (the matrix was edited between
    runs into the same folder) is not overwritten silently: it is kept beside as matrix.<its time>.yaml,
    and the returned line says so. None when nothing needed saying (new or identical copy).
    """
    results_dir = Path(results_dir)
    source = Path(matrix_path).read_bytes()
    target = results_dir / MATRIX_COPY
    results_dir.mkdir(parents=True, exist_ok=True)
    note = None
    if target.is_file():
        if target.read_bytes() == source:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(target.stat().st_mtime))
        kept = results_dir / f"matrix.{stamp}.yaml"
        n = 1
        while kept.exists():
            n += 1
            kept = results_dir / f"matrix.{stamp}-{n}.yaml"
        os.replace(target, kept)
        note = (f"{target} differed from {matrix_path}: the earlier copy is kept as {kept.name}, "
                f"{MATRIX_COPY} is now this run's matrix")
    tmp = target.with_name(f".{MATRIX_COPY}.tmp")
    tmp.write_bytes(source)
    os.replace(tmp, target)
    return note


def check_writable(results_dir: Path) -> str | None:
    """Why results cannot be written to this folder, or None. Tries a real write (as root, permission
    bits say nothing), in the folder or in its nearest existing parent, which must be a folder."""
    results_dir = Path(results_dir).absolute()
    fix = "Fix: choose another folder with --results"
    existing = next(p for p in [results_dir, *results_dir.parents] if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == results_dir else f"is inside {existing}, which is a file"
        return f"results folder {results_dir} {what}, not a folder. {fix}"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"results folder {results_dir} is not writable ({existing}: {e.strerror}). {fix} or fix its permissions"
    runs = runs_path(results_dir)
    if runs.exists() and not (runs.is_file() and os.access(runs, os.W_OK)):
        return f"{runs} exists but cannot be appended to. {fix}"
    return None
