"""The process tree of one launch: every process it started, found, stopped and accounted for.

`accelerate launch` starts torchrun, and torchrun starts each rank in a session of its own
(``start_new_session=True``), so signalling the launcher's process group does not reach the ranks. The
tree is therefore tracked by ancestry: the launch runs in its own session, its descendants are noted
while they live, and this process becomes a child subreaper (Linux prctl) so that orphans whose parent
died are re-parented to us instead of init and stay findable. Stopping sends SIGTERM to every member,
waits, then SIGKILLs what is left; ``leftovers`` finds and kills anything still alive after a cell.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time

import psutil

PR_SET_CHILD_SUBREAPER = 36
_subreaper_set = False


def become_subreaper() -> bool:
    """Orphans of our descendants get re-parented to this process (not init), so none escapes tracking."""
    global _subreaper_set
    if not _subreaper_set:
        try:
            _subreaper_set = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        except (OSError, AttributeError):  # not Linux: fall back to ancestry and session tracking alone
            _subreaper_set = False
    return _subreaper_set


def _key(p: psutil.Process) -> tuple[int, float]:
    """(pid, start time): a pid alone may be reused by an unrelated process."""
    return p.pid, p.create_time()


def _describe(p: psutil.Process) -> dict:
    try:
        return {"pid": p.pid, "name": p.name(), "cmdline": " ".join(p.cmdline())[:300]}
    except psutil.Error:
        return {"pid": p.pid}


class ProcessTree:
    """Start a command in its own session and keep track of everything it spawns."""

    def __init__(self, argv: list[str], env: dict[str, str], log_file, cwd: str | None = None):
        become_subreaper()
        self.started = time.time()
        self.proc = subprocess.Popen(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd or os.getcwd())
        self.root_pid = self.proc.pid
        self._seen: dict[tuple[int, float], psutil.Process] = {}
        self.note_descendants()

    # ------------------------------------------------------------ membership

    def note_descendants(self) -> None:
        """Record the current descendants; called while the launch runs, so short-lived parents don't hide any."""
        for p in self._candidates():
            try:
                self._seen.setdefault(_key(p), p)
            except psutil.Error:
                continue

    def _candidates(self) -> list[psutil.Process]:
        """Our descendants that started with or after the launch: the launch's tree, and (as subreaper)
        any orphan of it re-parented to us. One scan of the process table."""
        try:
            kids = psutil.Process().children(recursive=True)
        except psutil.Error:
            return []
        return [k for k in kids if _created_after(k, self.started)]

    def members(self) -> list[psutil.Process]:
        """Live, non-zombie processes of the tree: seen descendants, current descendants, the launch's session."""
        self.note_descendants()
        live = {}
        for key, p in self._seen.items():
            if _alive(p) and _key_safe(p) == key:
                live[p.pid] = p
        for p in psutil.process_iter():
            if p.pid not in live and _in_session(p.pid, self.root_pid) and _alive(p):
                live[p.pid] = p
        live.pop(os.getpid(), None)
        return list(live.values())

    @property
    def pids(self) -> set[int]:
        return {pid for pid, _ in self._seen}

    # ------------------------------------------------------------ stopping

    def stop(self, grace_s: float) -> None:
        """SIGTERM the whole tree, wait up to grace_s, SIGKILL what is left. A second Ctrl-C skips the wait."""
        try:
            self._signal_all(signal.SIGTERM)
            self._wait_gone(grace_s)
        except KeyboardInterrupt:
            pass
        finally:
            self._signal_all(signal.SIGKILL)
            self._wait_gone(5.0)
            self.reap()

    def leftovers(self) -> list[dict]:
        """After a cell: SIGKILL and describe any process of the tree still alive (there should be none)."""
        left = self.members()
        described = [_describe(p) for p in left]
        for p in left:
            _send(p, signal.SIGKILL)
        psutil.wait_procs(left, timeout=5)
        self.reap()
        return described

    def reap(self) -> None:
        """Collect exit statuses: the launch's (for its return code) and those of orphans re-parented to us."""
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for p in psutil.Process().children():
            if p.pid != self.root_pid and p.pid in self.pids:
                try:
                    if p.status() == psutil.STATUS_ZOMBIE:
                        os.waitpid(p.pid, os.WNOHANG)
                except (psutil.Error, ChildProcessError):
                    continue

    def _signal_all(self, sig: int) -> None:
        try:
            os.killpg(self.root_pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in self.members():
            _send(p, sig)

    def _wait_gone(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            self.proc.poll()  # reap the launch itself so it doesn't linger as a zombie
            if not self.members():
                return
            time.sleep(0.1)


def _created_after(p: psutil.Process, t: float) -> bool:
    try:
        return p.create_time() >= t - 1.0
    except psutil.Error:
        return False


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _key_safe(p: psutil.Process) -> tuple[int, float] | None:
    try:
        return _key(p)
    except psutil.Error:
        return None


def _in_session(pid: int, sid: int) -> bool:
    try:
        return os.getsid(pid) == sid
    except OSError:
        return False


def _send(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass
