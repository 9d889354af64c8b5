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
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from bench.records import RunRecord
from bench.report import host_steady, intervals, metrics
from bench.spec import CellSettings, Limits, Matrix, MatrixError, Train, check_time_budget, expand
from bench.worker.gc_window import GcWindow, POLICY
from bench.worker.timing import RULE as RULE_TEXT
from bench.worker.timing import (RULE_INDEPENDENT, STOP_REASONS, StoppingRule, dependence, effective_ranks,
                                 median_interval, order_statistic_ranks)
from conftest import REPO


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
    iv = median_interval(times, serial=False)  # taken as independent: the 6th and 15th
    assert (iv.median, iv.low, iv.high) == (10.5, 6.0, 15.0) and iv.n_eff is None
    assert iv.rel_half_width == pytest.approx(max(10.5 - 6, 15 - 10.5) / 10.5)


# ---------------------------------------------------------------- serial dependence

def test_effective_ranks_are_the_independent_ones_at_n_eff_equal_n_and_widen_below():
    for n in (6, 20, 100):
        assert effective_ranks(n, float(n), 0.95) == order_statistic_ranks(n, 0.95)
    # 40 steps worth 20 independent ones: the 6th of 20 is at the fraction 5/20 of 40 -> the 11th of 40
    assert effective_ranks(40, 20.0, 0.95) == (11, 30, order_statistic_ranks(20, 0.95)[2])
    assert effective_ranks(40, 40.0, 0.95)[0] > 11  # independent: tighter
    assert effective_ranks(40, 5.9, 0.95) is None  # fewer than 6 effective steps: no 95 % pair


def test_dependence_of_known_orders():
    below_above = [1.0, 2.0] * 10  # alternating around the median: no positive dependence, tau at its floor
    assert dependence(below_above).tau == 1.0 and dependence(below_above).n_eff == 20
    halves = [1.0] * 10 + [2.0] * 10  # all below, then all above: the order says almost nothing new per step
    d = dependence(halves)
    assert d.rho1 == pytest.approx(17 / 20)  # 18 products of +1/4 and one of -1/4, over 20 x 1/4
    assert d.tau > 5 and d.n_eff < 4
    assert median_interval(halves) is None  # fewer than 6 effective steps: timing goes on
    assert median_interval(halves, serial=False) is not None  # taken as independent it had one
    assert dependence([1.0] * 20).tau == 1.0 and dependence([1.0]).n_eff == 1  # degenerate series


def test_a_slow_outlier_moves_rho_of_the_times_not_the_rule():
    x = steady(40, seed=3)
    spiked = list(x)
    spiked[20] = spiked[21] = 3.0  # two slow steps in a row (a collective that waited)
    assert dependence(spiked).rho1 > dependence(x).rho1 + 0.3
    assert dependence(spiked).tau == pytest.approx(dependence(x).tau, abs=0.3)  # two more steps above the median


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
    # ±0.2 % jitter is within ±1 % even at (min, max) of 6 effective steps; only an order that by chance looks
    # dependent enough to leave fewer than 6 (tau > 3.3 from 20 independent steps) holds the rule back a little
    at_minimum = [RULE.stop_reason(steady(20, seed), timed_s=24.0) == "converged" for seed in range(50)]
    assert sum(at_minimum) >= 45
    assert all(first_stop(RULE, steady(40, seed))[0] <= 30 for seed in range(50))


def first_stop(rule: StoppingRule, times: list[float]) -> tuple[int, str]:
    """Feed ``times`` one step at a time, as the worker does: (steps taken, why it stopped)."""
    for n in range(1, len(times) + 1):
        if reason := rule.stop_reason(times[:n], sum(times[:n])):
            return n, reason
    raise AssertionError("never stopped")


def test_independent_steps_cost_about_what_they_did():
    """Independent steps: the dependence estimate's own noise (tau above 1 on about half of such series) costs
    some steps, never saves any (the interval is never narrower), and nothing at all on steady steps.
    Measured on these 60 series: x1.01 at 0.5 % jitter, x1.08 at 1 %, x1.30 at 2 %."""
    uncapped = replace(RULE, max_timed_s=1e9)
    independent = replace(uncapped, serial=False)
    for sd, allowed in ((0.005, 1.03), (0.01, 1.15), (0.02, 1.4)):
        series = [list(1.2 * (1 + sd * np.random.default_rng(s).standard_normal(300))) for s in range(60)]
        old = np.mean([first_stop(independent, x)[0] for x in series])
        new = np.mean([first_stop(uncapped, x)[0] for x in series])
        assert old <= new <= allowed * old, (sd, old, new)


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
            "ci_high_s", "ci_coverage", "rho1", "n_eff"} <= set(s)
    assert 1 <= s["n_eff"] <= 300 and s["rule"] != RULE_INDEPENDENT
    old = replace(RULE, serial=False).summary(times, 200.0, "max_steps")  # the former rule, for replays
    assert old["rule"] == RULE_INDEPENDENT and old["n_eff"] == 300 and old["rho1"] == s["rho1"]


