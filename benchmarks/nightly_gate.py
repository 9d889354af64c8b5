"""The nightly gate (bench/check/gate.py) re-run on committed nights: false alarms, a synthetic 10 % slowdown, and
the smallest change each cell lets it detect. Nothing is launched; every figure comes from the records.

    python benchmarks/nightly_gate.py results/nightly-rerun-3 results/nightly-rerun-4 results/nightly-rerun-5
    python benchmarks/nightly_gate.py results/nightly results/nightly-rerun-1 results/nightly-rerun-2 --slowdown 1.2

Each folder is one night. Three parts:

1. Leave one out: each night checked against a baseline of the others (what `bench check` does, with
   ``min_nights`` lowered to what is left), then the same night with every timed step time scaled by
   ``--slowdown`` (all ranks; tokens unchanged) checked again: false alarms are flags on the unscaled night
   (any figure: the median step, the floor, throughput, memory, failures), detection the share of timed cells
   flagged on the scaled one on the median step or the floor (the fastest timed step), each also counted.
2. Variance components per cell from all the nights (log scale): between-night s.d. (sqrt of ``between``),
   within-night s.d. (s_w), and the smallest detectable step-time change if all of them were the baseline;
   for the median step and, below it, the floor, with the smaller of the two: what a uniform slowdown needs.
3. What more nights would give, for a baseline of k nights with the spreads of part 2 (simulated: nights
   drawn from a normal model with those components, 3 launches each, 5000 draws by default): the false-alarm rate per
   cell and the detection rate of the same slowdown, for the median, then for the floor on its own. A
   projection from measured spreads, not a measurement.
4. With ``--grid``: the same simulation over a grid of spreads (between nights 0-2 %, within a night 1-5 %,
   2 launches a night, 5 baseline nights): which spreads let the gate catch the slowdown.
5. With ``--window S``: the stopping rule (bench/worker/timing.py) replayed on launches resampled from the
   recorded steps, with each cell's recorded timing settings under three rules: ``independent`` (the
   interval taking steps as independent, the rule before serial dependence was accounted for), ``serial``
   (the current rule: the interval on the effective number of steps), ``serial-cap`` (the same with S timed
   seconds as its cap, no minimum) and ``window`` (a fixed window of S timed seconds,
   ``train.timing.min_timed_s = max_timed_s = S``): per cell, the share of launches that
   stop "converged" before their cap (and of those, with a figure more than 3 % from the median of all the
   cell's recorded steps: fooled by an unrepresentative stretch), the steps taken, and the spread of the launch figure (s.d. of the
   log median step time), which then feeds the projection of part 3 (1 launch a night). Resampling keeps
   runs of consecutive steps together (blocks of ``--block`` steps), so steps that come in episodes stay
   so; ``--draw launch`` picks a recorded launch, then a start in it (a short launch's steps weigh as much
   as a long one's), ``--draw step`` a start among all recorded blocks (each recorded step alike),
   ``--draw within`` one recorded launch for all of a resampled launch's blocks (no shift between nights'
   levels inside a launch: what a rule costs on steps as steady as one launch's). It sees
   only the spread inside launches, none that whole launches or nights add. It also replays each rule on
   every recorded series as it was, step by step: where it would have stopped (``>n``: not within the n
   recorded steps).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bench.check import load_nights
from bench.check.gate import Thresholds, is_timed_ok, prediction_interval, run_check, scaled
from bench.report.metrics import timed_step_times
from bench.spec import CellSettings
from bench.worker.timing import StoppingRule


STEP_FIGURES = ("step_time_s", "step_floor_s")  # the median step and the floor, each judged on its own
SHORT = {"step_time_s": "median", "step_floor_s": "floor"}


def short_label(label: str) -> str:
    return label.split(" x")[0].replace("llama-3.2-1b ", "")


def leave_one_out(folders: list[Path], factor: float, t: Thresholds) -> list[str]:
    """Each night against the others, then scaled by ``factor``: a cell counts as caught when its median step
    or its floor is flagged as a regression (the gate flags a cell on either)."""
    lines, alarms, timed = [], 0, 0
    caught = {"step_time_s": 0, "step_floor_s": 0, "either": 0}
    relaxed = replace(t, min_nights=len(folders) - 1)
    for night in folders:
        others = [f for f in folders if f != night]
        baseline = load_nights(others)
        tonight = load_nights([night])
        plain = run_check(tonight, baseline, relaxed, str(night), "others")
        slow = run_check(scaled(tonight, factor), baseline, relaxed, str(night), "others")
        flagged = [f for f in plain.findings if f.verdict in ("regression", "improvement", "missing")]
        step = {(f.cell_id, f.metric): f for f in slow.findings if f.metric in STEP_FIGURES and f.change is not None}
        cells = {cell_id for cell_id, _ in step}
        hits = {m: {c for (c, metric), f in step.items() if metric == m and f.verdict == "regression"}
                for m in STEP_FIGURES}
        either = hits["step_time_s"] | hits["step_floor_s"]
        alarms += bool(flagged)
        timed += len(cells)
        for m in STEP_FIGURES:
            caught[m] += len(hits[m])
        caught["either"] += len(either)
        detect = ", ".join(f"{short_label(f.label)} {f.detectable:.0%}/{step[(c, 'step_floor_s')].detectable:.0%}"
                           for (c, m), f in step.items() if m == "step_time_s" and (c, "step_floor_s") in step)
        lines.append(f"  {night.name} vs {len(others)} others: {len(flagged)} flag(s) "
                     f"{[f'{f.label} {f.metric} {f.verdict}' for f in flagged]}; x{factor:g}: {len(either)}/{len(cells)} "
                     f"cells flagged (median {len(hits['step_time_s'])}, floor {len(hits['step_floor_s'])}); "
                     f"detectable median/floor: {detect}")
    lines.insert(0, f"leave one out ({len(folders) - 1}-night baselines): nights with a false alarm "
                    f"{alarms}/{len(folders)}; x{factor:g} slowdown flagged on {caught['either']}/{timed} timed cells "
                    f"(median {caught['step_time_s']}, floor {caught['step_floor_s']})")
    return lines


def components(folders: list[Path], t: Thresholds, metric: str = "step_time_s") -> dict[str, tuple]:
    """Per cell: (label, between-night s.d., within-night s.d., launches per night, detectable change) of
    ``metric``'s figure, log scale."""
    from bench.check.gate import group_cells

    out = {}
    for cell_id, cell in group_cells(load_nights(folders)).items():
        nights = cell.figures(metric)
        y = np.array([np.median(x) for x in nights])
        n = np.array([len(x) for x in nights])
        s_w2 = sum(float(((np.asarray(x) - np.mean(x)) ** 2).sum()) for x in nights) / max(1, n.sum() - len(n))
        between = max(0.0, float(np.var(y, ddof=1)) - s_w2 * float((1 / n).mean()))
        half = prediction_interval(nights, int(np.median(n)), t.alpha).half_width
        out[cell_id] = (cell.label, float(np.sqrt(between)), float(np.sqrt(s_w2)), int(np.median(n)),
                        max(t.step_time, float(np.expm1(half))))
    return out


