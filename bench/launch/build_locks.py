"""Build locks that a stopped cell leaves behind in torch's extension cache.

DeepSpeed builds its ops (CPU Adam, shm comm) on first use with ``torch.utils.cpp_extension.load``, which
takes a lock by creating ``<extensions root>/<build>/<op>/lock`` and deletes it when the build ends. A cell
stopped during that build (start-up limit, timeout, Ctrl-C, a rank killed) never deletes it, and every later
cell that needs the op then waits on it for ever: each is recorded as a hang and the rest of the matrix
measures nothing. The lock holds no process id, so a lock is judged by its age: one created after the
stopped cell started was the cell's own (bench runs one cell at a time per results folder; two runs building
the same op at once on one host, e.g. two lanes, is the case this cannot tell apart).
"""

from __future__ import annotations

import os
from pathlib import Path


def extensions_root() -> Path:
    """Where torch builds extensions: TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions."""
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "torch_extensions"


def locks_created_since(started_at: float, root: Path | None = None) -> list[Path]:
    root = extensions_root() if root is None else root
    if not root.is_dir():
        return []
    found = []
    for lock in root.rglob("lock"):
        try:
            if lock.is_file() and lock.stat().st_mtime >= started_at:
                found.append(lock)
        except OSError:  # removed meanwhile
            continue
    return sorted(found)


def release_locks_left_by(started_at: float, root: Path | None = None) -> list[Path]:
    """Delete the build locks created since ``started_at`` (a stopped cell's start); returns those deleted."""
    released = []
    for lock in locks_created_since(started_at, root):
        try:
            lock.unlink()
            released.append(lock)
        except FileNotFoundError:
            continue
    return released
