"""Each node's NVML sampler on a real card: run as the batch script runs it, stopped with SIGTERM.

    pytest -m gpu tests/gpu/test_node_sampler_gpu.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

pynvml = pytest.importorskip("pynvml")


def _has_nvml() -> bool:
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:  # noqa: BLE001 - no driver: a CPU machine
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_nvml(), reason="needs an NVIDIA GPU (NVML)")]


def test_a_node_sampler_samples_its_card_until_sigterm_and_writes_the_summary(tmp_path):
    out, ranks = tmp_path / "nvml-node-0.json", tmp_path / "ranks"
    ranks.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "SLURM_NODEID": "0", "SLURMD_NODENAME": "n1"}
    proc = subprocess.Popen([sys.executable, "-m", "bench.machine.node_sampler", str(out), "--gpus", "1",
                             "--ranks", str(ranks)], env=env)
    try:
        deadline = time.time() + 30
        while not (out.exists() and json.loads(out.read_text())["state"] == "sampling"):
            assert proc.poll() is None and time.time() < deadline, "the sampler did not start sampling"
            time.sleep(0.1)
        t0 = time.time()
        time.sleep(1.0)
        (ranks / "rank0.json").write_text(json.dumps({"rank": 0, "timed_window": [t0, time.time()]}))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    data = json.loads(out.read_text())
    assert (data["state"], data["node"], data["available"]) == ("done", "n1", True)
    [gpu] = data["summary"]["per_gpu"]
    assert gpu["samples"] >= 10 and gpu["mem_total_bytes"] > 0 and gpu["power_mean_w"] > 0
    assert data["summary"]["timed_window"][0] == pytest.approx(t0)
