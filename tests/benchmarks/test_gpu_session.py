"""benchmarks/gpu_session.sh's matrix steps never write into the committed H100 folders (results/llama8b,
results/llama-full): they need a results folder of their own, which they pass to bench run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _session(tmp_path: Path, *steps: str) -> str:
    # BENCH_INSTALLED: skip the script's install of .whl/ (the GPU image's wheels, absent from a clean clone but
    # present in a developer's tree, built for another Python)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "BENCH_INSTALLED": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", str(tmp_path / "out"), *steps], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_llama_steps_need_a_folder_and_refuse_the_h100_ones(tmp_path):
    out = _session(tmp_path, "llama8b", "llama-full=llama-full", "llama8b-1gpu=llama8b@gpus=1")
    skipped = [line for line in out.splitlines() if "skipped: name a new results folder" in line]
    assert [line.split(":")[0] for line in skipped] == ["=== llama8b", "=== llama-full", "=== llama8b-1gpu"]
    assert "bench.cli run" not in out  # nothing launched


def test_llama_steps_run_into_the_folder_named(tmp_path):
    """The filter selects no cell, so bench stops at once (exit 2) on any machine, after the step said its command."""
    out = _session(tmp_path, "llama8b-1gpu=llama8b-t@model=none", "llama-full=llama-full-t@model=none")
    assert ("python3 -m bench.cli run matrices/llama8b.yaml --results results/llama8b-t --only gpus=1 --only model=none"
            in out)
    assert "python3 -m bench.cli run matrices/llama-full.yaml --results results/llama-full-t --only model=none" in out
    assert not (REPO / "results" / "llama8b-t").exists() and not (REPO / "results" / "llama-full-t").exists()


def test_the_host_pace_step_maps_the_machine_into_the_session_folder(tmp_path):
    """No GPU needed: the step pins itself to CPUs; on this machine's first CPU only, to stay short."""
    out = _session(tmp_path, "host-pace=0")
    assert "=== host-pace: python3 benchmarks/host_pace.py" in out and "suspected siblings" in out
    assert (tmp_path / "out" / "host-pace.json").exists() and (tmp_path / "out.tgz").exists()
