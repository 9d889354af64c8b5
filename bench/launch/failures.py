"""Why a cell failed: its status (ok, oom, timeout, hang, crash, unsupported, interrupted) and the error.

The evidence, strongest first: what the watchdog did (timeout, hang, Ctrl-C); the error files the ranks
wrote for their own exceptions; the launcher's account of ranks that died by a signal (torchrun's
failure summary, or accelerate's single-process launcher); the host's OOM-kill counters; the log.
A rank killed by SIGKILL is a host OOM only when the kernel's OOM-kill counter rose during the cell
(or the kernel log names its pid); otherwise it is a crash of that rank.
"""

from __future__ import annotations

import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.records import CellError, rank_files

LOG_TAIL_LINES = 40
TEARDOWN_SIGNALS = {signal.SIGTERM, signal.SIGINT}  # what a launcher sends the other ranks once one failed


@dataclass
class Outcome:
    """What the watchdog saw while the launch ran; turned into a status by classify()."""

    returncode: int | None = None
    stopped_by: str | None = None  # "timeout" | "hang" | "interrupted" | None
    first_step_at: float | None = None
    stopped_at: float = float("inf")  # when the watchdog or Ctrl-C began stopping the tree
    extra: dict = field(default_factory=dict)
    oom_kills_before: dict[str, int] = field(default_factory=dict)
    oom_kills_after: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------- the launcher's account

@dataclass(frozen=True)
class RankExit:
    rank: int
    exitcode: int
    pid: int | None = None

    @property
    def signal(self) -> signal.Signals | None:
        try:
            return signal.Signals(-self.exitcode) if self.exitcode < 0 else None
        except ValueError:
            return None


# torchrun's ChildFailedError summary: "rank : 1 (local_rank: 1)\n  exitcode : -9 (pid: 3616)"
_TORCHRUN_FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)"
                               r"(?:\s*\(pid:\s*(\d+)\))?")
# accelerate's one-process launcher raises CalledProcessError: "... died with <Signals.SIGKILL: 9>."
_SIMPLE_DIED = re.compile(r"died with <Signals\.(\w+): (\d+)>")
_SIMPLE_EXIT = re.compile(r"returned non-zero exit status (\d+)")


_NCCL_WATCHDOG = re.compile(r"\[Rank (\d+)\] Watchdog caught collective operation timeout.*")


def nccl_watchdog_timeouts(log_text: str) -> dict[int, str]:
    """Ranks whose NCCL watchdog gave up on a collective (limits.collective_timeout_s), with its line."""
    return {int(m.group(1)): m.group(0)[:500] for m in _NCCL_WATCHDOG.finditer(log_text)}


def launcher_failures(log_text: str) -> list[RankExit]:
    """Ranks the launcher saw fail, with their exit codes (negative: killed by that signal)."""
    exits = [RankExit(int(r), int(code), int(pid) if pid else None)
             for r, code, pid in _TORCHRUN_FAILURE.findall(log_text)]
    if not exits and (m := _SIMPLE_DIED.search(log_text)):
        exits = [RankExit(0, -int(m.group(2)))]
    elif not exits and (m := _SIMPLE_EXIT.search(log_text)):
        exits = [RankExit(0, int(m.group(1)))]
    return exits


def killed_by_signal(exits: list[RankExit]) -> RankExit | None:
    """The rank that died by a signal of its own (not the launcher's teardown of the others)."""
    own = [e for e in exits if e.signal is not None and e.signal not in TEARDOWN_SIGNALS]
    return own[0] if own else None


_PORT_TAKEN = re.compile(r".*(?:EADDRINUSE|[Aa]ddress already in use).*")


def rendezvous_port_taken(outcome: Outcome, log_path: Path, rank_dir: Path) -> str | None:
    """The log line, when the launch failed only because its rendezvous port was taken: the launcher exited
    with an error, by itself, before any rank wrote a heartbeat, and its log says the address was in use.
    Not the cell's failure: the same launch on a free port is the cell's real run (bench/launch/runner.py)."""
    if outcome.stopped_by is not None or outcome.returncode in (0, None):
        return None
    if rank_files.read_json_files(rank_dir, "heartbeat"):
        return None
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    found = _PORT_TAKEN.search(text)
    return found.group(0).strip()[:300] if found else None


# ---------------------------------------------------------------- the host's OOM killer

