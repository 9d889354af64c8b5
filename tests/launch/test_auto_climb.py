"""train.micro_batch auto's climb (issue 21): after an ok launch whose measured reserved peak leaves room, the
estimator corrected by its error there proposes a larger micro-batch, launched while that helps.

The real ``run_auto`` and estimator; the launch is the seam: it returns RunRecords whose largest rank's reserved
peak follows a rule per test, for the cell of the 2x H200 evidence (results/kernels-h200: llama-3.1-8b LoRA
zero1 x1 GPU, 48 GiB cap, Liger; proposed 19 and ran ok at 40.28 GiB reserved, the estimator 12.6 % over).
"""

from __future__ import annotations

import json

import pytest

from conftest import REPO

from bench.estimate import predict
from bench.estimate.auto_batch import climb, with_micro_batch
from bench.launch.auto_batch import MAX_LAUNCHES, AutoCell, first_choices, run_auto, step_down
from bench.launch.plan import build_plan
from bench.launch.runner import CellInterrupted
from bench.records import RunRecord
from bench.spec import CellSettings, Limits

GIB = 2**30
CAP = 48.0
LABEL = "llama-3.1-8b lora zero1 x1gpu cap48G liger mb-auto"


@pytest.fixture(scope="module")
def cell() -> CellSettings:
    for line in (REPO / "results" / "kernels-h200" / "runs.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["label"] == LABEL:
            return CellSettings.model_validate(record["settings"])
    raise AssertionError(f"{LABEL} not in results/kernels-h200")


def prediction(cell: CellSettings, mb: int):
    return predict(with_micro_batch(cell, mb), capacity_gib=CAP, capacity_source="gpu_memory_gib")


def predicted(cell: CellSettings, mb: int) -> float:
    return prediction(cell, mb).peak_reserved_gib


def fits(cell: CellSettings, gib: float) -> bool:
    return gib * (1 + prediction(cell, 1).fit_margin) <= CAP


class Launches:
    """The launch seam: ``outcome(mb) -> (status, reserved peak GiB)``; remembers each call."""

    def __init__(self, cell: CellSettings, outcome, interrupt_at: int | None = None):
        self.cell, self.outcome, self.interrupt_at = cell, outcome, interrupt_at
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, plan, measured_fit: bool) -> RunRecord:
        mb = plan.cell.train.micro_batch
        self.calls.append((mb, measured_fit))
        status, gib = self.outcome(mb)
        if mb == self.interrupt_at:
            status = "interrupted"
        record = RunRecord(matrix="m", cell_id=plan.cell.cell_id, label=plan.cell.label,
                           settings=plan.cell.model_dump(mode="json"), status=status, started_at=0.0,
                           wall_s=float(mb), cell_dir=str(plan.cell_dir),
                           ranks=[{"rank": 0, "torch_peak_reserved_bytes": int(gib * GIB)}] if gib else [])
        if status == "interrupted":  # as bench/launch/runner.py does: the concrete launch's record
            raise CellInterrupted(record)
        return record


def auto_cell(cell: CellSettings, tmp_path, proposed: int = 19, repeat: int = 0) -> AutoCell:
    def plan_for(mb: int):
        return build_plan(with_micro_batch(cell, mb), tmp_path, Limits(), repeat, port=0,
                          parent_visible_devices=None)

    return AutoCell(cell, repeat, proposed, CAP, "gpu_memory_gib", plan_for)


def shifted(cell: CellSettings, gib: float, extra_per_sample: float = 0.0, oom_from: int | None = None):
    """Measured = predicted - ``gib`` (+ ``extra_per_sample`` per sample above 19); oom over the cap or from
    ``oom_from`` on (the allocator refusing to grow past the cap)."""
    def outcome(mb: int):
        measured = predicted(cell, mb) - gib + extra_per_sample * (mb - 19)
        if measured > CAP or (oom_from is not None and mb >= oom_from):
            return "oom", None
        return "ok", measured
    return outcome


def largest_with(cell: CellSettings, corrected) -> int:
    return max(mb for mb in range(1, 200) if fits(cell, corrected(mb)))


def test_an_ok_launch_with_room_climbs_to_the_largest_corrected_fit(cell, tmp_path):
    launches = Launches(cell, shifted(cell, 5.0))  # the estimator 5 GiB over at every micro-batch
    record = run_auto(auto_cell(cell, tmp_path), launches)
    auto = record.micro_batch_auto
    target = largest_with(cell, lambda mb: predicted(cell, mb) - 5.0)  # the corrected prediction, by hand
    assert target > 19
    assert [(t["mb"], t["status"]) for t in auto["trail"]] == [(19, "ok"), (target, "ok")]
    assert auto["chosen"] == target and auto["stopped"] == "next predicted not to fit"
    assert auto["trail"][1]["corrected_gib"] == pytest.approx(predicted(cell, target) - 5.0, abs=0.01)
    assert record.wall_s == target and record.status == "ok"  # the measurement is the largest ok launch's
    assert record.cell_id == cell.cell_id and record.label == LABEL
    assert record.settings["train"]["micro_batch"] == "auto"
    # the climb is launched although the estimator alone does not say it fits; the proposal is not forced
    assert launches.calls == [(19, False), (target, True)]
    assert not prediction(cell, target).fits


