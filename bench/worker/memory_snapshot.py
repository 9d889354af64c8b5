"""A PyTorch memory snapshot of a cell's first steps, to check the memory estimator's allocator replay
(bench/estimate/replay/) against the real caching allocator: which stream held how much, free and allocated,
when the reserved peak was reached (benchmarks/memory_snapshot_peak.py reads it; pytorch.org/memory_viz too).

Off unless the worker's environment sets ``BENCH_MEMORY_SNAPSHOT=1`` (``bench run --memory-snapshot``; not a cell
setting, so the cell keeps its id). On a CUDA rank, the allocator's history (every alloc, free and segment
event, no tracebacks: the file stays small) is recorded from just before the first step and written after the
warm-up's last step, at most the replay's three steps, to ``<ranks folder>/memory-snapshot-rank<k>.pickle``;
then recording stops. Only warm-up steps are covered, so the timed steps pay nothing; with no warm-up step
there is no snapshot, and the rank report says why.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

ENV = "BENCH_MEMORY_SNAPSHOT"
STEPS = 3  # the estimator's replay: the first step creates the optimizer states, the next see where they landed
MAX_ENTRIES = 2_000_000  # events kept; a 1B full fine-tuning step records tens of thousands


def launch_env(on: bool) -> dict[str, str]:
    """What ``bench run --memory-snapshot`` adds to a launch's environment (nothing when off)."""
    return {ENV: "1"} if on else {}


def requested() -> bool:
    return os.environ.get(ENV, "").strip() == "1"


class SnapshotStep:
    """``one_step``, with the allocator's history recorded over the first ``steps`` calls and written after."""

    def __init__(self, one_step: Callable[[], dict], steps: int, path: Path):
        self.one_step, self.steps, self.path = one_step, steps, path
        self.calls = 0
        self.snapshot: dict = {"steps": steps, "path": str(path), "written": False}
        torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python",
                                                 max_entries=MAX_ENTRIES)

    def __call__(self) -> dict:
        parts = self.one_step()
        self.calls += 1
        if self.calls == self.steps:
            torch.cuda.synchronize()
            torch.cuda.memory._dump_snapshot(str(self.path))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.snapshot.update(written=True, bytes=self.path.stat().st_size)
        return parts


def unavailable(warmup_steps: int, device: torch.device) -> str | None:
    """Why a snapshot asked for cannot be taken on this rank, or None when it can."""
    if device.type != "cuda":
        return "not a CUDA rank"
    return "no warm-up step to cover (train.warmup_steps 0)" if warmup_steps < 1 else None


def from_env(one_step: Callable[[], dict], warmup_steps: int, device: torch.device, rank_dir: Path,
             rank: int) -> Callable[[], dict]:
    """``one_step`` itself unless a snapshot was asked for and can be taken on this rank."""
    if not requested() or unavailable(warmup_steps, device):
        return one_step
    return SnapshotStep(one_step, min(STEPS, warmup_steps), Path(rank_dir) / f"memory-snapshot-rank{rank}.pickle")


def describe(one_step, warmup_steps: int, device: torch.device) -> dict | None:
    """For the rank report: what the snapshot covered and where it is, or why there is none; None when off."""
    while one_step is not None and not isinstance(one_step, SnapshotStep):  # under --slow-step's wrapper
        one_step = getattr(one_step, "one_step", None)
    if one_step is not None:
        return one_step.snapshot
    if requested():
        return {"written": False, "why": unavailable(warmup_steps, device)}
    return None
