"""A cell this machine cannot run is an `unsupported` record with every reason; the rest of the matrix runs.
--strict refuses the whole matrix instead; a dry run plans CUDA cells for their target on any machine."""

from __future__ import annotations

import pytest

from conftest import bench, write_matrix

from bench.records import load_records
from bench.spec import Adapter, CellSettings, Train
from bench.strategies import cell_problems, check_runnable, collapse

# On CPU: ddp runs; FSDP needs GPUs; QLoRA in fp16 fails three ways (4-bit needs CUDA, fp16 on CPU, QLoRA's bf16).
MIXED = dict(grid={"strategy": ["ddp", "fsdp_full_shard"]},
             include=[{"strategy": "ddp", "adapter": {"type": "qlora"}, "precision": "fp16"}])
QLORA_FP16_REASONS = ("qlora needs a CUDA GPU", "fp16 is not supported on CPU", "qlora computes in bf16")


def test_every_reason_of_a_cell_at_once():
    cell = CellSettings(device="cpu", strategy="fsdp_full_shard", adapter=Adapter(type="qlora"),
                        train=Train(precision="fp16"))
    reasons = cell_problems(cell, visible_gpus=0)
    for expected in ("needs GPUs", *QLORA_FP16_REASONS):
        assert sum(expected in r for r in reasons) == 1, reasons
    assert check_runnable(cell, 0).splitlines() == reasons  # one reason a line
    assert check_runnable(CellSettings(device="cpu", strategy="ddp"), 0) is None


def test_gpu_count_is_held_against_a_cell_only_when_running_here():
    cell = CellSettings(device="cuda", strategy="ddp", gpus=4)
    assert "has 2 GPU(s)" in check_runnable(cell, 2)
    assert "0 GPU(s)" in check_runnable(cell, 0)
    assert check_runnable(cell, None) is None  # planned for its own target (a dry run, an estimate)


def test_identical_reasons_are_said_once_with_a_count():
    cells = [CellSettings(device="cuda", strategy=s, gpus=g) for s in ("ddp", "zero1", "zero3") for g in (1, 2)]
    lines = collapse([(c, cell_problems(c, 0)) for c in cells])
    assert lines[0].startswith("  6 cells: device: cuda but this machine has 0 GPU(s)")
    assert "and 3 more" in lines[1] and len(lines) == 2
    one = CellSettings(device="cpu", strategy="fsdp_full_shard")
    [line] = collapse([(one, cell_problems(one, 0))])
    assert one.cell_id in line and "needs GPUs" in line


def test_strict_refuses_the_matrix_naming_every_reason(tmp_path):
    matrix = write_matrix(tmp_path, **MIXED)
    proc = bench("run", str(matrix), "--results", str(tmp_path / "res"), "--strict")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "2 cell(s) cannot run on this machine" in proc.stderr
    for expected in ("needs GPUs", *QLORA_FP16_REASONS):
        assert expected in proc.stderr
    assert not (tmp_path / "res").exists()


def test_a_matrix_no_cell_of_which_can_run_is_refused(tmp_path):
    matrix = write_matrix(tmp_path, grid={"strategy": ["ddp", "zero1", "zero2"], "gpus": [1, 2]}, device="cuda")
    proc = bench("run", str(matrix), "--results", str(tmp_path / "res"))
    assert proc.returncode == 2
    assert "none of the 6 cell(s) can run" in proc.stderr
    assert proc.stderr.count("0 GPU(s)") == 1 and "6 cells:" in proc.stderr  # collapsed, not 6 lines
    assert not (tmp_path / "res").exists()


def test_dry_run_of_a_cuda_matrix_on_this_cpu_machine_plans_it_for_its_target(tmp_path):
    matrix = write_matrix(tmp_path, device="cuda", train={"precision": "bf16"},
                          grid={"strategy": ["ddp", "zero3", "fsdp_full_shard"], "gpus": [1, 2],
                                "adapter": [{"type": "none"}, {"type": "qlora", "quant_storage": "uint8"}]},
                          exclude=[{"adapter": {"type": "none"}, "strategy": "fsdp_full_shard", "gpus": 1}])
    proc = bench("run", str(matrix), "--results", str(tmp_path / "res"), "--dry-run", check=True)
    out = proc.stdout
    assert out.count("planned for a machine with 2 GPU(s); this machine has 0") == 1
    assert out.count("accelerate.commands.launch") == 9  # 11 cells; the 2 QLoRA FSDP ones with uint8 cannot run
    assert "CUDA_VISIBLE_DEVICES=0,1" in out and '"stage": 3' in out and "FSDP" in out
    assert "2 run(s) would be recorded unsupported" in out
    assert out.count("quant_storage must be bf16 under FSDP") == 1 and "2 cells:" in out
    assert not (tmp_path / "res" / "runs.jsonl").exists()


@pytest.mark.slow
def test_an_impossible_cell_is_recorded_unsupported_and_the_rest_runs(tmp_path):
    matrix = write_matrix(tmp_path, **MIXED)
    results = tmp_path / "res"
    proc = bench("run", str(matrix), "--results", str(results), check=True)
    records = {r.settings["strategy"] + "/" + r.settings["adapter"]["type"]: r for r in load_records(results)}
    assert records["ddp/none"].status == "ok" and records["ddp/none"].ranks
    fsdp, qlora = records["fsdp_full_shard/none"], records["ddp/qlora"]
    assert fsdp.status == qlora.status == "unsupported" and fsdp.error.kind == qlora.error.kind == "unsupported"
    assert "needs GPUs" in fsdp.error.message
    lines = qlora.error.message.splitlines()
    assert len(lines) == 3 and all(any(e in line for line in lines) for e in QLORA_FP16_REASONS)
    assert qlora.wall_s == 0.0 and not (results / "cells" / qlora.cell_id / "launch.log").exists()
    for expected in QLORA_FP16_REASONS:  # the progress output says every reason
        assert expected in proc.stdout
    assert "1 ok, 2 unsupported" in " ".join(proc.stdout.split())
    again = bench("run", str(matrix), "--results", str(results), check=True)  # resume: unsupported is final
    assert "nothing to run" in again.stdout
    retried = bench("run", str(matrix), "--results", str(results), "--retry-failed", check=True)
    assert "2 unsupported" in retried.stdout and len(load_records(results)) == 5  # ok stays done, the rest rerun