def test_a_climb_that_runs_out_of_memory_stops_and_the_largest_ok_launch_is_the_record(cell, tmp_path):
    launches = Launches(cell, shifted(cell, 5.0, oom_from=20))
    record = run_auto(auto_cell(cell, tmp_path), launches)
    auto = record.micro_batch_auto
    assert [t["status"] for t in auto["trail"]] == ["ok", "oom"] and auto["trail"][1]["mb"] > 19
    assert auto["chosen"] == 19 and auto["stopped"] == "oom above"
    assert record.status == "ok" and record.wall_s == 19  # the mb-19 launch's record, with the oom in its trail
    assert auto["trail"][0]["peak_gib"] == pytest.approx(predicted(cell, 19) - 5.0, abs=0.001)
    assert auto["trail"][1]["peak_gib"] is None


def test_no_climb_when_the_next_micro_batch_is_predicted_not_to_fit(cell, tmp_path):
    # measured just under what fits with the margin: the estimator's growth to 20 does not fit any more
    at_19 = CAP / (1 + prediction(cell, 1).fit_margin) - 0.1
    launches = Launches(cell, shifted(cell, predicted(cell, 19) - at_19))
    record = run_auto(auto_cell(cell, tmp_path), launches)
    auto = record.micro_batch_auto
    assert auto["trail"] == [{"mb": 19, "status": "ok", "peak_gib": pytest.approx(at_19, abs=0.001)}]
    assert auto["chosen"] == 19 and auto["stopped"] == "next predicted not to fit"
    assert launches.calls == [(19, False)]


def test_the_climb_stops_at_the_launch_cap(cell, tmp_path):
    # the estimator over-predicts the growth itself: every measurement leaves room again
    launches = Launches(cell, lambda mb: ("ok", 30.0 + 0.01 * mb))
    record = run_auto(auto_cell(cell, tmp_path), launches)
    auto = record.micro_batch_auto
    mbs = [t["mb"] for t in auto["trail"]]
    assert len(mbs) == MAX_LAUNCHES and mbs == sorted(set(mbs))  # every launch climbed
    assert auto["stopped"] == "launch cap" and auto["chosen"] == mbs[-1] and record.wall_s == mbs[-1]


def test_no_climb_past_the_estimators_search_bound(cell, tmp_path):
    from bench.estimate.auto_batch import MAX_MICRO_BATCH

    launches = Launches(cell, lambda mb: ("ok", 30.0))
    auto = run_auto(auto_cell(cell, tmp_path, proposed=MAX_MICRO_BATCH), launches).micro_batch_auto
    assert auto["stopped"] == "search bound" and auto["chosen"] == MAX_MICRO_BATCH and len(launches.calls) == 1


def test_an_oom_at_the_proposal_steps_down_then_climbs_below_it(cell, tmp_path):
    launches = Launches(cell, shifted(cell, 5.0, oom_from=19))
    record = run_auto(auto_cell(cell, tmp_path), launches)
    auto = record.micro_batch_auto
    assert [(t["mb"], t["status"]) for t in auto["trail"]] == [(19, "oom"), (15, "ok"), (18, "ok")]
    assert auto["chosen"] == 18 and auto["stopped"] == "oom above" and record.wall_s == 18


def test_a_crash_at_a_climb_ends_the_search_on_the_largest_ok_launch(cell, tmp_path):
    measured = shifted(cell, 5.0)
    launches = Launches(cell, lambda mb: measured(mb) if mb == 19 else ("crash", None))
    auto = run_auto(auto_cell(cell, tmp_path), launches).micro_batch_auto
    assert [t["status"] for t in auto["trail"]] == ["ok", "crash"]
    assert auto["chosen"] == 19 and auto["stopped"] == "crash above"
    first = run_auto(auto_cell(cell, tmp_path), Launches(cell, lambda mb: ("hang", None)))
    assert first.status == "hang" and first.micro_batch_auto["stopped"] == "hang"
    assert first.micro_batch_auto["chosen"] is None


def test_a_later_repeat_reuses_the_first_choice_and_does_not_climb(cell, tmp_path):
    first = run_auto(auto_cell(cell, tmp_path), Launches(cell, shifted(cell, 5.0)))
    reuse = first_choices([first])[cell.cell_id]
    assert reuse == (first.micro_batch_auto["chosen"], 0) and reuse[0] > 19
    launches = Launches(cell, shifted(cell, 5.0))
    again = run_auto(auto_cell(cell, tmp_path, repeat=1), launches, reuse=reuse)
    auto = again.micro_batch_auto
    assert [(t["mb"], t["status"], t.get("reused_from_repeat")) for t in auto["trail"]] == [(reuse[0], "ok", 0)]
    assert auto["chosen"] == reuse[0] and auto["stopped"] == "reused"
    assert launches.calls == [(reuse[0], True)]  # above the proposal: a measurement said it fits