def episodes(fast: int, slow: int, rounds: int, seed: int = 0) -> list[float]:
    """ZeRO-3's step on 2x H200 (results/nightly-h200): runs of ~365 ms steps, then runs of ~430 ms ones."""
    rng = np.random.default_rng(seed)
    out: list[float] = []
    for _ in range(rounds):
        out += list(0.365 * (1 + 0.004 * rng.standard_normal(fast)))
        out += list(0.430 * (1 + 0.04 * rng.standard_normal(slow)))
    return out


def test_episodes_in_view_hold_the_rule_back_where_independent_steps_would_have_stopped():
    """15 fast steps then 5 slow: the 6th and 15th fastest are both fast, so taken as independent the 20 steps
    stop converged on the fast episode's median; the order (a run below, a run above) says they are worth far
    fewer, and timing goes on to the cap, whose interval spans both kinds of episode."""
    independent = replace(RULE, serial=False)
    fooled = 0
    for seed in range(20):
        times = episodes(fast=15, slow=15, rounds=8, seed=seed)
        if first_stop(independent, times) != (20, "converged"):
            continue  # the 15th fastest was a slow step's by chance: the former rule was not fooled either
        fooled += 1
        n, reason = first_stop(RULE, times)
        assert reason == "max_timed_s" and n > 120, (seed, n, reason)
        assert dependence(times[:20]).tau > 1  # the first 20 steps already look dependent
        # at the cap half the steps are fast, half slow: the record says the median is not settled to ±1 %
        summary = RULE.summary(times[:n], sum(times[:n]), reason)
        assert summary["n_eff"] < n / 3 and summary["ci_high_s"] > 1.1 * summary["median_s"]
    assert fooled >= 15


def test_a_fast_episode_looks_converged_and_a_time_window_waits_past_it():
    """What no rule fed only these steps can see: 20 steps inside one fast episode look steady."""
    times = episodes(fast=20, slow=40, rounds=4)
    first = times[:20]  # 20 steps of one fast episode: 7.3 timed seconds
    assert RULE.stop_reason(first, timed_s=sum(first)) == "converged"
    assert replace(RULE, serial=False).stop_reason(first, timed_s=sum(first)) == "converged"
    window = StoppingRule(0.01, 0.95, 20, 300, max_timed_s=60.0, min_timed_s=60.0)
    assert window.stop_reason(first, timed_s=sum(first)) is None
    n = next(i for i in range(20, len(times) + 1) if window.stop_reason(times[:i], sum(times[:i])))
    assert sum(times[:n]) >= 60.0 and n > 120  # several episodes inside the window
    assert np.median(times[:n]) > 1.02 * np.median(first)  # the fast episode's median was not the launch's


def test_min_timed_s_only_holds_back_convergence():
    rule = StoppingRule(0.01, 0.95, 20, 300, max_timed_s=60.0, min_timed_s=30.0)
    assert rule.stop_reason(steady(20), timed_s=24.0) is None
    assert rule.stop_reason(steady(25), timed_s=30.0) == "converged"
    assert rule.stop_reason(noisy(300), timed_s=20.0) == "max_steps"  # a cap still stops it
    assert rule.summary(steady(25), 30.0, "converged")["min_timed_s"] == 30.0  # the record says so


# ---------------------------------------------------------------- the settings

def test_rule_from_a_cell_and_old_settings_still_validate():
    cell = CellSettings(train={"steps": 25, "timing": {"ci_target": 0.02, "max_timed_s": 90}})
    assert StoppingRule.from_train(cell.train) == StoppingRule(0.02, 0.95, 25, 300, 90.0)
    window = CellSettings(train={"timing": {"min_timed_s": 60, "max_timed_s": 60}})
    assert StoppingRule.from_train(window.train).min_timed_s == 60.0
    old = {"seq_len": 512, "micro_batch": 1, "warmup_steps": 2, "steps": 6}  # a record before train.timing
    assert Train.model_validate(old).timing.max_steps == 300
    assert Train.model_validate(old).timing.min_timed_s == 0


