"""The stopping rule (bench/worker/timing.py), the slowest-rank decision and the gc window of the worker's loop.

The rule is checked on known series; the loop (bench.worker.train.run_steps) runs for real in two gloo
processes whose steps take different times, and in one process for the garbage collector's window.
"""

from __future__ import annotations

import gc
import json
import math
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from bench.records import RunRecord
from bench.report import metrics
from bench.spec import CellSettings, Limits, Matrix, MatrixError, Train, check_time_budget, expand
from bench.worker.gc_window import GcWindow, POLICY
from bench.worker.timing import STOP_REASONS, StoppingRule, median_interval, order_statistic_ranks


def exact_coverage(n: int, l: int) -> float:
    """P(X_(l) <= median <= X_(n+1-l)) = 1 - 2 P(B <= l-1), B ~ Bin(n, 1/2): by hand, without scipy."""
    return 1 - 2 * sum(math.comb(n, k) for k in range(l)) / 2**n


# ---------------------------------------------------------------- the interval

@pytest.mark.parametrize("n, ranks", [(6, (1, 6)), (20, (6, 15)), (100, (40, 61))])
def test_order_statistic_ranks_match_the_binomial_tables(n, ranks):
    l, u, coverage = order_statistic_ranks(n, 0.95)
    assert (l, u) == ranks
    assert coverage == pytest.approx(exact_coverage(n, l)) and coverage >= 0.95
    assert exact_coverage(n, l + 1) < 0.95  # the tightest pair that still holds 95 %


def test_too_few_steps_have_no_interval():
    assert order_statistic_ranks(5, 0.95) is None  # (min, max) of 5 covers 93.75 %
    assert median_interval([1.0, 1.1, 0.9, 1.0, 1.2]) is None
    assert median_interval([1.0] * 5, confidence=0.9) is not None  # 93.75 % >= 90 %


def test_interval_of_known_data():
    rng = np.random.default_rng(1)
    times = rng.permutation(np.arange(1.0, 21.0))  # 1..20 in any order
    iv = median_interval(times)
    assert (iv.median, iv.low, iv.high) == (10.5, 6.0, 15.0)
    assert iv.rel_half_width == pytest.approx(max(10.5 - 6, 15 - 10.5) / 10.5)


# ---------------------------------------------------------------- the rule

RULE = StoppingRule(ci_target=0.01, confidence=0.95, min_steps=20, max_steps=300, max_timed_s=60.0)


def steady(n: int, seed: int = 0) -> list[float]:
    """A GPU-like series: 1.2 s with 0.2 % jitter."""
    return list(1.2 * (1 + 0.002 * np.random.default_rng(seed).standard_normal(n)))


def noisy(n: int, seed: int = 0) -> list[float]:
    """A shared-machine series: 20 % log-normal spread."""
    return list(1.2 * np.exp(0.2 * np.random.default_rng(seed).standard_normal(n)))


def test_steady_series_stops_at_the_minimum():
    assert RULE.stop_reason(steady(19), timed_s=23.0) is None  # below min_steps, however tight
    assert RULE.stop_reason(steady(20), timed_s=24.0) == "converged"


def test_noisy_series_goes_on():
    for n in (20, 50, 120):
        assert RULE.stop_reason(noisy(n), timed_s=0.4 * n) is None, n  # below both caps


def test_each_cap_stops_with_its_reason():
    assert RULE.stop_reason(noisy(300), timed_s=30.0) == "max_steps"
    assert RULE.stop_reason(noisy(40), timed_s=60.0) == "max_timed_s"
    # the time cap waits for the minimum of steps
    assert RULE.stop_reason(noisy(10), timed_s=120.0) is None
    assert RULE.stop_reason(noisy(20), timed_s=120.0) == "max_timed_s"