def simulate(sd_between: float, sd_within: float, launches: int, nights: int, shift: float, t: Thresholds,
             draws: int, rng: np.random.Generator) -> tuple[float, float]:
    """(false-alarm rate, detection rate of ``shift``) for one cell under a normal model of its spreads."""
    false, hits = 0, 0
    for _ in range(draws):
        base = [list(rng.normal(rng.normal(0, sd_between), sd_within, launches)) for _ in range(nights)]
        interval = prediction_interval(base, launches, t.alpha)
        for offset, counter in ((0.0, "false"), (np.log(shift), "hit")):
            y = float(np.median(rng.normal(offset + rng.normal(0, sd_between), sd_within, launches)))
            flagged = not interval.contains(y) and np.expm1(y - interval.centre) > t.step_time
            if counter == "false":
                false += flagged
            else:
                hits += flagged
    return false / draws, hits / draws


FOOLED = 0.03  # a launch figure this far from all recorded steps' median, stopped converged: fooled


def block_starts(series: list[np.ndarray], block: int) -> list[tuple[int, int]]:
    """(launch, start) of every run of ``block`` consecutive recorded steps (a shorter launch: its start)."""
    return [(i, start) for i, launch in enumerate(series) for start in range(max(1, len(launch) - block + 1))]


class Launch(NamedTuple):
    median: float
    early: bool  # stopped converged before the time cap
    times: tuple[float, ...]  # the steps it took


