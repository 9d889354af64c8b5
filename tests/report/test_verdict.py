"""Like-for-like comparisons, launch intervals, card state and the verdict, on committed GPU records.

The records are the real ones of results/llama8b (Llama-3.1-8B LoRA, H100) and results/llama-full
(Llama-3.2-1B full fine-tune, H100); where a test needs a known answer it copies them and sets the step
times, clocks or throttle shares it needs, in the schema bench/worker/train.py and bench/machine/sampler.py write.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from bench.records import RunRecord, append_record, load_records
from bench.report import document as report, intervals, metrics, repeats, speedups, tables as report_tables, verdict
from test_metrics import by_label

from conftest import REPO



@pytest.fixture(scope="module")
def llama8b() -> dict[str, RunRecord]:
    return by_label(load_records(REPO / "results" / "llama8b"))


@pytest.fixture(scope="module")
def llama_full() -> dict[str, RunRecord]:
    return by_label(r for r in load_records(REPO / "results" / "llama-full") if r.status == "ok")


def launch(record: RunRecord, step_s: float, repeat: int = 0, clock: float | None = None) -> RunRecord:
    """A copy of ``record`` as one launch whose timed steps all took ``step_s`` (slight noise inside it)."""
    r = copy.deepcopy(record)
    r.repeat = repeat
    for rank in r.ranks:
        timed = [s for s in rank["steps"] if s["phase"] == "timed"]
        for i, step in enumerate(timed):
            step["time_s"] = step_s * (1 + 0.001 * (i % 3 - 1))
    if clock is not None:
        for g in r.nvml["per_gpu"]:
            g["sm_clock_mean_mhz"] = clock
    return r


def build(records: list[RunRecord]) -> pd.DataFrame:
    return metrics.add_flop_rates(speedups.add_speedups(repeats.aggregate_repeats(metrics.frame(records))))


def row_of(df: pd.DataFrame, label: str) -> pd.Series:
    return df[df["label"] == label].iloc[0]


# ---------------------------------------------------------------- intervals

def test_median_interval_from_order_statistics():
    steps = np.arange(1.0, 41.0)  # 40 steps: the 95 % interval of the median is [x_(14), x_(27)], 1-based
    interval = intervals.median_interval(steps)
    assert (interval.low, interval.high) == (14.0, 27.0) and interval.coverage >= 0.95
    short = intervals.median_interval([3.0, 1.0, 2.0, 5.0])  # too few steps for 95 %: min-max, and says so
    assert (short.low, short.high) == (1.0, 5.0) and short.coverage == pytest.approx(1 - 2 * 0.5**4)


def test_across_launch_interval_is_a_log_scale_t_interval():
    interval = intervals.across_launches([100.0, 110.0, 90.0])
    logs = np.log([100.0, 110.0, 90.0])
    half = 4.302652729911275 * logs.std(ddof=1) / np.sqrt(3)
    assert (interval.low, interval.high) == pytest.approx((np.exp(logs.mean() - half), np.exp(logs.mean() + half)))
    assert intervals.across_launches([100.0]) is None
    wide, tight = intervals.across_launches([100.0, 120.0]), intervals.across_launches([100.0, 101.0, 99.0, 100.0])
    assert wide.high / wide.low > 3 and tight.high / tight.low < 1.03  # two launches say little


def test_one_launch_uses_the_workers_timing_interval(llama8b):
    rec = copy.deepcopy(llama8b["llama-3.1-8b lora ddp x2gpu"])
    for i, rank in enumerate(rec.ranks):  # rank 1 is the slower one: its relative interval counts
        median = 1.30 + 0.02 * i
        rank["timing"] = {"stop_reason": "ci_reached", "timed_steps": 6, "median_s": median,
                          "ci_low_s": median * (0.99 - 0.01 * i), "ci_high_s": median * (1.01 + 0.01 * i),
                          "ci_rel_half_width": 0.01, "confidence": 0.95}
    row = metrics.figures(rec)
    assert row["launch_interval_source"] == "timing" and row["timing_stop_reason"] == "ci_reached"
    assert row["step_time_ci_low_s"] == pytest.approx(row["step_time_s"] * 0.98)
    assert row["step_time_ci_high_s"] == pytest.approx(row["step_time_s"] * 1.02)
    old = metrics.figures(llama8b["llama-3.1-8b lora ddp x2gpu"])  # no timing: order statistics of 6 steps
    assert old["launch_interval_source"] == intervals.FROM_INDEPENDENT and "timing_stop_reason" not in old


# ---------------------------------------------------------------- like for like

def test_same_policy_baseline_never_crosses_policies(llama8b):
    records = [r for label, r in llama8b.items() if "x4gpu" not in label]
    df = build(records)
    policies = dict(zip(df["strategy"], df["precision_policy"]))
    assert policies["ddp"] == policies["fsdp_full_shard"] == "frozen-base" and policies["zero2"] == "pure"
    assert row_of(df, "llama-3.1-8b lora ddp x2gpu")["baseline"] == "ddp x1"
    z2 = row_of(df, "llama-3.1-8b lora zero2 x2gpu")
    assert z2["baseline"] == "zero2 x1" and z2["speedup"] == pytest.approx(z2["speedup_vs_same_1"])
    assert z2["plain_cross_policy"] is True  # its ratio to ddp x1 is labelled, not a speedup
    assert "cross-policy: pure vs frozen-base" in report_tables.plain_text(z2, speedups.plain_baseline(df))
    # without zero2 x1: another DeepSpeed 1-GPU cell (pure), never the frozen-base ddp x1
    without = build([r for r in records if r.label != "llama-3.1-8b lora zero2 x1gpu"])
    z2 = row_of(without, "llama-3.1-8b lora zero2 x2gpu")
    assert z2["baseline"] in ("zero1 x1", "zero3 x1") and np.isnan(z2["speedup_vs_same_1"])
    base = without[(without["gpus"] == 1) & (without["strategy"] == z2["baseline"].split()[0])].iloc[0]
    assert z2["speedup"] == pytest.approx(z2["real_tokens_per_s"] / base["real_tokens_per_s"])
    assert report_tables.speedup_text(z2).endswith(f"vs {z2['baseline']}")
    # without fsdp x1: the plain run of its own policy (ddp x1, frozen base too)
    no_fsdp1 = build([r for r in records if r.label != "llama-3.1-8b lora fsdp_full_shard x1gpu"])
    assert row_of(no_fsdp1, "llama-3.1-8b lora fsdp_full_shard x2gpu")["baseline"] == "ddp x1"


def test_full_finetune_deepspeed_has_no_autocast_baseline(llama_full):
    """results/llama-full holds ddp alone at 1 GPU: ZeRO at 2 gets no speedup rather than one over autocast."""
    df = build(list(llama_full.values()))
    z2 = row_of(df, "llama-3.2-1b full zero2 x2gpu")
    assert z2["precision_policy"] == "pure" and row_of(df, "llama-3.2-1b full ddp x1gpu")["precision_policy"] == "autocast"
    assert np.isnan(z2["speedup"]) and report_tables.speedup_text(z2) == "no 1-GPU baseline in pure"
    assert row_of(df, "llama-3.2-1b full ddp x2gpu")["baseline"] == "ddp x1"


def test_no_same_policy_baseline_says_so(llama8b):
    df = build([llama8b["llama-3.1-8b lora ddp x1gpu"], llama8b["llama-3.1-8b lora zero1 x2gpu"]])
    z1 = row_of(df, "llama-3.1-8b lora zero1 x2gpu")
    assert np.isnan(z1["speedup"]) and report_tables.speedup_text(z1) == "no 1-GPU baseline in pure"
    group = df
    table = report_tables.head_to_head(group, report_tables.TableOptions())
    assert table is None  # nothing like-for-like to put side by side


def test_head_to_head_projection_is_against_the_same_policy(llama8b):
    df = build(list(llama8b.values()))
    options = report_tables.TableOptions(budget=metrics_budget())
    table = report_tables.head_to_head(df, options).set_index("run")
    z1, z1_base, ddp_base = (row_of(df, f"llama-3.1-8b lora {s}") for s in ("zero1 x2gpu", "zero1 x1gpu", "ddp x1gpu"))
    total = 50e6 * 4
    expected = (f"{report_tables.duration(total / z1_base['real_tokens_per_s'])} -> "
                f"{report_tables.duration(total / z1['real_tokens_per_s'])}")
    assert table.loc["zero1 x2 GPU", "baseline -> this"] == expected
    assert table.loc["zero1 x2 GPU", "baseline (same policy)"] == "zero1 x1 GPU"
    assert not table.loc["zero1 x2 GPU", "baseline -> this"].startswith(
        report_tables.duration(total / ddp_base["real_tokens_per_s"]))  # not the autocast ddp x1 run
    assert table.loc["zero1 x1 GPU", "baseline -> this"] == "(the baseline)"


def metrics_budget():
    from bench.spec import TokenBudget

    return TokenBudget(tokens=50_000_000, epochs=4)


# ---------------------------------------------------------------- card state

def test_clock_warning_above_three_percent(llama8b):
    a, b = llama8b["llama-3.1-8b lora ddp x2gpu"], llama8b["llama-3.1-8b lora zero1 x2gpu"]
    close = build([launch(a, 1.3, clock=1950.0), launch(b, 1.1, clock=1900.0)])  # 2.6 %: no warning
    assert report_tables.clock_warning(close) is None
    apart = build([launch(a, 1.3, clock=1976.0), launch(b, 1.1, clock=1836.0)])  # 7.6 %
    warning = report_tables.clock_warning(apart)
    assert warning and "7.6%" in warning and "1836 MHz zero1 x2 GPU" in warning
    # zero1 (1.1 s a step) is the faster at the lower clock: its lead is not the clock's; the other way round it may be
    assert "The fastest of them, zero1 x2 GPU, ran at the lowest clock: the clock does not explain its lead" in warning
    reverse = report_tables.clock_warning(build([launch(a, 1.0, clock=1976.0), launch(b, 1.1, clock=1836.0)]))
    assert "The fastest of them, ddp x2 GPU, ran at the highest clock: part of its lead may be the clock" in reverse
    # the committed run itself: ZeRO-1/2 at 1836-1873 MHz against 1933-1977 for the others
    assert report_tables.clock_warning(build(list(llama8b.values())))


def test_throttle_share_new_and_old_records(llama8b):
    old = metrics.figures(llama8b["llama-3.1-8b lora ddp x2gpu"])
    assert "throttled_share" not in old and old["throttle_reasons_seen"] == "sw_power_cap"
    assert report_tables.throttle_text(pd.Series(old)) == "unknown share (older record; seen: sw_power_cap)"
    new = copy.deepcopy(llama8b["llama-3.1-8b lora ddp x2gpu"])
    for g, share in zip(new.nvml["per_gpu"], (0.25, 0.75)):
        g.update({"throttled_share": share, "throttle_share_by_reason": {"sw_power_cap": share}})
    row = metrics.figures(new)
    assert row["throttled_share"] == 0.75  # the most throttled card
    assert report_tables.throttle_text(pd.Series(row)) == "75% (sw_power_cap)"


# ---------------------------------------------------------------- tokens

def test_throughput_energy_and_mfu_count_real_tokens(llama8b):
    full = llama8b["llama-3.1-8b lora ddp x1gpu"]
    padded = copy.deepcopy(full)
    for rank in padded.ranks:
        for step in rank["steps"]:
            step["real_tokens"] = step["tokens"] // 2  # half of every sequence is padding
    a, b = metrics.figures(full), metrics.figures(padded)
    assert b["tokens_per_s"] == pytest.approx(a["tokens_per_s"])  # the same work computed
    assert b["real_tokens_per_s"] == pytest.approx(a["real_tokens_per_s"] / 2)
    assert b["joules_per_token"] == pytest.approx(a["joules_per_token"] * 2)
    assert a["attention_length"] == 2048 and b["attention_length"] == 1024  # 4 sequences per step
    assert b["model_flops_per_token"] < a["model_flops_per_token"]  # shorter attention per real token
    assert b["hardware_flops_per_token"] == pytest.approx(a["hardware_flops_per_token"])
    df = build([full])
    assert df["mfu_full_attn"].iloc[0] / df["mfu"].iloc[0] == pytest.approx(
        a["model_flops_per_token_full_attn"] / a["model_flops_per_token"])


# ---------------------------------------------------------------- the verdict

@pytest.fixture(scope="module")
def known(llama8b) -> pd.DataFrame:
    """2 GPUs, 3 launches each, answers known: zero1 fastest; zero2 within its interval; ddp and fsdp clearly
    slower; zero3 slower with the lowest peak; a capped-out cell (oom) that cannot be the answer."""
    cells = {"zero1": (1.000, 1.004, 0.998), "zero2": (1.006, 1.003, 1.010), "ddp": (1.20, 1.21, 1.19),
             "zero3": (2.0, 2.02, 1.98), "fsdp_full_shard": (1.5, 1.52, 1.49)}
    records = [launch(llama8b[f"llama-3.1-8b lora {s} x2gpu"], t, repeat=i)
               for s, times in cells.items() for i, t in enumerate(times)]
    for r in records:
        if r.settings["strategy"] == "zero3":  # the leanest, by construction
            for rank in r.ranks:
                rank["torch_peak_reserved_bytes"] = 20 * 2**30
    oom = copy.deepcopy(llama8b["llama-3.1-8b lora zero2 x4gpu"])
    oom.status = "oom"
    return build(records + [oom])


def test_verdict_fastest_indistinguishable_and_leanest(known):
    v = verdict.decide(known, 2)
    assert v.fastest["strategy"] == "zero1"
    assert [r["strategy"] for r in v.indistinguishable] == ["zero2"]
    assert v.lowest_memory["strategy"] == "zero3" and v.lowest_memory["peak_reserved_gib"] == 20.0
    four = verdict.decide(known, 4)
    assert four.fastest is None and [r["status"] for r in four.not_fitting] == ["oom"]
    table = report_tables.verdict_table(known).set_index("GPUs")
    assert table.loc[2, "fastest that fits (tok/s/GPU [95% CI])"].startswith("zero1 (pure): ")
    assert table.loc[2, report_tables.INDISTINGUISHABLE].startswith("zero2 (pure): ")
    assert table.loc[2, "intervals from"] == "3 launches"
    assert table.loc[2, "lowest peak memory"].startswith("zero3 (pure): 20.0 GiB reserved, ")
    assert table.loc[4, "fastest that fits (tok/s/GPU [95% CI])"] == "none fits"
    assert table.loc[4, "did not fit"] == "zero2: oom"


def test_a_cell_over_the_cap_does_not_fit(known):
    capped = known.copy()
    z1 = capped.index[(capped["strategy"] == "zero1") & (capped["gpus"] == 2)][0]
    capped.loc[z1, "gpu_memory_gib"] = 20.0  # its peak reserved is above 20 GiB
    v = verdict.decide(capped, 2)
    assert v.fastest["strategy"] == "zero2" and "zero1" in [r["strategy"] for r in v.not_fitting]


def test_an_interrupted_cell_is_not_measured_and_not_held_against_its_strategy(llama8b):
    """A deadline's interrupted launch says nothing about fitting: it is listed apart, never as 'did not fit',
    and a layout with nothing else is 'not measured yet', not 'none fits'."""
    ok = launch(llama8b["llama-3.1-8b lora zero1 x2gpu"], 1.0)
    stopped = copy.deepcopy(llama8b["llama-3.1-8b lora zero2 x2gpu"])
    stopped.status = "interrupted"
    alone = copy.deepcopy(llama8b["llama-3.1-8b lora zero2 x4gpu"])
    alone.status = "interrupted"
    frame = build([ok, stopped, alone])
    v = verdict.decide(frame, 2)
    assert v.fastest["strategy"] == "zero1" and v.not_fitting == []
    assert [r["strategy"] for r in v.not_measured] == ["zero2"]
    table = report_tables.verdict_table(frame).set_index("GPUs")
    assert table.loc[2, "did not fit"] == "-" and table.loc[2, "not measured"] == "zero2: interrupted"
    assert table.loc[4, "fastest that fits (tok/s/GPU [95% CI])"] == "not measured yet"


def test_the_not_measured_column_appears_only_when_needed(known):
    assert "not measured" not in report_tables.verdict_table(known).columns


def test_verdict_comes_first_in_the_report(llama8b, tmp_path):
    folder = tmp_path / "results"
    for record in llama8b.values():
        append_record(folder, record)
    out = report.write_report([folder], tmp_path / "rep",
                              options=report.ReportOptions(budget=metrics_budget()))
    md = (out / "index.md").read_text()
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Verdict: which strategy to use"
    assert "> **Warning: the cells compared here ran at mean SM clocks" in md
    assert "cross-policy: pure vs frozen-base" in md
    assert "p10-p90" not in pd.read_csv(out / "scaling_1.csv").to_string()  # the step spread is no error bar
    html = (out / "index.html").read_text()
    assert html.index("Verdict") < html.index("Scaling")


def test_training_peak_beside_the_whole_run_peak(llama8b):
    rec = copy.deepcopy(llama8b["llama-3.1-8b lora fsdp_full_shard x1gpu"])  # built on the GPU: 48.5 GiB whole run
    for rank in rec.ranks:
        rank.update({"training_peak_allocated_bytes": 30 * 2**30, "training_peak_reserved_bytes": 37 * 2**30,
                     "gc": {"frozen_objects": 123, "collections_in_window": 0}})
    table = report_tables.memory_table(build([rec])).iloc[0]
    assert table["torch peak reserved GiB (whole run)"] == "48.46"
    assert table["torch peak reserved GiB (training steps)"] == "37.00"
