"""One writer per results folder: a second run stops (or waits), a dead run's lock is taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from bench.launch import folder_lock
from bench.launch.folder_lock import FolderBusy, hold, read_holder
from conftest import bench, write_matrix


def test_second_holder_is_refused_with_the_holder_named(tmp_path):
    with hold(tmp_path):
        with pytest.raises(FolderBusy) as err:
            with hold(tmp_path):
                pass
    message = str(err.value)
    assert f"pid {os.getpid()}" in message and "--wait-for-lock" in message and "--results" in message


def test_released_lock_names_nobody_and_can_be_taken_again(tmp_path):
    with hold(tmp_path):
        assert read_holder(tmp_path)["pid"] == os.getpid()
    assert read_holder(tmp_path) == {}
    with hold(tmp_path):
        pass


def test_lock_of_a_dead_run_is_taken_over(tmp_path):
    # A run killed with SIGKILL: the kernel dropped its flock, the file still names it.
    code = ("import os, sys; from bench.launch.folder_lock import hold\n"
            f"cm = hold({str(tmp_path)!r}); cm.__enter__(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True)
    dead_pid = read_holder(tmp_path)["pid"]
    assert dead_pid != os.getpid()
    taken = []
    with hold(tmp_path, on_takeover=taken.append):
        assert read_holder(tmp_path)["pid"] == os.getpid()
    assert len(taken) == 1 and f"pid {dead_pid}" in taken[0]


def test_waiting_run_gets_the_folder_once_the_holder_is_done(tmp_path):
    entered, release = threading.Event(), threading.Event()

    def holder():
        with hold(tmp_path):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    entered.wait(10)
    waited = []
    threading.Timer(0.3, release.set).start()
    with hold(tmp_path, wait=True, poll_s=0.05, on_wait=waited.append):
        assert release.is_set()  # it could only get here after the holder let go
    t.join()
    assert len(waited) == 1 and f"pid {os.getpid()}" in waited[0]


def test_bench_run_into_a_held_folder_stops_before_launching(tmp_path):
    matrix = write_matrix(tmp_path, strategy="ddp", gpus=1)
    results = tmp_path / "results"
    with hold(results):
        proc = bench("run", str(matrix), "--results", str(results))
    assert proc.returncode == 2, proc.stderr
    assert "being written by another bench run" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    assert not (results / "runs.jsonl").exists()
    assert json.loads((results / folder_lock.LOCK_FILE).read_text() or "{}") == {}
