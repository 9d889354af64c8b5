"""One writer per results folder.

Two `bench run` into one folder at once would both run every cell, time each other on the same GPUs and
write duplicate records. While a run writes a folder it holds an exclusive lock on ``<folder>/.lock``
(``flock``: the kernel drops it when the holder dies, however it dies, so a lock left by a dead run is
simply taken over). The file also says who holds it (pid, host, start time, command) so that the second
run can name the holder in its message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from bench.spec import MatrixError

LOCK_FILE = ".lock"


class FolderBusy(MatrixError):
    """Another live run holds the folder; the CLI exits 2 with the message, nothing launched."""


def _holder_text(info: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started_at", 0)))
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {when}: {info.get('command', '?')}"


def read_holder(folder: Path) -> dict:
    """What the lock file says about its last holder ({} if nothing readable)."""
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
            "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    os.fsync(fd)


@contextmanager
def hold(folder: Path, wait: bool = False, poll_s: float = 2.0, on_wait=None, on_takeover=None):
    """Hold the folder's lock for the block; raise FolderBusy if a live run holds it (or wait, if asked).

    ``on_wait(text)`` is called once when waiting starts; ``on_takeover(text)`` when the lock file names a
    holder that no longer holds it (a run that died): the lock is taken over.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            holder = _holder_text(read_holder(folder))
            if not wait:
                raise FolderBusy(f"results folder {folder} is being written by another bench run ({holder}). "
                                 "Fix: wait for it to finish, run with --wait-for-lock, or choose another "
                                 "folder with --results")
            if on_wait:
                on_wait(holder)
            while not _try_lock(fd):
                time.sleep(poll_s)
        elif (stale := read_holder(folder)) and on_takeover:
            on_takeover(_holder_text(stale))
        _write_holder(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a released lock names nobody
    finally:
        os.close(fd)  # closing the descriptor releases the flock
