"""What a reader must be warned of beside a table: lines the report prints above it and in the terminal.

- the compared cells ran at mean SM clocks more than 3 % apart (the card, not the strategy, may differ);
- Python's garbage collector ran inside a timed window (issue 16: kept out of it, and a stray collection
  made visible: bench/worker/gc_window.py);
- a launch's optimizer holds no state after steps that should have updated the weights: they trained nothing;
- the optimizer skipped its update in timed steps (fp16's loss scaler after inf/NaN gradients: no optimizer work);
- torch.compile compiled inside the timed steps (issue 21: compile time belongs to the warm-up);
- an auto micro-batch cell whose launches chose different micro-batches (bench/report/repeats.py);
- a GPU cell whose cards were busy less than 90 % of its timed window: its steps wait on the host;
- a cell whose host gave more than 5 % of its CPU time to other guests (a VM's steal) while it was timed;
- a host-bound cell whose host CPU ran Python at half pace (the CPU probe) where another cell's ran at full.
Each looks at the ok rows of one table and returns None when there is nothing to say.
"""

from __future__ import annotations

import pandas as pd

from bench.report import host_steady, metrics
from bench.report.text import run_name

CLOCK_TOLERANCE = 0.03  # compared cells whose mean SM clocks differ by more get a warning
# NVML's utilisation: the share of time a kernel ran. Below this over the timed window, the card waited on the host
# (2x H200: ZeRO-3 and FSDP LoRA cells of llama8b 70-86 %, the others 93-97 %; results/llama8b-h200-a).
HOST_BOUND_BUSY_PCT = 90.0
STEAL_TOLERANCE = 0.05  # a virtual machine's CPU time taken by the hypervisor above this while timed: a warning
# The host CPU probe (bench/worker/cpu_probe.py) on 2x H200 read either 3.8-4.8 ms or 6.3-10.2 ms, flipping between
# and inside launches of one machine (results/llama8b-h200-c, -d); the host-bound cells of the slower launches ran
# 10-22 % slower. A cell whose probe reads more than this times the fastest of the table ran on the slow host: the
# same cut as for a step's light readings (bench/report/host_steady.py).
SLOW_HOST_RATIO = host_steady.SLOW_RATIO
# A host-bound cell whose figure over its steps on a steady host (bench/report/host_steady.py) is more than this
# above its headline: the slow host's part is larger than issue 16's agreement bar.
STEADY_HOST_GAP = 0.02


def clock_warning(rows: pd.DataFrame) -> str | None:
    """A warning when the compared ok cells ran at mean SM clocks more than 3 % apart; None otherwise."""
    spread = metrics.clock_spread(rows)
    if spread is None or spread[1] <= spread[0] * (1 + CLOCK_TOLERANCE):
        return None
    ok = rows[(rows["status"] == "ok") & rows["sm_clock_mean_mhz"].notna()]
    slow, fast = ok.loc[ok["sm_clock_mean_mhz"].idxmin()], ok.loc[ok["sm_clock_mean_mhz"].idxmax()]
    return (f"Warning: the cells compared here ran at mean SM clocks {spread[1] / spread[0] - 1:.1%} apart "
            f"({spread[0]:.0f} MHz {run_name(slow)} to {spread[1]:.0f} MHz {run_name(fast)}); part of a speed "
            "difference may be the card's clock (power cap or heat, see Card state), not the strategy."
            + _fastest_clock_note(ok, slow, fast))


def _fastest_clock_note(ok: pd.DataFrame, slow: pd.Series, fast: pd.Series) -> str:
    """Which way the clock leans for the fastest cell: a lead won at the lowest clock is not the clock's."""
    speed = ok["real_tokens_per_s_per_gpu"].dropna() if "real_tokens_per_s_per_gpu" in ok.columns else None
    if speed is None or speed.empty:
        return ""
    leader = speed.idxmax()
    if leader == slow.name:
        return f" The fastest of them, {run_name(slow)}, ran at the lowest clock: the clock does not explain its lead."
    if leader == fast.name:
        return f" The fastest of them, {run_name(fast)}, ran at the highest clock: part of its lead may be the clock."
    return ""


def _ok_with(rows: pd.DataFrame, column: str, keep=None) -> pd.DataFrame:
    """The ok rows whose ``column`` is set (absent in records from before it) and truthy, or passes ``keep``."""
    if column not in rows.columns:
        return rows.iloc[:0]
    values = rows[column]
    chosen = keep(values) if keep else values.astype(bool)
    return rows[(rows["status"] == "ok") & values.notna() & chosen]


