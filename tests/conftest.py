"""Shared test helpers: write small matrices, run the real `bench` CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
WORKER_VARIANTS = TESTS / "worker_variants"  # `--worker fault_worker` / `slow_worker` import from here

# A tiny CPU cell: seconds per launch on 2 cores. Exactly 3 timed steps (train.timing.max_steps = steps):
# a shared CPU would rarely reach the ±1 % interval, and tests count on the steps they asked for.
TINY = {
    "model": "tiny-llama",
    "device": "cpu",
    "train": {"seq_len": 64, "micro_batch": 2, "precision": "fp32", "warmup_steps": 1, "steps": 3,
              "timing": {"max_steps": 3, "max_timed_s": 30}},
    "limits": {"timeout_s": 180, "hang_s": 60, "collective_timeout_s": 30, "startup_s": 150},
}


def write_matrix(folder: Path, name: str = "t", **fields) -> Path:
    """A matrix file based on TINY; nested dicts in ``fields`` are merged one level deep."""
    data = {"name": name, **{k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}}
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def bench(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None,
          check: bool = False) -> subprocess.CompletedProcess:
    """Run the real CLI (`python -m bench.cli ...`) as a user would, the fault-injecting workers importable."""
    # Keep any PYTHONPATH already set (the GPU machines bring packages through it).
    path = os.pathsep.join(p for p in [str(WORKER_VARIANTS), str(REPO), os.environ.get("PYTHONPATH", "")] if p)
    full_env = {**os.environ, "PYTHONPATH": path, "COLUMNS": "200",
                **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"bench {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def cpu_results(tmp_path_factory) -> Path:
    """Records from real CPU runs, made once per session: ddp and zero3 at 1 and 2 processes."""
    folder = tmp_path_factory.mktemp("cpu_results")
    matrix = write_matrix(folder, "cpu", grid={"strategy": ["ddp", "zero3"], "gpus": [1, 2]})
    proc = bench("run", str(matrix), "--results", str(folder / "results"), check=True)
    (folder / "run-console.txt").write_text(proc.stdout)  # what the user saw, for tests of the console
    return folder / "results"


# ---------------------------------------------------------------- what a run selected, said even under -q
# pytest -q prints no "collected ... / N selected" line, and an interrupted run's summary names only the
# deselected tests ("104 deselected in 211s"), which reads as if nothing had been selected while a selected
# test's fixture (e.g. tests/worker/test_qlora.py's GPU cells) was still running real launches.

def pytest_report_collectionfinish(config, start_path, items):
    if config.getoption("markexpr") or config.getoption("keyword"):
        return f"selected {len(items)} test(s)" + (f", the first: {items[0].nodeid}" if items else "")
    return None