def _own_cgroup_paths() -> list[str]:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    return [line.split(":", 2)[2] for line in lines if line.count(":") >= 2]


def oom_kill_counters() -> dict[str, int]:
    """Every readable kernel counter of OOM kills: this cgroup's (v2 memory.events, v1 memory.oom_control)
    and the whole host's (/proc/vmstat). A rise during a cell means the kernel OOM killer acted."""
    files = [Path("/proc/vmstat"), Path("/sys/fs/cgroup/memory.events")]
    for rel in _own_cgroup_paths():
        rel = rel.lstrip("/")
        files += [Path("/sys/fs/cgroup") / rel / "memory.events",
                  Path("/sys/fs/cgroup/memory") / rel / "memory.oom_control"]
    counters = {}
    for path in files:
        try:
            for line in path.read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == "oom_kill":
                    counters[str(path)] = int(value)
        except (OSError, ValueError):
            continue
    return counters


def oom_killed_pids_in_kernel_log() -> set[int] | None:
    """Pids the kernel log says the OOM killer killed; None when the log cannot be read (no privilege)."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return {int(p) for p in re.findall(r"Killed process (\d+)", out.stdout)}


def host_oom_evidence(outcome: Outcome, pid: int | None) -> str | None:
    """Why we believe the host's OOM killer killed this rank, or None if nothing says so."""
    rose = [src for src, n in outcome.oom_kills_after.items() if n > outcome.oom_kills_before.get(src, n)]
    if rose:
        return f"the kernel's OOM-kill counter rose during the cell ({', '.join(rose)})"
    if pid is not None and (killed := oom_killed_pids_in_kernel_log()) and pid in killed:
        return f"the kernel log says the OOM killer killed pid {pid}"
    return None


# ---------------------------------------------------------------- logs

def log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def root_cause_lines(log_path: Path) -> str:
    """The lines of a crash log that say why: exception lines and the frames just before them."""
    try:
        text = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    keys = ("Error", "error:", "Exception", "Traceback", "Killed", "Signal", "signal", "exitcode")
    hits = [i for i, line in enumerate(text) if any(k in line for k in keys)]
    keep = sorted({j for i in hits[:20] for j in range(max(0, i - 1), min(len(text), i + 2))})  # a hit may be the last line
    return "\n".join(text[j] for j in keep)[-4000:]


# ---------------------------------------------------------------- which rank

def suspect_rank(rank_dir: Path, errors: list[dict], world: int) -> int | None:
    """The rank that held the others up: one that never beat, else the one furthest behind in steps.

    Ranks that reported a collective timeout were waiting for someone else, so they are not suspects.
    None when the heartbeats cannot tell (several ranks stopped at the same step).
    """
    beats = {b["rank"]: b for b in rank_files.read_json_files(rank_dir, "heartbeat")}
    waiting = {e["rank"] for e in errors if e.get("kind") == "collective_timeout"}
    candidates = [r for r in range(world) if r not in waiting] or list(range(world))
    silent = [r for r in candidates if r not in beats]
    if silent:  # still starting up: the one that never beat, if the others did
        return silent[0] if len(silent) == 1 else None
    lowest = min(beats[r].get("step", -1) for r in candidates)
    behind = [r for r in candidates if beats[r].get("step", -1) == lowest]
    return behind[0] if len(behind) == 1 else None


def _dead_rank(rank_dir: Path, world: int) -> int | None:
    done = {r["rank"] for r in rank_files.read_json_files(rank_dir, "rank")}
    missing = [r for r in range(world) if r not in done]
    return missing[0] if missing else None


# ---------------------------------------------------------------- the verdict