def resampled_launch(series: list[np.ndarray], rule: StoppingRule, block: int, rng: np.random.Generator,
                     draw: str = "launch") -> Launch:
    """One launch stepped until ``rule`` stops it, its steps drawn in runs of ``block`` consecutive recorded
    steps (``draw``: "launch", a random launch then a random start; "step", a random start among all recorded
    blocks; "within", a random start in one launch picked once)."""
    starts = block_starts(series, block) if draw == "step" else None
    one = rng.integers(len(series))
    times: list[float] = []
    while True:
        if starts is not None:
            i, start = starts[rng.integers(len(starts))]
        else:
            i = one if draw == "within" else rng.integers(len(series))
            start = rng.integers(max(1, len(series[i]) - block + 1))
        for t in series[i][start:start + block]:
            times.append(float(t))
            if reason := rule.stop_reason(times, timed_s := sum(times)):
                return Launch(float(np.median(times)), reason == "converged" and timed_s < rule.max_timed_s,
                              tuple(times))


def recorded_stop(times: np.ndarray, rule: StoppingRule) -> tuple[int, str] | None:
    """(step, reason) at which ``rule`` would have stopped this recorded series; None if not within it."""
    elapsed = np.cumsum(times)
    for n in range(1, len(times) + 1):
        if reason := rule.stop_reason(list(times[:n]), float(elapsed[n - 1])):
            return n, reason
    return None


def replay_rules(recorded: StoppingRule, window_s: float) -> dict[str, StoppingRule]:
    """The rules part 5 compares, each with the cell's recorded settings; ``serial-cap``: the serial rule with
    the window's length as its cap only (may it stop earlier, or does the cell need the fixed window?)."""
    return {"independent": replace(recorded, serial=False), "serial": replace(recorded, serial=True),
            "serial-cap": replace(recorded, serial=True, max_timed_s=window_s),
            "window": replace(recorded, min_timed_s=window_s, max_timed_s=window_s)}


def replay_window(folders: list[Path], window_s: float, block: int, draws: int, rng: np.random.Generator,
                  draw: str = "launch") -> dict[str, tuple[str, dict[str, dict]]]:
    """Per cell: label, and per rule of ``replay_rules``: ``early`` (share stopped converged before the time
    cap), ``fooled`` (those of them whose figure lies more than ``FOOLED`` from the median of all the cell's
    recorded steps: converged on an unrepresentative stretch, such as one fast episode), ``sd`` (s.d. of the log launch figure), ``shift`` (mean log change of the launch figure against the
    independent rule's), ``steps`` (steps taken, each resampled launch) and ``recorded`` (where and why it
    would have stopped each recorded series, None past its end, with the series' length)."""
    out = {}
    by_cell: dict[str, list] = {}
    for r in load_nights(folders):
        if is_timed_ok(r) and (times := timed_step_times(r)):
            by_cell.setdefault(r.cell_id, []).append((r, np.asarray(times)))
    for cell_id, launches in by_cell.items():
        series = [t for _, t in launches]
        recorded = StoppingRule.from_train(CellSettings.model_validate(launches[0][0].settings).train)
        rules = replay_rules(recorded, window_s)
        figures = {name: [resampled_launch(series, rule, block, rng, draw) for _ in range(draws)]
                   for name, rule in rules.items()}
        centre = float(np.mean(np.log([f.median for f in figures["independent"]])))
        pooled = float(np.median(np.concatenate(series)))
        out[cell_id] = (launches[0][0].label, {
            name: {"early": float(np.mean([f.early for f in fs])),
                   "fooled": float(np.mean([f.early and abs(f.median / pooled - 1) > FOOLED for f in fs])),
                   "sd": float(np.std(np.log([f.median for f in fs]), ddof=1)),
                   "shift": float(np.mean(np.log([f.median for f in fs]))) - centre,
                   "steps": [len(f.times) for f in fs],
                   "recorded": [(recorded_stop(t, rules[name]), len(t)) for t in series]}
            for name, fs in figures.items()})
    return out


