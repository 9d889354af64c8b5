"""train.micro_batch auto: the estimator's proposal (unit) and the launch's step-down on an out-of-memory
(real launches of the tiny model through the fault worker, which raises torch's OOM at micro-batch 4)."""

from __future__ import annotations

import json

import pytest

from conftest import WORKER_VARIANTS

from bench.estimate import predict
from bench.estimate.auto_batch import propose, with_micro_batch
from bench.launch.auto_batch import AutoCell, run_auto, step_down
from bench.spec import CellSettings, Limits

LLAMA8B_LORA = dict(model="llama-3.1-8b", strategy="ddp", gpus=1, device="cuda",
                    adapter=dict(type="lora", r=32, alpha=16, target="all-linear"),
                    train=dict(seq_len=2048, micro_batch="auto", optimizer="adamw_bnb_8bit", grad_checkpointing=True))


def test_proposal_is_the_largest_micro_batch_predicted_to_fit():
    cell = CellSettings.model_validate(LLAMA8B_LORA)
    mb, pred = propose(cell, 80.0, "test")
    assert mb is not None and mb > 1 and pred.fits
    above = predict(with_micro_batch(cell, mb + 1), capacity_gib=80.0, capacity_source="test")
    assert not above.fits  # one more does not fit: the largest


def test_liger_proposes_a_larger_micro_batch_than_the_plain_loss():
    plain = CellSettings.model_validate(LLAMA8B_LORA)
    liger = CellSettings.model_validate({**LLAMA8B_LORA, "train": {**LLAMA8B_LORA["train"], "kernels": "liger"}})
    assert propose(liger, 80.0, "test")[0] > propose(plain, 80.0, "test")[0]


def test_no_proposal_when_micro_batch_one_does_not_fit():
    assert propose(CellSettings.model_validate(LLAMA8B_LORA), 10.0, "test") == (None, None)


def test_step_down_lowers_by_a_quarter_and_stops_below_one():
    assert [step_down(m) for m in (16, 8, 4, 3, 2, 1)] == [12, 6, 3, 2, 1, None]


@pytest.mark.slow
def test_out_of_memory_at_the_proposal_steps_down_to_one_record(tmp_path, monkeypatch):
    from bench.launch.plan import build_plan
    from bench.launch.runner import free_port, run_plan

    monkeypatch.setenv("BENCH_FAULT_PLAN", json.dumps({"mb4": {"fault": "oom", "rank": "0", "step": 0}}))
    monkeypatch.setenv("PYTHONPATH", f"{WORKER_VARIANTS}:{__import__('os').environ.get('PYTHONPATH', '')}")
    cell = CellSettings.model_validate(dict(model="tiny-llama", strategy="ddp", gpus=1, device="cpu",
                                            train=dict(seq_len=32, micro_batch="auto", warmup_steps=1, steps=2,
                                                       timing=dict(max_steps=2))))

    def plan_for(mb):
        return build_plan(with_micro_batch(cell, mb), tmp_path, Limits(), 0, "fault_worker", port=free_port())

    record = run_auto(AutoCell(cell, 0, 4, 1.0, "test", plan_for), lambda p: run_plan(p, "t", {}))
    trail = record.micro_batch_auto["trail"]
    assert [(t["mb"], t["status"]) for t in trail] == [(4, "oom"), (3, "ok")]
    assert record.micro_batch_auto["chosen"] == 3 and record.status == "ok"
    assert record.cell_id == cell.cell_id and record.settings["train"]["micro_batch"] == "auto"
    assert {s["tokens"] for s in record.ranks[0]["steps"]} == {3 * 32}  # the launch measured ran micro-batch 3
