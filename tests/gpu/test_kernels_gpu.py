"""GPU cells of issue 21 (run by the lead on a CUDA machine; Liger's needs `pip install -e '.[kernels]'`): Liger
applied and read back from the built model, torch.compile through accelerate under ddp, zero1, zero3 and fsdp2,
micro_batch auto's one record."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import bench, write_matrix

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_liger = pytest.mark.skipif(not importlib.util.find_spec("liger_kernel"), reason="pip install -e '.[kernels]'")


def run_records(tmp_path, **fields) -> list[dict]:
    matrix = write_matrix(tmp_path, name="k", device="cuda", **fields)
    bench("run", str(matrix), "--results", str(tmp_path / "res"), check=True, timeout=1800)
    return [json.loads(line) for line in (tmp_path / "res" / "runs.jsonl").read_text().splitlines()]


@needs_liger
def test_liger_is_applied_and_the_output_holds_no_logits(tmp_path):
    records = run_records(tmp_path, train={"seq_len": 256, "steps": 3, "timing": {"max_steps": 3, "max_timed_s": 20}},
                          grid={"kernels": ["liger"], "strategy": ["ddp", "zero1"]})
    for r in records:
        assert r["status"] == "ok", r.get("error")
        kernels = r["ranks"][0]["kernels"]
        assert kernels["liger_modules"].get("LigerRMSNorm", 0) > 0
        assert "liger" in kernels["causal_lm_forward"]


def test_compile_through_accelerate_keeps_compilation_out_of_the_timed_steps(tmp_path):
    gpus = [n for n in (1, 2) if n <= torch.cuda.device_count()]
    records = run_records(tmp_path, train={"seq_len": 256, "compile": True, "warmup_steps": 2, "steps": 5,
                                           "timing": {"max_steps": 5, "max_timed_s": 30}},
                          grid={"strategy": ["ddp", "zero1", "zero3", "fsdp2"], "gpus": gpus})
    for r in records:
        assert r["status"] == "ok", (r["label"], r.get("error"))
        for rank in r["ranks"]:
            assert rank["compile"]["layers"] > 0 and rank["compile"]["compile_s"] > 0
            assert not rank["compile"]["compiled_in_timed_steps"], r["label"]


@needs_liger
def test_liger_with_compile_runs(tmp_path):
    """Both fast paths together: Liger's patched modules inside the compiled layers."""
    (r,) = run_records(tmp_path, train={"seq_len": 256, "kernels": "liger", "compile": True, "warmup_steps": 2,
                                        "steps": 5, "timing": {"max_steps": 5, "max_timed_s": 30}})
    assert r["status"] == "ok", r.get("error")
    assert r["ranks"][0]["kernels"]["liger_modules"] and r["ranks"][0]["compile"]["compile_s"] > 0


def test_auto_micro_batch_is_one_record_with_its_trail(tmp_path):
    records = run_records(tmp_path, gpu_memory_gib=8, train={"seq_len": 512, "micro_batch": "auto", "steps": 3,
                                                             "timing": {"max_steps": 3, "max_timed_s": 20}})
    assert len(records) == 1
    auto = records[0]["micro_batch_auto"]
    ok = [t["mb"] for t in auto["trail"] if t["status"] == "ok"]
    assert auto["proposed"] >= 1 and ok and auto["chosen"] == max(ok)
    assert records[0]["ranks"][0]["steps"][0]["tokens"] == auto["chosen"] * 512  # the record is the chosen launch's
    assert auto["stopped"] and len(auto["trail"]) <= 5  # why the climb ended, within MAX_LAUNCHES
