"""bench.worker with a deterministic regression injected, used by tests through the real launch path.

    bench run matrix.yaml --worker slow_worker      (tests/worker_variants/ on PYTHONPATH)

Environment variables (``accelerate launch`` passes them on to every rank):

    BENCH_SLOWDOWN       fraction, e.g. 0.10: every training step on every rank then sleeps for 10% of
                         that step's own compute time, inside the timed window. A sleep proportional to
                         the step's compute keeps the injected change at the same relative size however
                         loaded the machine is, so a test can ask for "10% slower" and get it.
    BENCH_STEP_SLEEP_MS  a fixed wait (ms) added to every step before the slowdown is applied. It makes
                         the step's time stable from run to run whatever else the machine runs, as a
                         GPU step is, so that a test on a shared CPU can tell a 10% change from noise.
    BENCH_EXTRA_RSS_MIB  host memory (MiB) each rank allocates and touches before its first step, held
                         to the end: a real rise of the host RSS peak, as a memory regression would show.

Everything else is the real worker: real accelerate, real model, real collectives.
"""

from __future__ import annotations

import os
import sys
import time

import bench.worker.train as worker

SLOWDOWN = float(os.environ.get("BENCH_SLOWDOWN", "0"))
STEP_SLEEP_S = float(os.environ.get("BENCH_STEP_SLEEP_MS", "0")) / 1000
EXTRA_RSS_MIB = int(os.environ.get("BENCH_EXTRA_RSS_MIB", "0"))
_ballast: list[bytearray] = []  # kept alive for the whole run so the peak RSS includes it


def slowed(train_step):
    def step(*args, **kwargs):
        if EXTRA_RSS_MIB and not _ballast:
            # bytearray(n) is zero-filled by calloc and may not be resident; writing makes it real RSS.
            block = bytearray(EXTRA_RSS_MIB * 2**20)
            block[::4096] = b"\x01" * len(block[::4096])
            _ballast.append(block)
        t0 = time.perf_counter()
        result = train_step(*args, **kwargs)
        if STEP_SLEEP_S:
            time.sleep(STEP_SLEEP_S)
        if SLOWDOWN:
            time.sleep(SLOWDOWN * (time.perf_counter() - t0))
        return result

    return step


worker.train_step = slowed(worker.train_step)

if __name__ == "__main__":
    sys.exit(worker.main())