def classify(outcome: Outcome, rank_dir: Path, world: int, limits, log_path: Path) -> tuple[str, CellError | None]:
    tail = log_tail(log_path)
    if outcome.stopped_by == "interrupted":
        return "interrupted", CellError(kind="interrupted", message="stopped by Ctrl-C (or SIGTERM to bench)",
                                        log_tail=tail)
    log_text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    # NCCL's watchdog aborts a rank that waited too long in a collective (SIGABRT, no Python exception):
    # count those like the gloo timeouts the ranks report themselves.
    errors = rank_files.read_json_files(rank_dir, "error") + [
        {"rank": r, "kind": "collective_timeout", "type": "NCCL watchdog", "message": line, "time": 0}
        for r, line in nccl_watchdog_timeouts(log_text).items()]
    waiting = {e["rank"] for e in errors if e["kind"] == "collective_timeout"}
    exits = launcher_failures(log_text)
    if outcome.stopped_by in ("timeout", "hang"):
        # Signals after the stop were ours; an error a rank wrote before it is the root cause instead.
        before = [e for e in errors if e["kind"] != "collective_timeout" and e.get("time", 0) < outcome.stopped_at]
        if not before:
            return outcome.stopped_by, _watchdog_error(outcome, rank_dir, errors, world, limits, tail)
        errors, exits = before, []
    dead = killed_by_signal([e for e in exits if e.rank not in waiting])
    # A rank's own failure is the root cause even when the others then hung waiting for it.
    if ooms := [e for e in errors if e["kind"] == "oom"]:
        return "oom", _rank_error("oom", min(ooms, key=lambda e: e.get("time", 0)), tail)
    if dead:
        return _signal_death(outcome, dead, tail)
    if errors:
        return _from_error_files(errors, rank_dir, world, limits, tail)
    reports = rank_files.read_json_files(rank_dir, "rank")
    if outcome.returncode == 0 and len(reports) == world:
        return "ok", None
    rank = exits[0].rank if exits else _dead_rank(rank_dir, world)
    return "crash", CellError(
        kind="crash", rank=rank,
        message=f"exit code {outcome.returncode}; {len(reports)}/{world} rank reports\n{root_cause_lines(log_path)}",
        log_tail=tail)


def _watchdog_error(outcome, rank_dir, errors, world, limits, tail) -> CellError:
    rank = suspect_rank(rank_dir, errors, world)
    who = f"rank {rank} furthest behind" if rank is not None else "no single rank behind (heartbeats tied)"
    if outcome.stopped_by == "timeout":
        return CellError(kind="timeout", rank=rank, message=f"wall clock over {limits.timeout_s:g} s "
                         f"(limits.timeout_s); {who}", log_tail=tail)
    what = outcome.extra.get("hang_phase", "no step progress")
    limit, key = (limits.startup_s, "startup_s") if "start-up" in what else (limits.hang_s, "hang_s")
    return CellError(kind="hang", rank=rank, message=f"{what} for {limit:g} s (limits.{key}); {who}", log_tail=tail)


def _rank_error(kind: str, err: dict, tail: str, message: str | None = None) -> CellError:
    return CellError(kind=kind, rank=err["rank"], message=message or f"{err['type']}: {err['message']}",
                     log_tail=tail, traceback=err.get("traceback", "")[-3000:])


def _signal_death(outcome: Outcome, dead: RankExit, tail: str) -> tuple[str, CellError]:
    name = dead.signal.name
    if dead.signal == signal.SIGKILL and (why := host_oom_evidence(outcome, dead.pid)):
        return "oom", CellError(kind="oom", rank=dead.rank, message=f"rank {dead.rank} was SIGKILLed by the host's "
                                f"OOM killer: {why} (host memory: CPU offload, pinned buffers)", log_tail=tail)
    return "crash", CellError(kind="crash", rank=dead.rank, message=f"rank {dead.rank} killed by {name} "
                              f"(exit code {dead.exitcode}) with no error of its own", log_tail=tail, signal=name)


def _from_error_files(errors, rank_dir, world, limits, tail) -> tuple[str, CellError]:
    timeouts = [e for e in errors if e["kind"] == "collective_timeout"]
    if len(timeouts) == len(errors):
        # Every error is a rank giving up on a collective: some other rank stopped making progress.
        rank = suspect_rank(rank_dir, errors, world)
        first = min(timeouts, key=lambda e: e.get("time", 0))
        return "hang", _rank_error("hang", {**first, "rank": rank}, tail, (
            f"rank {first['rank']} timed out in a collective after limits.collective_timeout_s; "
            f"{'rank ' + str(rank) if rank is not None else 'a peer'} stopped making progress. "
            f"{first['type']}: {first['message'][:500]}"))
    # The first rank to fail is the cause; the others often fail after it, in a collective.
    first = min((e for e in errors if e["kind"] != "collective_timeout"), key=lambda e: e.get("time", 0))
    kind = first["kind"] if first["kind"] == "unsupported" else "crash"
    return kind, _rank_error(kind, first, tail)
