"""A cell stopped during a DeepSpeed op build must not leave the build locked for the cells after it."""

from __future__ import annotations

import os
import time

import pytest
from conftest import bench, write_matrix
from torch.utils.file_baton import FileBaton

from bench.launch.build_locks import locks_created_since, release_locks_left_by
from bench.records import load_records


def _take_lock(folder):
    folder.mkdir(parents=True)
    baton = FileBaton(str(folder / "lock"))  # torch's own build lock, as cpp_extension.load takes it
    assert baton.try_acquire()
    return folder / "lock"


def test_only_locks_made_since_the_cell_started_are_released(tmp_path):
    older = _take_lock(tmp_path / "py311_cpu" / "cpu_adam")
    os.utime(older, (time.time() - 3600, time.time() - 3600))  # another run's build, an hour ago
    started = time.time() - 1
    ours = _take_lock(tmp_path / "py311_cpu" / "shm_comm")
    assert locks_created_since(started, tmp_path) == [ours]
    assert release_locks_left_by(started, tmp_path) == [ours]
    assert not ours.exists() and older.exists()
    assert FileBaton(str(ours)).try_acquire()  # the next cell can build again


def test_no_extensions_folder_releases_nothing(tmp_path):
    assert release_locks_left_by(0.0, tmp_path / "absent") == []


@pytest.mark.launch_aside
def test_a_hung_cell_holding_a_build_lock_is_recorded_with_the_lock_released(tmp_path):
    """Real launch: the rank takes torch's build lock and hangs; bench stops it as a hang, deletes the lock
    and names it in the record."""
    extensions = tmp_path / "torch_extensions"
    matrix = write_matrix(tmp_path, "lock", grid={"strategy": ["ddp"], "gpus": [1]},
                          limits={"hang_s": 3, "startup_s": 120})
    proc = bench("run", str(matrix), "--results", str(tmp_path / "results"), "--worker", "fault_worker",
                 env={"BENCH_FAULT": "build_lock", "BENCH_FAULT_RANK": "0", "TORCH_EXTENSIONS_DIR": str(extensions)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [record] = load_records(tmp_path / "results")
    assert record.status == "hang", record.error
    lock = extensions / "py_fault" / "fault_op" / "lock"
    assert record.released_build_locks == [str(lock)]
    assert not lock.exists()