def test_the_growth_measured_between_two_ok_launches_guards_the_climb(cell):
    steep = climb(cell, CAP, "gpu_memory_gib", [(19, 34.0), (21, 40.0)])  # 3 GiB a sample measured
    alone = climb(cell, CAP, "gpu_memory_gib", [(21, 40.0)])  # the estimator's growth only
    growth = predicted(cell, 22) - predicted(cell, 21)
    assert growth < 3.0  # the measured growth is the steeper here
    assert steep[0] == largest_with(cell, lambda mb: 40.0 + max(3.0 * (mb - 21),
                                                                 predicted(cell, mb) - predicted(cell, 21)))
    assert alone[0] == largest_with(cell, lambda mb: 40.0 + predicted(cell, mb) - predicted(cell, 21))
    assert 21 < steep[0] < alone[0]
    assert climb(cell, CAP, "gpu_memory_gib", [(21, 40.0)], below=23)[0] == 22  # never at or above an oom


def test_an_interrupted_launch_is_recorded_as_the_auto_cell_with_its_trail(cell, tmp_path):
    from bench.launch.campaign import finished_runs
    from bench.records.store import latest_runs

    climb_to = largest_with(cell, lambda mb: predicted(cell, mb) - 5.0)
    launches = Launches(cell, shifted(cell, 5.0), interrupt_at=climb_to)  # Ctrl-C during the climb's launch
    with pytest.raises(CellInterrupted) as stopped:
        run_auto(auto_cell(cell, tmp_path), launches)
    record = stopped.value.record
    assert record.status == "interrupted"
    assert record.cell_id == cell.cell_id and record.label == LABEL
    assert record.settings["train"]["micro_batch"] == "auto"
    auto = record.micro_batch_auto
    assert [(t["mb"], t["status"]) for t in auto["trail"]] == [(19, "ok"), (climb_to, "interrupted")]
    assert auto["stopped"] == "interrupted" and auto["chosen"] is None
    assert first_choices([record]) == {}  # no later repeat reuses an interrupted search
    # resume runs the cell again, and its finished record then replaces the interrupted one: one cell
    assert (cell.cell_id, 0) not in finished_runs([record], retry_failed=False)
    done = run_auto(auto_cell(cell, tmp_path), Launches(cell, shifted(cell, 5.0)))
    assert (cell.cell_id, 0) in finished_runs([record, done], retry_failed=False)
    assert latest_runs([record, done]) == [done]


def ctrl_c_at(launches: Launches, mb_stopped: int):
    """The launch seam with Ctrl-C arriving before the launch at ``mb_stopped`` starts (between two launches:
    nothing running, so no runner turns it into a record)."""
    def launch(plan, measured_fit: bool) -> RunRecord:
        if plan.cell.train.micro_batch == mb_stopped:
            raise KeyboardInterrupt
        return launches(plan, measured_fit)
    return launch


def test_ctrl_c_between_two_launches_keeps_the_finished_ones_as_the_interrupted_record(cell, tmp_path):
    climb_to = largest_with(cell, lambda mb: predicted(cell, mb) - 5.0)
    with pytest.raises(CellInterrupted) as stopped:
        run_auto(auto_cell(cell, tmp_path), ctrl_c_at(Launches(cell, shifted(cell, 5.0)), climb_to))
    record = stopped.value.record
    assert record.status == "interrupted" and "between two launches" in record.error.message
    assert record.cell_id == cell.cell_id and record.settings["train"]["micro_batch"] == "auto"
    auto = record.micro_batch_auto
    assert [(t["mb"], t["status"]) for t in auto["trail"]] == [(19, "ok")]  # the ok launch is not lost
    assert auto["stopped"] == "interrupted" and auto["chosen"] is None
    assert record.ranks[0]["torch_peak_reserved_bytes"] == int((predicted(cell, 19) - 5.0) * GIB)


def test_ctrl_c_after_an_oom_keeps_the_oom_launch_in_the_trail(cell, tmp_path):
    with pytest.raises(CellInterrupted) as stopped:  # oom at the proposal, Ctrl-C before the step down
        run_auto(auto_cell(cell, tmp_path), ctrl_c_at(Launches(cell, shifted(cell, 0.0, oom_from=19)), step_down(19)))
    auto = stopped.value.record.micro_batch_auto
    assert [(t["mb"], t["status"]) for t in auto["trail"]] == [(19, "oom")]
    assert stopped.value.record.status == "interrupted"


def test_ctrl_c_before_the_first_launch_has_nothing_to_record(cell, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_auto(auto_cell(cell, tmp_path), ctrl_c_at(Launches(cell, shifted(cell, 5.0)), 19))