def test_stepping_until_the_rule_stops_reaches_the_target():
    """Feed a mildly noisy series one step at a time, as the worker does: it stops converged, in between."""
    rng = np.random.default_rng(7)
    times, reason = [], None
    while reason is None:
        times.append(1.2 * (1 + 0.02 * rng.standard_normal()))
        reason = RULE.stop_reason(times, timed_s=sum(times))
    summary = RULE.summary(times, sum(times), reason)
    assert reason == "converged" and 20 < len(times) < 300
    assert summary["ci_rel_half_width"] <= 0.01
    assert summary["ci_low_s"] <= summary["median_s"] <= summary["ci_high_s"]
    assert summary["median_s"] == pytest.approx(float(np.median(times)))


def test_summary_of_a_capped_cell_keeps_its_interval():
    times = noisy(300)
    s = RULE.summary(times, 200.0, RULE.stop_reason(times, 200.0))
    assert s["stop_reason"] == "max_steps" and s["stop_reason"] in STOP_REASONS
    assert s["timed_steps"] == 300 and s["ci_rel_half_width"] > 0.01  # stopped short of the target, says so
    assert {"rule", "ci_target", "confidence", "min_steps", "max_steps", "max_timed_s", "median_s", "ci_low_s",
            "ci_high_s", "ci_coverage"} <= set(s)


# ---------------------------------------------------------------- the settings

def test_rule_from_a_cell_and_old_settings_still_validate():
    cell = CellSettings(train={"steps": 25, "timing": {"ci_target": 0.02, "max_timed_s": 90}})
    assert StoppingRule.from_train(cell.train) == StoppingRule(0.02, 0.95, 25, 300, 90.0)
    old = {"seq_len": 512, "micro_batch": 1, "warmup_steps": 2, "steps": 6}  # a record before train.timing
    assert Train.model_validate(old).timing.max_steps == 300


def test_max_steps_below_the_minimum_is_refused_naming_both_keys():
    with pytest.raises(ValueError, match=r"train.timing.max_steps \(10\).*train.steps \(20\).*Fix"):
        Train(steps=20, timing={"max_steps": 10})


def test_timing_keys_are_grid_axes():
    matrix = Matrix(name="m", grid={"max_timed_s": [30, 90], "timing.ci_target": [0.02]},
                    exclude=[{"train": {"timing": {"max_timed_s": 90}}}],
                    include=[{"train.timing": {"max_steps": 50}}])
    cells = expand(matrix, device="cpu")
    assert sorted((c.train.timing.max_timed_s, c.train.timing.ci_target, c.train.timing.max_steps) for c in cells) == [
        (30, 0.02, 300), (60, 0.01, 50)]


def test_time_budget_must_fit_the_timeout():
    cells = [CellSettings(train={"timing": {"max_timed_s": 120}})]
    check_time_budget(cells, Limits(timeout_s=900, startup_s=600), "m.yaml")
    with pytest.raises(MatrixError, match=r"limits.timeout_s \(600 s\).*limits.startup_s \(500 s\).*"
                                          r"train.timing.max_timed_s \(120 s.*Fix: raise limits.timeout_s to at least 620"):
        check_time_budget(cells, Limits(timeout_s=600, startup_s=500), "m.yaml")


# ---------------------------------------------------------------- the loop, for real

