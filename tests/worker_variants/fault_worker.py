"""bench.worker with one injected fault, used by tests through the real launch path.

    bench run matrix.yaml --worker fault_worker      (tests/worker_variants/ on PYTHONPATH)

The fault is chosen by environment variables, which `accelerate launch` passes on to every rank:

    BENCH_FAULT        oom | stuck | kill | host_oom | host_alloc | ignore_term | orphan | slow | build_lock
                       (unset: a normal run)
    BENCH_FAULT_RANK   the rank that fails (default 1; "all" for every rank)
    BENCH_FAULT_STEP   the training step at which it fails (default 1)
    BENCH_FAULT_SIGNAL the signal name for ``kill`` (default SIGKILL)
    BENCH_FAULT_CGROUP for ``host_oom``: a memory cgroup (made by the test, with a small limit) to join
    BENCH_FAULT_SLEEP_S for ``slow``: seconds to sleep (default 5); for ``host_alloc``: how long to wait to be
                       killed (default 60)
    BENCH_FAULT_MIB    for ``host_alloc``: MiB of host memory to allocate and touch (default 1024)
    BENCH_FAULT_PLAN   JSON {"<train.seed>": {"fault": ..., "rank": ..., "signal": ...}}: a different fault
                       per cell of one matrix (cells told apart by their seed); a seed not listed runs clean;
                       a key "mb<N>" picks the cells of micro-batch N (train.micro_batch auto's step-down)

Everything else is the real worker: real accelerate, real model, real collectives. The fault replaces
nothing but one call of ``train_step`` on the chosen rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import bench.worker.train as worker


def chosen_fault(seed: int, micro_batch: int | None = None) -> dict:
    """The fault for this cell: BENCH_FAULT_PLAN (JSON, by train.seed or "mb<N>") first, then the plain variables."""
    plan = json.loads(os.environ.get("BENCH_FAULT_PLAN", "{}"))
    spec = plan.get(str(seed), plan.get(f"mb{micro_batch}", {} if plan else {"fault": os.environ.get("BENCH_FAULT", "")}))
    return {"fault": spec.get("fault", ""), "rank": str(spec.get("rank", os.environ.get("BENCH_FAULT_RANK", "1"))),
            "step": int(spec.get("step", os.environ.get("BENCH_FAULT_STEP", "1"))),
            "signal": spec.get("signal", os.environ.get("BENCH_FAULT_SIGNAL", "SIGKILL"))}


def _sleep_forever() -> None:
    while True:
        time.sleep(3600)


def inject(fault: dict) -> None:
    """Do the chosen fault here, in the middle of a training step."""
    if fault["fault"] == "oom":
        # What the caching allocator raises; the worker must classify it from its type, not its text.
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by fault_worker)")
    if fault["fault"] == "stuck":
        # This rank stops making progress; its peer waits in the next collective until the
        # collective timeout (limits.collective_timeout_s) or the hang watchdog ends it.
        _sleep_forever()
    if fault["fault"] == "kill":
        os.kill(os.getpid(), getattr(signal, fault["signal"]))
        time.sleep(5)  # a signal with a handler may take a moment
    if fault["fault"] == "host_oom":
        # Join a memory cgroup with a small limit and allocate past it: the kernel's OOM killer SIGKILLs us.
        Path(os.environ["BENCH_FAULT_CGROUP"], "cgroup.procs").write_text(str(os.getpid()))
        hog = [bytearray(16 * 2**20) for _ in range(64)]
        raise RuntimeError(f"host_oom fault: allocated {len(hog) * 16} MiB without being killed")
    if fault["fault"] == "host_alloc":
        # Allocate and touch host memory past a limit someone else enforces (Slurm's --mem, polled by its
        # jobacct_gather plugin), then wait to be killed; a limit that never acts fails the rank.
        hog = bytearray(int(os.environ.get("BENCH_FAULT_MIB", "1024")) * 2**20)
        for i in range(0, len(hog), 4096):
            hog[i] = 1
        time.sleep(float(os.environ.get("BENCH_FAULT_SLEEP_S", "60")))
        raise RuntimeError(f"host_alloc fault: touched {len(hog) // 2**20} MiB without being killed")
    if fault["fault"] == "ignore_term":
        # A rank that ignores SIGTERM (a process stuck in the driver): only SIGKILL ends it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"fault_worker: pid {os.getpid()} ignores SIGTERM", file=sys.stderr, flush=True)
        _sleep_forever()
    if fault["fault"] == "orphan":
        # A helper process that escapes the launcher's tree; the runner must still find and end it.
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if fault["fault"] == "build_lock":
        # Stopped in the middle of a DeepSpeed op build: torch's build lock taken (as cpp_extension.load
        # takes it, in TORCH_EXTENSIONS_DIR) and never released.
        from torch.utils.file_baton import FileBaton

        build = Path(os.environ["TORCH_EXTENSIONS_DIR"], "py_fault", "fault_op")
        build.mkdir(parents=True, exist_ok=True)
        assert FileBaton(str(build / "lock")).try_acquire()
        _sleep_forever()
    if fault["fault"] == "slow":
        time.sleep(float(os.environ.get("BENCH_FAULT_SLEEP_S", "5")))


def faulty(train_step):
    calls = {"n": 0}

    def step(cell, *args, **kwargs):
        fault = chosen_fault(cell.train.seed, cell.train.micro_batch)
        rank, _ = worker.world()
        if fault["fault"] and calls["n"] == fault["step"] and fault["rank"] in ("all", str(rank)):
            inject(fault)
        calls["n"] += 1
        return train_step(cell, *args, **kwargs)

    return step


worker.train_step = faulty(worker.train_step)

if __name__ == "__main__":
    sys.exit(worker.main())
