"""Tensor and context parallelism on real GPUs through the real CLI (issue 22): tensor parallelism alone (tp2),
FSDP2 with context parallelism (fsdp2+cp2: tiny Llama and Llama-3.2-1B at 4k tokens). One `bench run` per
session; each test reads its record. Needs 2 GPUs: skipped otherwise. (FSDP2 with tensor parallelism is
refused on the installed stack: tests/strategies/test_degrees.py says why.)

    pytest -m gpu tests/gpu/test_parallel_gpu.py
"""

from __future__ import annotations

import json
import math

import pytest
import yaml

from conftest import bench

torch = pytest.importorskip("torch")
# Marked per test, not per module: the matrix's plan is checked on CPU too (test_the_gpu_matrix_plans_on_any_machine).
def needs_two_gpus(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                              reason="needs 2 CUDA GPUs")(test))

TRAIN = {"seq_len": 512, "micro_batch": 2, "precision": "bf16", "optimizer": "adamw_torch", "grad_checkpointing": True,
         "warmup_steps": 1, "steps": 3, "timing": {"max_steps": 3}}
CELLS = {  # test id -> settings beyond TRAIN
    "tp2": {"model": "tiny-llama", "strategy": "tp", "gpus": 2, "tp": 2},
    "fsdp2_cp2": {"model": "tiny-llama", "strategy": "fsdp2", "gpus": 2, "cp": 2},
    "fsdp2_cp2_1b_4k": {"model": "llama-3.2-1b", "strategy": "fsdp2", "gpus": 2, "cp": 2,
                        "train": {"seq_len": 4096, "micro_batch": 1}},
}


def settings(test_id: str) -> dict:
    # Every degree stated: an include entry inherits the matrix's top-level settings, so a cp cell that left
    # tp out ran as tp2+cp2 when the first cell (the top level) was tp2 (found on 2x H200, 2026-11-30).
    c = {"tp": 1, "cp": 1, **CELLS[test_id]}
    c["train"] = {**TRAIN, **c.get("train", {})}
    return c


def write_matrix(folder, test_ids: list[str]):
    matrix = {"name": "parallel-gpu", "device": "cuda", **settings(test_ids[0]),
              "include": [settings(t) for t in test_ids],
              "limits": {"timeout_s": 300, "hang_s": 120, "collective_timeout_s": 60, "startup_s": 240}}
    path = folder / "parallel.yaml"
    path.write_text(yaml.safe_dump(matrix, sort_keys=False))
    return path


def test_the_gpu_matrix_plans_on_any_machine(tmp_path):
    """The matrix below is planned for its 2-GPU target here (a CUDA matrix on a CPU machine is planned for
    elsewhere): each cell comes out once, under its own degrees, so a GPU session is not spent on a typo."""
    proc = bench("run", str(write_matrix(tmp_path, list(CELLS))), "--results", str(tmp_path / "results"), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for label, model in [("tp2", "tiny-llama"), ("fsdp2+cp2", "tiny-llama"), ("fsdp2+cp2", "llama-3.2-1b")]:
        assert f"{model} full {label} x2gpu" in proc.stdout, proc.stdout
    assert "tp2+cp2" not in proc.stdout


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, dict]:
    runnable = [t for t in CELLS if CELLS[t]["gpus"] <= torch.cuda.device_count()]
    folder = tmp_path_factory.mktemp("parallel-gpu")
    path = write_matrix(folder, runnable)
    proc = bench("run", str(path), "--results", str(folder / "results"), timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (folder / "results" / "runs.jsonl").read_text().splitlines()
    found = [json.loads(line) for line in lines]
    return {t: next(r for r in found if all(r["settings"].get(k) == v for k, v in CELLS[t].items() if k != "train"))
            for t in runnable}


@pytest.mark.parametrize("test_id", list(CELLS))
@needs_two_gpus
def test_parallel_cell_runs_under_its_degrees(records, test_id):
    if test_id not in records:
        pytest.skip(f"needs {CELLS[test_id]['gpus']} GPUs")
    r = records[test_id]
    assert r["status"] == "ok", json.dumps(r.get("error"), indent=1)[:4000]
    want = CELLS[test_id]
    for rank in r["ranks"]:
        # accelerate's ParallelismConfig ran the cell's degrees (the worker's guard checks it too)
        assert rank["parallel"]["tp"] == want.get("tp", 1) and rank["parallel"]["cp"] == want.get("cp", 1)
        assert rank["model_init"] == "meta, materialised per shard"
        losses = [s["loss"] for s in rank["steps"]]
        assert all(math.isfinite(x) for x in losses)
    assert r["strategy_info"]["label"] == {"tp2": "tp2", "fsdp2_cp2": "fsdp2+cp2", "fsdp2_cp2_1b_4k": "fsdp2+cp2"}[test_id]


@needs_two_gpus
def test_tensor_parallel_alone_has_a_tp_mesh_and_no_wrapper(records):
    for rank in records["tp2"]["ranks"]:
        assert rank["parallel"]["mesh"] == ["tp"] and rank["distributed_type"] == "MULTI_GPU"


@needs_two_gpus
def test_a_shared_batch_counts_once(records):
    from bench.records import RunRecord
    from bench.report import metrics

    row = metrics.figures(RunRecord.model_validate(records["fsdp2_cp2"]))
    assert row["real_tokens_per_step"] == TRAIN["micro_batch"] * TRAIN["seq_len"]  # one replica, one batch
