"""train.micro_batch auto: the estimator's proposal (unit) and the launch's step-down on an out-of-memory
(real launches of the tiny model through the fault worker, which raises torch's OOM at micro-batch 4). The
climb above an ok launch: tests/launch/test_auto_climb.py."""

from __future__ import annotations

import json

import pytest

from conftest import WORKER_VARIANTS

from bench.estimate import predict
from bench.estimate.auto_batch import propose, with_micro_batch
from bench.launch.auto_batch import AutoCell, first_choices, run_auto, step_down
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


@pytest.mark.launch_aside
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

    record = run_auto(AutoCell(cell, 0, 4, 1.0, "test", plan_for), lambda p, _measured_fit: run_plan(p, "t", {}))
    trail = record.micro_batch_auto["trail"]
    assert [(t["mb"], t["status"]) for t in trail] == [(4, "oom"), (3, "ok")]
    assert record.micro_batch_auto["chosen"] == 3 and record.status == "ok"
    assert record.micro_batch_auto["stopped"] == "oom above"  # 4 ran out of memory: no climb between
    assert record.cell_id == cell.cell_id and record.settings["train"]["micro_batch"] == "auto"
    assert {s["tokens"] for s in record.ranks[0]["steps"]} == {3 * 32}  # the launch measured ran micro-batch 3
    # a later repeat starts at the first ok launch's choice: no probe from the proposal, the trail says so
    reuse = first_choices([record])[cell.cell_id]
    assert reuse == (3, 0)
    again = run_auto(AutoCell(cell, 1, 4, 1.0, "test", plan_for), lambda p, _measured_fit: run_plan(p, "t", {}), reuse=reuse)
    assert again.micro_batch_auto["trail"] == [{"mb": 3, "status": "ok", "peak_gib": None, "reused_from_repeat": 0}]
    assert again.micro_batch_auto["chosen"] == 3 and again.micro_batch_auto["reused_from_repeat"] == 0


def test_first_choices_are_each_auto_cells_lowest_ok_repeat():
    from bench.records import RunRecord

    def record(cell_id, repeat, status, chosen):
        return RunRecord(matrix="m", cell_id=cell_id, label=cell_id, settings={}, status=status, started_at=0.0,
                         wall_s=1.0, repeat=repeat, micro_batch_auto={"proposed": 8, "trail": [], "chosen": chosen})

    records = [record("a", 1, "ok", 6), record("a", 0, "ok", 8), record("a", 2, "oom", None),
               record("b", 0, "crash", None), record("b", 1, "ok", 4), record("c", 0, "oom", None)]
    assert first_choices(records) == {"a": (8, 0), "b": (4, 1)}


def test_an_auto_cell_has_no_single_prediction_and_a_record_is_predicted_at_its_choice():
    from bench.estimate import predict_for_record
    from bench.records import RunRecord

    cell = CellSettings.model_validate(LLAMA8B_LORA)
    with pytest.raises(ValueError, match="train.micro_batch auto"):
        predict(cell)
    record = RunRecord(matrix="m", cell_id=cell.cell_id, label=cell.label, settings=cell.model_dump(mode="json"),
                       status="ok", started_at=0.0, wall_s=1.0,
                       micro_batch_auto={"proposed": 6, "trail": [{"mb": 6, "status": "ok"}], "chosen": 6})
    assert predict_for_record(record).peak_reserved_gib == predict(with_micro_batch(cell, 6)).peak_reserved_gib
    none_fit = record.model_copy(update={"micro_batch_auto": {"proposed": 2, "trail": [], "chosen": None}})
    assert predict_for_record(none_fit) is None


def test_estimate_shows_each_auto_cell_at_its_proposal(tmp_path):
    from bench.spec import expand, load_matrix
    from conftest import bench, write_matrix

    matrix = write_matrix(tmp_path, "auto", **{k: v for k, v in LLAMA8B_LORA.items() if k != "train"},
                          train={**LLAMA8B_LORA["train"]}, grid={"kernels": ["none", "liger"]})
    rows = json.loads(bench("estimate", str(matrix), "--capacity-gib", "80", "--json", check=True).stdout)
    plain, liger = (propose(cell, 80.0, "x")[0] for cell in expand(load_matrix(matrix)))
    assert [r["name"] for r in rows] == [f"llama-3.1-8b lora ddp x1gpu mb {plain} (auto)",
                                         f"llama-3.1-8b lora ddp x1gpu liger mb {liger} (auto)"]
    refused = bench("estimate", str(matrix))
    assert refused.returncode == 2 and "--capacity-gib" in refused.stderr + refused.stdout