class Barrier:
    """What run_steps needs of accelerate's Accelerator: wait_for_everyone, which is a process-group barrier."""

    def wait_for_everyone(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loop(rank: int, world: int, port: int, folder: str, cell_json: str, sleep_s: list[float], garbage: int):
    """One rank: run_steps over a step that sleeps this rank's time (and leaves cyclic garbage)."""
    import torch
    import torch.distributed as dist

    from bench.worker import train as worker
    from bench.records.rank_files import RankFiles

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    def one_step() -> dict:
        for _ in range(garbage):  # reference cycles: only the collector frees them
            a = []
            a.append(a)
        time.sleep(sleep_s[rank])
        return {"loss": 0.0, "tokens": 8, "real_tokens": 8}

    cell = CellSettings.model_validate_json(cell_json)
    steps, window, timing, collected = worker.run_steps(cell, one_step, Barrier(), torch.device("cpu"),
                                                        RankFiles(Path(folder), rank))
    Path(folder, f"out{rank}.json").write_text(json.dumps(
        {"rank": rank, "steps": steps, "timed_window": window, "timing": timing, "gc": collected,
         "gc_enabled_after": gc.isenabled(), "frozen_after": gc.get_freeze_count()}))
    if world > 1:
        dist.destroy_process_group()


def run_loop(tmp_path: Path, cell: CellSettings, sleep_s: list[float], garbage: int = 0) -> list[dict]:
    world = len(sleep_s)
    mp.spawn(_loop, args=(world, _free_port(), str(tmp_path), cell.model_dump_json(), sleep_s, garbage),
             nprocs=world, join=True)
    return [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(world)]


def as_record(cell: CellSettings, ranks: list[dict]) -> RunRecord:
    return RunRecord(matrix="t", cell_id=cell.cell_id, label=cell.label, settings=cell.model_dump(mode="json"),
                     status="ok", ranks=ranks, started_at=0.0, wall_s=1.0)


@pytest.mark.launch_aside
def test_ranks_of_different_speeds_stop_together_on_the_slowest_series(tmp_path):
    # ci_target far below any real jitter: the rule runs to max_steps, the same step on both ranks.
    cell = CellSettings(gpus=2, train={"warmup_steps": 1, "steps": 6,
                                       "timing": {"ci_target": 1e-9, "max_steps": 9, "max_timed_s": 600}})
    fast, slow = run_loop(tmp_path, cell, sleep_s=[0.001, 0.03])
    assert fast["timing"] == slow["timing"]  # one decision, from one series
    assert fast["timing"]["stop_reason"] == "max_steps" and fast["timing"]["timed_steps"] == 9
    for rank in (fast, slow):
        phases = [s["phase"] for s in rank["steps"]]
        assert phases == ["warmup"] + ["timed"] * 9
    record = as_record(cell, [fast, slow])
    series = metrics.timed_step_times(record)  # per step, the slowest rank's time
    assert series == [max(a["time_s"], b["time_s"]) for a, b in zip(fast["steps"][1:], slow["steps"][1:])]
    assert fast["timing"]["median_s"] == pytest.approx(float(np.median(series)))
    assert fast["timing"]["median_s"] >= 0.03  # the slow rank's steps, not the fast one's
    assert np.median([s["time_s"] for s in fast["steps"][1:]]) < fast["timing"]["median_s"]


@pytest.mark.launch_aside
def test_a_steady_loop_stops_converged_and_keeps_the_collector_out(tmp_path):
    cell = CellSettings(train={"warmup_steps": 1, "steps": 6,
                               "timing": {"ci_target": 0.5, "max_steps": 50, "max_timed_s": 600}})
    (rank,) = run_loop(tmp_path, cell, sleep_s=[0.01], garbage=20_000)
    timing, collected = rank["timing"], rank["gc"]
    assert timing["stop_reason"] == "converged" and timing["timed_steps"] == 6  # ±50 %: met at the minimum
    # 120 000 reference cycles made inside the window would trigger many collections if it were enabled
    assert collected["policy"] == POLICY and collected["collections_in_window"] == 0
    assert collected["collected_after_window"] >= 6 * 20_000  # collected on purpose once the window closed
    assert collected["frozen_objects"] > 0 and collected["collected_after_warmup"] is not None
    assert rank["gc_enabled_after"] and rank["frozen_after"] == 0


def test_gc_window_counts_a_collection_made_inside_it():
    """A library calling gc.collect() inside the window still collects: it is counted, not hidden."""
    was_enabled = gc.isenabled()
    window = GcWindow()
    window.open()
    try:
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        gc.collect()
    finally:
        window.close()
    assert window.record()["collections_in_window"] == 1
    assert gc.isenabled() == True and gc.get_freeze_count() == 0  # noqa: E712
    gc.collect()
    assert window.record()["collections_in_window"] == 1  # no longer counting after close
    if not was_enabled:
        gc.disable()