def print_window(folders: list[Path], args, t: Thresholds, rng: np.random.Generator) -> None:
    print(f"\nstopping rule replayed ({args.replay_draws} resampled launches a cell, blocks of {args.block} steps, "
          f"drawn by {args.draw}): recorded timing settings, steps taken as independent / the serial-dependence "
          f"interval / the same capped at {args.window:g} s / a fixed {args.window:g} s window; then the projection of part 3 with that spread, 1 launch "
          f"a night: false alarms / x{args.slowdown:g} detected; and where each rule stops the recorded series")
    for label, rows in replay_window(folders, args.window, args.block, args.replay_draws, rng, args.draw).values():
        for name, row in rows.items():
            proj = "  ".join(f"k={k}: {fa:.1%} / {hit:.0%}" for k in (5, 10)
                             for fa, hit in [simulate(0.0, row["sd"], 1, k, args.slowdown, t, args.draws, rng)])
            stops = ", ".join(f">{length}" if stop is None else str(stop[0]) if stop[1] == "converged"
                              else f"{stop[0]} ({stop[1]})" for stop, length in row["recorded"])
            print(f"  {label:45s} {name:11s} converged before the cap {row['early']:4.0%} (>{FOOLED:.0%} off: "
                  f"{row['fooled']:4.1%})  steps median "
                  f"{np.median(row['steps']):4.0f} mean {np.mean(row['steps']):5.1f}  launch s.d. {row['sd']:5.1%}  "
                  f"figure {np.expm1(row['shift']):+5.1%}   {proj}   recorded series stop at [{stops}]")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("nights", nargs="+", type=Path, help="night folders (3 or more), one hardware")
    p.add_argument("--slowdown", type=float, default=1.10, help="step-time factor of the synthetic slowdown")
    p.add_argument("--draws", type=int, default=5000, help="simulated nights per cell and baseline size")
    p.add_argument("--grid", action="store_true", help="also simulate a grid of spreads (part 4)")
    p.add_argument("--window", type=float, help="also replay the stopping rule with a fixed window of this many "
                                                "timed seconds (part 5)")
    p.add_argument("--block", type=int, default=10, help="consecutive recorded steps kept together (part 5)")
    p.add_argument("--replay-draws", type=int, default=400, help="resampled launches per cell and rule (part 5)")
    p.add_argument("--draw", choices=("launch", "step", "within"), default="launch",
                   help="part 5: a random launch then a start in it, a start among all recorded blocks, or starts "
                        "in one launch")
    args = p.parse_args(argv)
    t = Thresholds()
    print("\n".join(leave_one_out(args.nights, args.slowdown, t)))
    comps = components(args.nights, t)
    floors = components(args.nights, t, "step_floor_s")
    print(f"\nper cell, all {len(args.nights)} nights (log-scale s.d. ~ relative): between nights, within a night; "
          f"smallest detectable step-time change with all of them as the baseline")
    for cell_id, (label, sd_b, sd_w, n, detectable) in comps.items():
        print(f"  {label:45s} between {sd_b:6.1%}  within {sd_w:6.1%}  ({n} launches a night)  "
              f"detectable {detectable:6.1%}")
        if cell_id in floors:
            _, fb, fw, _, fdet = floors[cell_id]
            print(f"  {'  floor (fastest timed step)':45s} between {fb:6.1%}  within {fw:6.1%}  "
                  f"{'':20s}  detectable {fdet:6.1%}   a uniform slowdown: {min(detectable, fdet):6.1%}")
    rng = np.random.default_rng(17)
    print(f"\nprojection (simulated from those spreads, {args.draws} draws): false alarms per cell-night / "
          f"x{args.slowdown:g} detected, for k baseline nights")
    for label, sd_b, sd_w, n, _ in comps.values():
        cells = []
        for k in (3, 5, 7, 10):
            fa, hit = simulate(sd_b, sd_w, n, k, args.slowdown, t, args.draws, rng)
            cells.append(f"k={k}: {fa:.1%} / {hit:.0%}")
        print(f"  {label:45s} " + "  ".join(cells))
    floor_rng = np.random.default_rng(18)  # its own draws: the lines above and below stay as they were
    print("  the floor, from its spreads (judged on its own; the gate flags a cell on either figure):")
    for label, sd_b, sd_w, n, _ in floors.values():
        cells = [f"k={k}: {fa:.1%} / {hit:.0%}" for k in (3, 5, 7, 10)
                 for fa, hit in [simulate(sd_b, sd_w, n, k, args.slowdown, t, args.draws, floor_rng)]]
        print(f"  {'  ' + short_label(label) + ' floor':45s} " + "  ".join(cells))
    if args.grid:
        print(f"\ngrid (simulated, {args.draws} draws): 5 baseline nights, 2 launches a night; false alarms per "
              f"cell-night / x{args.slowdown:g} detected")
        for sd_b in (0.0, 0.01, 0.02):
            row = [f"within {sd_w:.0%}: {fa:.1%} / {hit:.0%}" for sd_w in (0.01, 0.02, 0.03, 0.05)
                   for fa, hit in [simulate(sd_b, sd_w, 2, 5, args.slowdown, t, args.draws, rng)]]
            print(f"  between {sd_b:.0%}:  " + "  ".join(row))
    if args.window:
        print_window(args.nights, args, t, rng)
    return 0


if __name__ == "__main__":
    sys.exit(main())