def _cells_with(rows: pd.DataFrame, column: str, figure, keep=None, ascending: bool | None = None) -> str | None:
    """'ddp x2 GPU (3), ...': the ok cells whose ``column`` is set (and passes ``keep``), each with
    ``figure(row)``, ordered by the column when ``ascending`` is given; None if none."""
    hit = _ok_with(rows, column, keep)
    if not len(hit):
        return None
    if ascending is not None:
        hit = hit.sort_values(column, ascending=ascending)
    return ", ".join(f"{run_name(r)} ({figure(r)})" for _, r in hit.iterrows())


def gc_warning(rows: pd.DataFrame) -> str | None:
    """Issue 16: a garbage collection inside the timed window must be visible (bench/worker/gc_window.py)."""
    cells = _cells_with(rows, "gc_collections_in_window", lambda r: f"{r['gc_collections_in_window']:.0f}")
    if cells is None:
        return None
    return (f"Warning: Python's garbage collector ran inside the timed window of {cells} (collections in the "
            "worst launch): a library called gc.collect() while the collector was off; those step times include it.")


def updated_nothing_warning(rows: pd.DataFrame) -> str | None:
    """Steps that should have updated the weights left the optimizer without state: what was timed is not a
    training step (once: FSDP1 without use_orig_params stepping orphaned parameters)."""
    hit = _ok_with(rows, "optimizer_updated_nothing", keep=lambda v: v.astype(float) > 0)
    if not len(hit):
        return None
    cells = ", ".join(run_name(r) for _, r in hit.iterrows())
    return (f"Warning: the optimizer of {cells} holds no state after steps that should have updated the weights: "
            "those steps trained nothing, so their times and memory are not a training step's (a bench bug: "
            "report it with the cell's record).")


def skipped_update_warning(rows: pd.DataFrame) -> str | None:
    """fp16's loss scaler skips the update after inf/NaN gradients and lowers its scale: such a step does no
    optimizer work, so timed it reads shorter than the steps a training run is made of."""
    cells = _cells_with(rows, "optimizer_skipped_in_window", lambda r: f"{r['optimizer_skipped_in_window']:.0f}",
                        keep=lambda v: v > 0)
    if cells is None:
        return None
    return (f"Warning: the optimizer skipped its update in timed steps of {cells} (steps, worst launch): fp16's loss "
            "scaler found inf/NaN gradients and lowered its scale, so those steps did no optimizer work and their "
            "median may read short (more train.warmup_steps, or a lower initial loss scale).")


def compile_warning(rows: pd.DataFrame) -> str | None:
    """Issue 21: compilation belongs to the warm-up; compiled inside timed steps, the step times include it."""
    cells = _cells_with(rows, "compiled_in_timed_steps", lambda r: f"{r.get('compile_s_in_timed_steps', 0):.1f} s")
    if cells is None:
        return None
    return (f"Warning: torch.compile compiled inside the timed steps of {cells} (worst launch): those step times "
            "include compilation (a recompile: more train.warmup_steps, or a shape that changes between steps).")


def micro_batch_warning(rows: pd.DataFrame) -> str | None:
    """An auto cell whose launches chose different micro-batches: only one micro-batch's launches pooled."""
    hit = _ok_with(rows, "micro_batch_note")
    if not len(hit):
        return None
    return "Note: " + "; ".join(f"{run_name(r)}: {r['micro_batch_note']}" for _, r in hit.iterrows()) + "."


def host_bound_note(rows: pd.DataFrame) -> str | None:
    """GPU cells whose cards idled a good part of the timed window: their step time follows the host (Python,
    kernel launches, the CPU's speed and neighbours), which moves between launches more than inside one."""
    cells = _cells_with(rows, "util_mean_pct", lambda r: f"{r['util_mean_pct']:.0f} %",
                        keep=lambda busy: busy < HOST_BOUND_BUSY_PCT, ascending=True)
    if cells is None:
        return None
    return (f"Note: the cards of {cells} were busy less than {HOST_BOUND_BUSY_PCT:.0f} % of the timed window (NVML "
            "utilisation): those steps wait on the host, so their time varies between launches more than one "
            "launch's interval shows, and a higher SM clock there comes from idling under the power cap, not a "
            "head start.")


