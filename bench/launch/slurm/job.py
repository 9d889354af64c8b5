"""A submitted batch job that cannot outlive its caller: leaving the ``with`` block by any road (an
exception, Ctrl-C, bench's own time limit) cancels the job unless it has ended, and waits until the queue
no longer lists it.

    with SlurmJob(script, timeout_s=900) as job:
        end = job.wait()
    status = bench_status(end.info, ranks_ok=..., bench_timed_out=end.bench_timed_out)
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel

from bench.launch.slurm import commands
from bench.launch.slurm.states import JobInfo


class JobEnd(BaseModel):
    info: JobInfo
    bench_timed_out: bool  # bench cancelled it after timeout_s of running
    wait_s: float  # from submission until it left the queue
    run_s: float | None  # from the first poll that saw it RUNNING; None if it never ran


class SlurmJob:
    def __init__(self, script: Path, *, timeout_s: float | None = None, poll_s: float = 1.0,
                 cancel_wait_s: float = 60.0):
        """``timeout_s`` counts from when the job is first seen running (time pending in the queue is the
        cluster's, not the cell's); past it bench cancels the job. Slurm's own --time stays a backstop."""
        self.script = script
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.cancel_wait_s = cancel_wait_s
        self.job_id: int | None = None
        self.ended = False
        self._submitted = 0.0
        self._running_since: float | None = None

    def __enter__(self) -> SlurmJob:
        self.job_id = commands.submit(self.script)
        self._submitted = time.monotonic()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.job_id is not None and not self.ended:
            self.cancel()
        return False  # never swallow the exception (KeyboardInterrupt included)

    def state(self) -> str | None:
        """The queue's state now, None once the job left the queue."""
        state = commands.queue_state(self._id())
        if state == "RUNNING" and self._running_since is None:
            self._running_since = time.monotonic()
        return state

    def wait(self) -> JobEnd:
        """Poll until the job leaves the queue; cancel it when it runs past timeout_s."""
        timed_out = False
        while self.state() is not None:
            if (not timed_out and self.timeout_s is not None and self._running_since is not None
                    and time.monotonic() - self._running_since > self.timeout_s):
                commands.cancel(self._id())
                timed_out = True
            time.sleep(self.poll_s)
        self.ended = True
        now = time.monotonic()
        return JobEnd(info=commands.job_info(self._id()), bench_timed_out=timed_out, wait_s=now - self._submitted,
                      run_s=None if self._running_since is None else now - self._running_since)

    def cancel(self) -> None:
        """scancel, then wait (up to cancel_wait_s) until the queue no longer lists the job."""
        commands.cancel(self._id())
        deadline = time.monotonic() + self.cancel_wait_s
        while commands.queue_state(self._id()) is not None:
            if time.monotonic() > deadline:
                raise commands.SlurmError(f"job {self.job_id} still queued {self.cancel_wait_s:.0f} s after scancel")
            time.sleep(0.2)
        self.ended = True

    def _id(self) -> int:
        if self.job_id is None:
            raise RuntimeError("the job is not submitted: use SlurmJob inside a with block")
        return self.job_id