def test_min_timed_s_keeps_old_cell_ids_at_its_default_and_changes_them_when_set():
    """Cells recorded before the key hash as they did (a committed night of the nightly matrix); set, it is a
    different cell."""
    from bench.records import load_records

    record = load_records(REPO / "results" / "nightly-h200" / "2026-11-30-997c560")[0]
    cell = CellSettings.model_validate(record.settings)
    assert cell.cell_id == record.cell_id and "min_timed_s" not in record.settings["train"]["timing"]
    timing = {**record.settings["train"]["timing"], "min_timed_s": 10}
    changed = CellSettings.model_validate({**record.settings, "train": {**record.settings["train"], "timing": timing}})
    assert changed.cell_id != record.cell_id


def test_committed_records_name_the_independent_rule_and_still_give_their_interval():
    """Records timed before serial dependence was accounted for: their rule string says so, they have no
    rho1 / n_eff, and the report still reads their interval from them."""
    from bench.records import load_records

    for record in load_records(REPO / "results" / "nightly-h200" / "2026-11-30-997c560-5"):
        timing = record.ranks[0]["timing"]
        assert "n_eff" not in timing["rule"] and "n_eff" in RULE_TEXT and "n_eff" not in RULE_INDEPENDENT
        assert "n_eff" not in timing and "rho1" not in timing
        assert CellSettings.model_validate(record.settings).cell_id == record.cell_id  # ids unchanged
        times = metrics.timed_step_times(record)
        low, high, _, source = intervals.launch_interval(record, times, float(np.median(times)))
        assert source == "timing" and low < float(np.median(times)) < high


def test_min_timed_s_above_max_timed_s_is_refused_naming_both_keys():
    with pytest.raises(ValueError, match=r"train.timing.min_timed_s \(90\).*train.timing.max_timed_s \(60\).*Fix"):
        Train(timing={"min_timed_s": 90, "max_timed_s": 60})


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
    steps, window, timing, collected, host = worker.run_steps(cell, one_step, Barrier(), torch.device("cpu"),
                                                              RankFiles(Path(folder), rank))
    Path(folder, f"out{rank}.json").write_text(json.dumps(
        {"rank": rank, "steps": steps, "timed_window": window, "timing": timing, "gc": collected, "host": host,
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
    # the host's pace, read before every timed step and after the last, on each rank (bench/worker/cpu_probe.py)
    for rank in (fast, slow):
        assert all((s["phase"] == "timed") == ("host_pace_ms" in s) for s in rank["steps"])
        assert all(s["host_pace_ms"] > 0 for s in rank["steps"][1:]) and rank["host"]["host_pace_ms_end"] > 0
    steady = host_steady.figures(record.ranks, series)
    assert 0 <= steady["host_slow_step_share"] <= 1 and steady["host_pace_fastest_ms"] > 0


@pytest.mark.launch_aside
def test_a_steady_loop_stops_converged_and_keeps_the_collector_out(tmp_path):
    cell = CellSettings(train={"warmup_steps": 1, "steps": 6,
                               "timing": {"ci_target": 0.5, "max_steps": 50, "max_timed_s": 600}})
    (rank,) = run_loop(tmp_path, cell, sleep_s=[0.01], garbage=20_000)
    timing, collected = rank["timing"], rank["gc"]
    # ±50 %: met once 6 steps count as independent (at the minimum, or a few later if their order looks dependent)
    assert timing["stop_reason"] == "converged" and 6 <= timing["timed_steps"] < 50
    assert timing["n_eff"] >= 6 and -1 <= timing["rho1"] <= 1
    # 120 000 reference cycles made inside the window would trigger many collections if it were enabled
    assert collected["policy"] == POLICY and collected["collections_in_window"] == 0
    assert collected["collected_after_window"] >= 6 * 20_000  # collected on purpose once the window closed
    assert collected["frozen_objects"] > 0 and collected["collected_after_warmup"] is not None
    assert rank["gc_enabled_after"] and rank["frozen_after"] == 0
    host = rank["host"]  # the host's share of the window: sleeping steps use little of a CPU
    assert host["window_s"] > 0 and 0 <= host["rank_cpu_per_wall"] < 1 and host["voluntary_switches"] > 0
    assert host["cpu_probe_ms_before"] > 0 and host["cpu_probe_ms_after"] > 0  # the CPU probe, either side


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