def steal_warning(rows: pd.DataFrame) -> str | None:
    """Cells timed while the hypervisor took CPU time from the host: their host-side work ran slower."""
    cells = _cells_with(rows, "steal_share", lambda r: f"{r['steal_share']:.0%}",
                        keep=lambda stolen: stolen > STEAL_TOLERANCE)
    if cells is None:
        return None
    return (f"Warning: while {cells} were timed, the host's hypervisor gave more than {STEAL_TOLERANCE:.0%} of its "
            "CPU time to other guests (steal): their host-side work, and so steps that wait on the host, ran slower.")


def slow_host_warning(rows: pd.DataFrame) -> str | None:
    """Host-bound cells (cards busy below HOST_BOUND_BUSY_PCT) whose host CPU probe read more than SLOW_HOST_RATIO
    times the fastest probe of the table. The probe is read just before and just after the window, not inside
    it (c's FSDP x2 read 8.4 ms on one rank and ran 20 % faster than d's at 6.5), so this says the host was slow
    around the window, a reason to look, not a measured slowdown. None where the records have no probe; cells
    whose records read the pace before every step are left to steady_host_warning, which measured inside."""
    probed = _ok_with(rows, "cpu_probe_ms", keep=lambda ms: ms > 0)
    if "host_slow_step_share" in probed.columns:
        probed = probed[probed["host_slow_step_share"].isna()]
    if not len(probed):
        return None
    fastest = float(probed["cpu_probe_ms"].min())
    slow = probed[(probed["cpu_probe_ms"] > SLOW_HOST_RATIO * fastest)]
    cells = _cells_with(slow, "util_mean_pct", lambda r: f"{r['cpu_probe_ms']:.1f} ms",
                        keep=lambda busy: busy < HOST_BOUND_BUSY_PCT)
    if cells is None:
        return None
    return (f"Warning: the host CPU probe of {cells} read more than {SLOW_HOST_RATIO:g}x the fastest here "
            f"({fastest:.1f} ms): at the ends of their timed windows the host ran Python at about half pace, and "
            "if it did inside them too, where their cards waited on it, their figures carry the host's pace, not "
            "the strategy's (compare launches with alike probes, or rerun them; Card state).")


def steady_host_warning(rows: pd.DataFrame) -> str | None:
    """Host-bound cells whose steps on a steady host (the per-step pace readings: bench/report/host_steady.py) gave
    more than STEADY_HOST_GAP above their headline figure: measured inside the window, the slow host's part."""
    if "real_tokens_per_s_host_steady" not in rows.columns:
        return None
    busy = rows["util_mean_pct"] < HOST_BOUND_BUSY_PCT if "util_mean_pct" in rows.columns else False
    gap = rows["real_tokens_per_s_host_steady"] / rows[metrics.THROUGHPUT] - 1
    hit = rows[(rows["status"] == "ok") & busy & (gap > STEADY_HOST_GAP)]
    if not len(hit):
        return None
    cells = ", ".join(f"{run_name(r)} ({r['host_slow_step_share']:.0%} of steps; "
                      f"{r['real_tokens_per_s_host_steady'] / r['processes']:,.0f} tok/s/GPU, "
                      f"{r['real_tokens_per_s_host_steady'] / r[metrics.THROUGHPUT] - 1:+.1%})" for _, r in hit.iterrows())
    return (f"Warning: part of the timed steps of {cells} ran on a slow host (the pace read before each step), and on "
            f"a steady host these cells gave more than {STEADY_HOST_GAP:.0%} over their figure here: their cards "
            "waited on the host, so the gap is the host's pace, not the strategy's (Card state).")


def warnings_for(rows: pd.DataFrame) -> list[str]:
    """Beside every comparing table: the clocks, and cards that waited on the host."""
    return [w for w in (clock_warning(rows), host_bound_note(rows), steal_warning(rows), slow_host_warning(rows),
                        steady_host_warning(rows)) if w]


def verdict_warnings(rows: pd.DataFrame) -> list[str]:
    """Beside the verdict, once per setting (the report opens with it, and the terminal prints it): the clocks
    and what went wrong inside a launch's timed window or between its launches."""
    return [w for w in (clock_warning(rows), host_bound_note(rows), steal_warning(rows), slow_host_warning(rows),
                        steady_host_warning(rows), updated_nothing_warning(rows), gc_warning(rows), skipped_update_warning(rows),
                        compile_warning(rows),
                        micro_batch_warning(rows)) if w]
