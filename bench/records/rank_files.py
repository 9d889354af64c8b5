"""The files a rank leaves for the runner: a heartbeat per step, a report at the end, an error on failure.

Everything is written atomically (temp file + rename) so the runner never reads half a file, even if the
rank is killed mid-write.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# How a collective that waited past its timeout fails: gloo ("Timed out waiting 30000ms for recv
# operation"), NCCL ("Watchdog caught collective operation timeout"), torch's DistBackendError wrappers.
COLLECTIVE_TIMEOUT_MARKERS = ("timed out waiting", "collective operation timeout", "operation timed out")


def classify_exception(exc: BaseException) -> str:
    """oom | collective_timeout | unsupported | interrupted | crash, from what the exception is."""
    import torch

    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return "oom"
    if any(m in text.lower() for m in COLLECTIVE_TIMEOUT_MARKERS):
        return "collective_timeout"
    if isinstance(exc, (NotImplementedError,)) or "not supported" in text.lower():
        return "unsupported"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return "crash"


class RankFiles:
    def __init__(self, folder: Path, rank: int):
        self.folder = folder
        self.rank = rank
        folder.mkdir(parents=True, exist_ok=True)

    def heartbeat(self, phase: str, step: int = -1) -> None:
        atomic_write_json(self.folder / f"heartbeat{self.rank}.json",
                          {"rank": self.rank, "phase": phase, "step": step, "time": time.time(),
                           "pid": os.getpid()})

    def write_report(self, report: dict) -> None:
        atomic_write_json(self.folder / f"rank{self.rank}.json", report)

    def write_error(self, kind: str, exc: BaseException, tb: str) -> None:
        atomic_write_json(self.folder / f"error{self.rank}.json", {
            "rank": self.rank, "kind": kind, "type": type(exc).__name__,
            "message": str(exc)[:2000], "traceback": tb[-8000:], "time": time.time()})


def read_json_files(folder: Path, prefix: str) -> list[dict]:
    out = []
    for path in sorted(folder.glob(f"{prefix}*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(out, key=lambda d: d.get("rank", 0))
