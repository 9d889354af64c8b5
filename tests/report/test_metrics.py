"""Derived figures from records of real CPU runs (the session's `cpu_results`), plus GPU-shaped copies.

No GPU runs here: where a test needs NVML, torch CUDA peaks or a GPU name, it copies a real CPU record
and adds those fields (``as_gpu_record``), the same keys bench/machine/sampler.py and bench/worker/train.py write.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from bench.records import RunRecord, load_records
from bench.report import flops, intervals, metrics, repeats, speedups
from bench.spec import CellSettings

H100 = "NVIDIA H100 80GB HBM3"


def by_label(records: list[RunRecord]) -> dict[str, RunRecord]:
    return {r.label: r for r in records}


def as_gpu_record(record: RunRecord, gpu_name: str = H100, energy_j: float = 1234.0,
                  reserved_gib: float = 10.0, with_trace: bool = True) -> RunRecord:
    """A copy of a real CPU record dressed as a GPU run: cuda settings (hence a new cell id), a GPU name,
    torch CUDA peaks per rank, and an nvml dict in the schema bench/machine/sampler.py writes."""
    r = copy.deepcopy(record)
    r.settings = {**r.settings, "device": "cuda"}
    cell = CellSettings.model_validate(r.settings)
    r.cell_id, r.label = cell.cell_id, cell.label
    r.env = {**r.env, "gpu_model": gpu_name, "gpu_count": 8, "hardware": f"8x {gpu_name}"}
    gib = 2**30
    for i, rank in enumerate(r.ranks):
        rank.update({"gpu_name": gpu_name, "gpu_total_bytes": 80 * gib,
                     "torch_peak_allocated_bytes": int((reserved_gib - 1 - i) * gib),
                     "torch_peak_reserved_bytes": int(reserved_gib * gib)})
    n = len(r.ranks)
    t = [0.5 * k for k in range(40)]
    r.nvml = {
        "interval_s": 0.05, "gpu_indices": list(range(n)),
        "timed_window": [r.started_at + 5.0, r.started_at + 12.0],
        "per_gpu": [{"index": i, "name": gpu_name, "mem_used_peak_bytes": int((reserved_gib + 1.5) * gib),
                     "mem_used_mean_bytes": int(reserved_gib * gib), "mem_total_bytes": 80 * gib,
                     "util_mean_pct": 90.0 + i, "power_mean_w": 500.0, "power_peak_w": 690.0,
                     "energy_timed_j": energy_j / n, "sm_clock_mean_mhz": 1980.0, "throttle_reasons": []}
                    for i in range(n)],
        "energy_timed_j": energy_j,
        "trace": {"t": t, "gpus": {str(i): {"mem_used_mib": [1000 + 200 * k for k in range(40)],
                                            "power_w": [100 + 15 * k for k in range(40)],
                                            "util_pct": [min(100, 5 * k) for k in range(40)],
                                            "sm_clock_mhz": [1980] * 40} for i in range(n)}} if with_trace else {},
    }
    return r


@pytest.fixture(scope="module")
def records(cpu_results) -> dict[str, RunRecord]:
    return by_label(load_records(cpu_results))


def test_figures_recomputed_from_steps(records):
    rec = records["tiny-llama full zero3 x2proc"]
    row = metrics.figures(rec)
    steps = metrics.timed_step_times(rec)
    assert len(steps) == rec.settings["train"]["steps"]
    assert row["step_time_s"] == pytest.approx(float(np.median(steps)))
    assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["step_time_s"])
    assert row["tokens_per_s_per_gpu"] == pytest.approx(row["tokens_per_s"] / 2)
    assert row["real_tokens_per_s"] == pytest.approx(row["real_tokens_per_step"] / row["step_time_s"])
    # one launch timed by the worker's rule: its 3 timed steps admit no 95 % interval of the median (fewer
    # than 6 effective steps), and the report gives none rather than min-max at 75 %
    assert "timing" in rec.ranks[0] and rec.ranks[0]["timing"]["ci_low_s"] is None
    assert row["launch_interval_source"] == intervals.NO_INTERVAL
    assert np.isnan(row["step_time_ci_low_s"]) and np.isnan(row["real_tokens_per_s_ci_low"])
    assert row["precision_policy"] == "fp32"
    assert row["machine"] == rec.env["hardware"] and row["gpu_model"] is None
    # a CPU run: host memory, a FLOP count, but no CUDA peaks, no NVML, no peak figure
    assert row["host_rss_peak_gib"] > 0.05
    assert row["model_flops_per_token"] > 0
    for key in ("peak_reserved_gib", "nvml_peak_used_gib", "joules_per_token", "peak_tflops"):
        assert key not in row


def test_speedups_against_both_baselines(records):
    df = speedups.add_speedups(repeats.aggregate_repeats(metrics.frame(list(records.values()))))
    tps = dict(zip(df["label"], df["tokens_per_s"]))
    z3 = df[df["label"] == "tiny-llama full zero3 x2proc"].iloc[0]
    assert z3["speedup_vs_same_1"] == pytest.approx(tps["tiny-llama full zero3 x2proc"] / tps["tiny-llama full zero3 x1proc"])
    assert z3["speedup_vs_plain_1"] == pytest.approx(tps["tiny-llama full zero3 x2proc"] / tps["tiny-llama full ddp x1proc"])
    assert z3["efficiency_vs_plain_1"] == pytest.approx(z3["speedup_vs_plain_1"] / 2)
    ddp1 = df[df["label"] == "tiny-llama full ddp x1proc"].iloc[0]
    assert ddp1["speedup_vs_plain_1"] == pytest.approx(1.0)


def test_repeats_give_median_and_an_interval_across_launches_failed_repeats_ignored(records):
    base = records["tiny-llama full ddp x1proc"]
    slow, failed = copy.deepcopy(base), copy.deepcopy(base)
    slow.repeat, failed.repeat, failed.status = 1, 2, "crash"
    for rank in slow.ranks:
        for step in rank["steps"]:
            step["time_s"] *= 2  # half the throughput
    third = copy.deepcopy(slow)
    third.repeat = 3
    df = repeats.aggregate_repeats(metrics.frame([base, slow, failed, third]))
    assert len(df) == 1
    row = df.iloc[0]
    one = metrics.figures(base)["real_tokens_per_s_per_gpu"]
    assert (row["repeats"], row["repeats_ok"]) == (4, 3)
    assert row["real_tokens_per_s_per_gpu"] == pytest.approx(one / 2)  # median of (1, 1/2, 1/2)
    assert row["interval_basis"] == "3 launches" and row["launch_interval_source"] == "across launches"
    # the t-interval of log(1, 1/2, 1/2): mean log(1/2)*2/3, sd log(2)/sqrt(3), t(0.975, 2) = 4.303
    logs = np.log([one, one / 2, one / 2])
    half = 4.302652729911275 * logs.std(ddof=1) / np.sqrt(3)
    low, high = metrics.per_gpu_interval(row)
    assert (low, high) == pytest.approx((np.exp(logs.mean() - half), np.exp(logs.mean() + half)))
    assert low < one / 2 and high > one  # wider than the launches' range: three launches say little


def test_same_cell_on_two_machines_stays_apart(records):
    a = records["tiny-llama full ddp x1proc"]
    b = copy.deepcopy(a)
    b.env = {**b.env, "hardware": "cpu Other CPU x64"}
    df = speedups.add_speedups(repeats.aggregate_repeats(metrics.frame([a, b])))
    assert sorted(df["machine"]) == sorted([a.env["hardware"], "cpu Other CPU x64"])
    assert (df["speedup_vs_plain_1"] == 1.0).all()  # each against its own machine's baseline
    assert (df["speedup"] == 1.0).all() and (df["baseline"] == "ddp x1").all()


def test_plain_baseline_prefers_single_then_ok_runs():
    rows = pd.DataFrame([
        {"strategy": "ddp", "gpus": 1, "status": "ok", "tokens_per_s": 10.0},
        {"strategy": "single", "gpus": 1, "status": "ok", "tokens_per_s": 11.0},
        {"strategy": "zero1", "gpus": 1, "status": "ok", "tokens_per_s": 12.0},
    ])
    assert speedups.plain_baseline(rows)["strategy"] == "single"
    rows.loc[1, "status"] = "oom"
    assert speedups.plain_baseline(rows)["strategy"] == "ddp"
    assert speedups.plain_baseline(rows[rows["strategy"] == "zero1"]) is None


def test_gpu_record_energy_memory_and_mfu(records):
    """A CPU record dressed as an H100 run (see as_gpu_record): J/token, NVML memory, MFU against 989.4."""
    rec = as_gpu_record(records["tiny-llama full zero3 x2proc"], energy_j=1000.0, reserved_gib=10.0)
    df = metrics.add_flop_rates(repeats.aggregate_repeats(metrics.frame([rec])))
    row = df.iloc[0]
    timed_tokens = row["real_tokens_per_step"] * row["timed_steps"]
    assert row["joules_per_token"] == pytest.approx(1000.0 / timed_tokens)
    assert row["power_mean_w"] == pytest.approx(1000.0)  # two GPUs at 500 W
    assert row["peak_reserved_gib"] == pytest.approx(10.0)
    assert row["peak_allocated_rank_spread_gib"] == pytest.approx(1.0, abs=1e-6)
    assert row["nvml_peak_used_gib"] == pytest.approx(11.5)
    assert row["gpu_total_gib"] == pytest.approx(80.0)
    expected_tflops = row["real_tokens_per_s_per_gpu"] * flops.flops_for_settings(rec.settings).model_per_token / 1e12
    assert row["model_tflops_per_gpu"] == pytest.approx(expected_tflops)
    assert row["mfu"] == pytest.approx(expected_tflops / 989.4)
    unknown = metrics.add_flop_rates(metrics.frame([as_gpu_record(rec, gpu_name="NVIDIA A10G")]))
    assert np.isnan(unknown["mfu"].iloc[0]) and unknown["model_tflops_per_gpu"].iloc[0] > 0


def test_a_record_whose_config_is_gone_keeps_its_answers(records, tmp_path):
    """A user's config renamed since the run: the report asks the degrees the record kept, else (older
    records) its family label, and the record still serves as the plain baseline."""
    one = copy.deepcopy(records["tiny-llama full ddp x1proc"])
    one.settings = {**one.settings, "strategy": str(tmp_path / "gone.yaml")}
    older = copy.deepcopy(one)
    older.strategy_info = {k: v for k, v in older.strategy_info.items() if k != "degrees"}
    assert "degrees" in one.strategy_info  # written by the run itself
    for record in (one, older):
        row = metrics.figures(record)
        assert (row["plain"], row["unwrapped"], row["framework"], row["family"]) == (True, False, "torch", "ddp")
    older.strategy_info = {}
    assert metrics.figures(older)["framework"] == "unknown"  # nothing says: no baseline is claimed for it
    frame = metrics.frame([one])
    assert speedups.plain_baseline(frame)["strategy"] == one.settings["strategy"]


def test_a_pinned_group_says_so_in_its_title():
    """cpu_affinity: cores puts cells in a setting group of their own; its title must tell it from the unpinned one."""
    pinned = CellSettings(model="tiny-llama", strategy="ddp", gpus=2, cpu_affinity="cores")
    plain = CellSettings(model="tiny-llama", strategy="ddp", gpus=2)
    assert pinned.setting_key != plain.setting_key
    assert "ranks pinned to cores" in metrics.setting_title(pinned.setting_key)
    assert "pinned" not in metrics.setting_title(plain.setting_key)
