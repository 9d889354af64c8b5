"""The nightly gate: is tonight's run of a matrix slower, bigger or failing more often than the baseline nights
of the same hardware?

Cells are matched by id (a hash of all their settings) and only like is compared with like: both sides must
come from the same hardware (``env.hardware``: GPU model and count, or the CPU); anything else is refused
(exit 2), never compared. A differing software fingerprint (library versions, CUDA, NCCL, driver, git sha)
is not refused but shown beside the verdict, since it is usually what is under test.

The night is the unit. Launches of one night share its conditions (the host's other load, clocks, the
cards, the allocator's luck), so they are not independent evidence: whole nights drift together. A baseline
is therefore a set of nights (at least 3, each record carrying its ``night``), and tonight is one more.

Timing rule, per cell, for step time and for throughput on real (non-padding) tokens, on the log scale:

    x_jl = log of launch l's figure in baseline night j: its median over timed steps of the step time (the
           slowest rank per step), or real tokens per step (all ranks) / that median step time
    y_j  = median over l of x_jl: night j's figure (j = 1..k, the nights with an ok launch of the cell);
           n_j launches, N = sum n_j, n_h = their harmonic mean
    c    = mean of y_j                                  the baseline's centre
    s_b2 = sample variance of y_j (ddof 1)              spread between nights (their launch noise included)
    s_w2 = sum_j sum_l (x_jl - mean_l x_jl)^2 / (N - k) spread between launches of one night (0 if N = k)
    between = max(0, s_b2 - s_w2 / n_h)                 what nights add beyond their own launch noise
    V    = between + s_w2 / m + s_b2 / k                variance of tonight's figure (m launches) minus c
    h    = t(1 - alpha/2, k - 1) * sqrt(V)              half-width of the prediction interval, log scale

  With m = n_h this is the textbook interval for one new observation, t * s_b * sqrt(1 + 1/k); the split
  lets a night with another launch count be judged fairly. (The within-night term treats the median of m
  launches as their mean, a mild approximation.) With alpha = 0.05 and nights that behave like the baseline
  nights, tonight falls outside ``c +- h`` in 5 % of nights, 2.5 % on the slow side.
  A cell is flagged when tonight's figure y lies outside the interval AND the change exp(y - c) - 1 is past
  the metric's threshold (default 5 %): a slowdown is a regression, a speed-up an improvement. The smallest
  change the gate can detect on this cell and hardware is max(threshold, exp(h) - 1); the report prints it
  per cell, so a 5 % threshold on a cell whose nights wander 20 % is seen to be nominal.
  A cell with fewer than ``min_nights`` baseline nights with ok launches is not judged on timing (said so).

The floor (``step_floor_s``): step time is judged a second time, on each launch's fastest timed step (the
slowest rank per step, the minimum over timed steps; a night's figure the median over its launches), with the
same interval, threshold, verdicts and detectable change as the median. Why: ZeRO-3's steps come in episodes,
runs of fast steps (~365-375 ms on 2x H200) and runs of slow ones (400-490 ms), and the share of fast steps in
a 60 s window wanders from night to night (11-32 % of steps under 390 ms), so its median measures that mixture (nights 2.9 % apart,
a 10 % slowdown moved one night's median +1.3 %) while its floor stays put (0.8 %; 0.3 % in earlier nights) and
moved +9.1 % (results/baselines/README.md). Each figure is judged at ``alpha`` on its own, and a cell is flagged
when any of them is: a night like the baseline's risks a false flag of up to the sum of the figures' (less, as
they move together), measured on the committed nights by benchmarks/nightly_gate.py. What the floor cannot see:
a regression that only lengthens or multiplies the slow stretches and leaves the fastest step alone; that is
the median's job.

Failures: a launch is failed when its status is a failure (crash, oom, hang, timeout, unsupported,
predicted_oom); busy, interrupted and skipped launches measured nothing and are left out of both counts. A
higher failure fraction tonight than over all baseline launches is a regression (1 crash in 9 baseline
launches, 3 in 3 tonight: regression), a lower one an improvement. A baseline cell that tonight did not
measure at all is a regression (``missing``); a new cell is listed without verdict.

Peak memory (torch peak reserved, max over ranks, on GPU; host RSS peak on CPU; median over ok launches)
is deterministic enough for a plain threshold: flagged when it grows by more than both the relative and the
absolute threshold (default +3 % and +256 MiB). A drop past both is listed as an improvement.

A night slowed on purpose (``--slow-step``, bench/worker/slowdown.py) is named as such in the output; a baseline
holding such a night is refused.

Exit codes: 0 no regression, 1 at least one regression, 2 bad input (see bench.cli).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import t as student_t

from bench.check.baseline import (MIN_NIGHTS, BaselineError, load_any, load_nights, night_of, resolve_auto, single_hardware,
                            validate_nights)
from bench.records import RunRecord, latest_runs
from bench.report.metrics import timed_step_times, tokens_per_step
from bench.worker.slowdown import injected_slowdown

SOFTWARE_KEYS = ("git_sha", "python", "cuda", "nccl", "driver", "cuda_driver", "platform")
FAILED = {"crash", "oom", "hang", "timeout", "unsupported", "predicted_oom"}
NOT_MEASURED = {"busy", "interrupted", "skipped", "cancelled"}  # cancelled: a Slurm job someone ended


@dataclass(frozen=True)
class Thresholds:
    step_time: float = 0.05  # relative change of the night's figure
    tokens_per_s: float = 0.05
    memory: float = 0.03  # relative growth ...
    memory_mib: float = 256.0  # ... and absolute growth, both exceeded
    alpha: float = 0.05  # 1 - coverage of the two-sided prediction interval for a new night
    min_nights: int = MIN_NIGHTS  # baseline nights a check needs


@dataclass
class Finding:
    """One metric of one cell, compared."""

    cell_id: str
    label: str
    metric: str  # status | step_time_s | step_floor_s | real_tokens_per_s | peak_memory_bytes
    verdict: str  # regression | improvement | unchanged | unjudged | new | missing
    baseline: float | str | None = None  # timing: the centre of the baseline nights (geometric mean)
    current: float | str | None = None  # timing: tonight's figure
    change: float | None = None  # relative, (current - baseline) / baseline
    interval: tuple[float, float] | None = None  # timing: prediction interval for a new night
    detectable: float | None = None  # timing: smallest relative change the gate can flag on this cell
    nights: str = ""  # e.g. "3 nights x 3 launches vs 3 launches"
    why: str = ""


@dataclass
class CheckResult:
    results: str
    baseline: str
    hardware: str
    software_diff: dict[str, tuple]
    thresholds: Thresholds
    baseline_nights: list[str] = field(default_factory=list)
    slowed: dict | None = None  # tonight's injected slowdown, if any (bench/worker/slowdown.py)
    findings: list[Finding] = field(default_factory=list)

    def by_verdict(self, verdict: str) -> list[Finding]:
        return [f for f in self.findings if f.verdict == verdict]

    @property
    def exit_code(self) -> int:
        return 1 if self.by_verdict("regression") or self.by_verdict("missing") else 0


# ---------------------------------------------------------------- per-launch figures

def has_real_tokens(record: RunRecord) -> bool:
    return all("real_tokens" in s for rank in record.ranks for s in rank["steps"] if s["phase"] == "timed")


def launch_step_time(record: RunRecord) -> float:
    return float(np.median(timed_step_times(record)))


def launch_step_floor(record: RunRecord) -> float:
    """The fastest timed step (the slowest rank's time in each step): the floor that episodes of slow steps
    sit above (see the module docstring)."""
    return float(min(timed_step_times(record)))


def launch_throughput(record: RunRecord) -> float | None:
    """Real (non-padding) tokens per step of all ranks / the launch's median step time; None for records
    written before steps counted real tokens."""
    return tokens_per_step(record, real=True) / launch_step_time(record) if has_real_tokens(record) else None


def launch_peak_memory(record: RunRecord) -> tuple[float, str]:
    reserved = [k["torch_peak_reserved_bytes"] for k in record.ranks if "torch_peak_reserved_bytes" in k]
    if reserved:
        return float(max(reserved)), "torch peak reserved"
    return float(max(k.get("host_rss_peak_bytes", 0) for k in record.ranks)), "host RSS peak"


def is_timed_ok(record: RunRecord) -> bool:
    return record.status == "ok" and bool(timed_step_times(record))


# the per-launch figure each timed metric is judged on (a night's figure: their median over its launches)
LAUNCH_FIGURE = {"step_time_s": launch_step_time, "step_floor_s": launch_step_floor,
                 "real_tokens_per_s": launch_throughput}


# ---------------------------------------------------------------- the prediction interval

@dataclass
class Interval:
    centre: float  # log scale
    half_width: float  # log scale
    nights: int

    def contains(self, y: float) -> bool:
        return abs(y - self.centre) <= self.half_width

    @property
    def detectable(self) -> float:
        """The relative slowdown at the interval's edge."""
        return float(np.expm1(self.half_width))


def prediction_interval(nights: list[list[float]], tonight_launches: int, alpha: float) -> Interval:
    """``nights``: per baseline night, its launches' figures (log scale). See the module docstring."""
    k = len(nights)
    y = np.array([np.median(x) for x in nights])
    n = np.array([len(x) for x in nights])
    s_b2 = float(np.var(y, ddof=1))
    df_w = int(n.sum()) - k
    s_w2 = sum(float(((np.asarray(x) - np.mean(x)) ** 2).sum()) for x in nights) / df_w if df_w else 0.0
    n_h = k / float((1 / n).sum())
    between = max(0.0, s_b2 - s_w2 / n_h)
    variance = between + s_w2 / tonight_launches + s_b2 / k
    return Interval(float(y.mean()), float(student_t.ppf(1 - alpha / 2, k - 1) * np.sqrt(variance)), k)


# ---------------------------------------------------------------- per-cell data

@dataclass
class CellNights:
    """One cell's launches on one side, grouped by night (tonight: one night)."""

    label: str
    by_night: dict[str, list[RunRecord]]

    @property
    def records(self) -> list[RunRecord]:
        return [r for rs in self.by_night.values() for r in rs]

    def measured(self) -> list[RunRecord]:
        return [r for r in self.records if r.status not in NOT_MEASURED]

    def failures(self) -> Counter:
        return Counter(r.status for r in self.measured() if r.status in FAILED)

    def figures(self, metric: str) -> list[list[float]]:
        """Per night with ok launches: each launch's figure, log scale (throughput: those that count real tokens)."""
        per_night = []
        for records in self.by_night.values():
            values = [LAUNCH_FIGURE[metric](r) for r in records if is_timed_ok(r)]
            values = [np.log(v) for v in values if v is not None and v > 0]
            if values:
                per_night.append(values)
        return per_night

    def peak_memory(self) -> tuple[float | None, str]:
        peaks = [launch_peak_memory(r) for r in self.records if is_timed_ok(r)]
        if not peaks:
            return None, ""
        return float(np.median([p for p, _ in peaks])), peaks[0][1]


def group_cells(records: list[RunRecord], night: str | None = None) -> dict[str, CellNights]:
    """Cells of one side; ``night`` names the night of every record (tonight), else each record's ``night``."""
    cells: dict[str, CellNights] = {}
    by_night: dict[str, list[RunRecord]] = {}
    for r in records:
        by_night.setdefault(night or night_of(r) or "", []).append(r)
    for name, rs in by_night.items():
        for r in sorted(latest_runs(rs), key=lambda r: r.repeat):
            cell = cells.setdefault(r.cell_id, CellNights(r.label, {}))
            cell.by_night.setdefault(name, []).append(r)
    return cells


# ---------------------------------------------------------------- comparisons

WORSE_IS_HIGHER = {"step_time_s": True, "step_floor_s": True, "real_tokens_per_s": False}


def compare_timing(cell_id: str, base: CellNights, cur: CellNights, metric: str, threshold: float,
                   t: Thresholds) -> Finding | None:
    nights, tonight = base.figures(metric), cur.figures(metric)
    if not tonight or not nights:
        return None
    launches = sum(len(x) for x in nights)
    finding = Finding(cell_id, cur.label, metric, "unjudged", current=float(np.exp(np.median(tonight[0]))),
                      nights=f"{len(nights)} nights, {launches} launches vs {len(tonight[0])} launches")
    if len(nights) < t.min_nights:
        finding.why = (f"only {len(nights)} baseline night(s) with ok launches of this cell "
                       f"(needs {t.min_nights}): not judged on timing")
        return finding
    interval = prediction_interval(nights, len(tonight[0]), t.alpha)
    y = float(np.median(tonight[0]))
    finding.baseline = float(np.exp(interval.centre))
    finding.change = float(np.expm1(y - interval.centre))
    finding.interval = (float(np.exp(interval.centre - interval.half_width)),
                        float(np.exp(interval.centre + interval.half_width)))
    finding.detectable = max(threshold, interval.detectable)
    nominal = " (the threshold is nominal here)" if interval.detectable > threshold else ""
    coverage = f"{1 - t.alpha:.0%}"
    if interval.contains(y):
        finding.verdict = "unchanged"
        finding.why = f"inside the {coverage} interval of a new night; detectable: {finding.detectable:.1%}{nominal}"
    elif abs(finding.change) <= threshold:
        finding.verdict = "unchanged"
        finding.why = f"outside the interval but within {threshold:.0%}"
    else:
        worse = finding.change > 0 if WORSE_IS_HIGHER[metric] else finding.change < 0
        finding.verdict = "regression" if worse else "improvement"
        finding.why = (f"{finding.change:+.1%}: outside the {coverage} interval of a new night and past "
                       f"{threshold:.0%}; detectable: {finding.detectable:.1%}{nominal}")
    return finding


def compare_memory(cell_id: str, base: CellNights, cur: CellNights, t: Thresholds) -> Finding | None:
    (mb, kind), (mc, _) = base.peak_memory(), cur.peak_memory()
    if mb is None or mc is None or mb <= 0:
        return None
    delta, change = mc - mb, (mc - mb) / mb
    finding = Finding(cell_id, cur.label, "peak_memory_bytes", "unchanged", mb, mc, change, why=kind,
                      nights=f"median of {len([r for r in base.records if is_timed_ok(r)])} vs "
                             f"{len([r for r in cur.records if is_timed_ok(r)])} launches")
    if abs(change) > t.memory and abs(delta) > t.memory_mib * 2**20:
        finding.verdict = "regression" if delta > 0 else "improvement"
        finding.why = f"{kind}: {delta / 2**20:+.0f} MiB ({change:+.1%}), over {t.memory:.0%} and {t.memory_mib:g} MiB"
    return finding


def _failure_summary(cell: CellNights) -> str:
    measured, failures = len(cell.measured()), cell.failures()
    parts = [f"ok {measured - sum(failures.values())}/{measured}"]
    return ", ".join(parts + [f"{s} {k}/{measured}" for s, k in sorted(failures.items())])


def compare_failures(cell_id: str, base: CellNights, cur: CellNights) -> Finding | None:
    """Failure fractions: tonight's failed launches over its measured ones against the baseline's."""
    nb, nc = len(base.measured()), len(cur.measured())
    if nc == 0:
        return Finding(cell_id, cur.label, "status", "missing", _failure_summary(base), "not measured",
                       why="no launch of this cell measured anything tonight "
                           f"({', '.join(sorted({r.status for r in cur.records}))})")
    fb = sum(base.failures().values()) / nb if nb else 0.0
    fc = sum(cur.failures().values()) / nc
    if fb == 0 and fc == 0:
        return None
    verdict = "regression" if fc > fb else "improvement" if fc < fb else "unchanged"
    why = {"regression": "more failed launches than the baseline",
           "improvement": "fewer failed launches than the baseline",
           "unchanged": "same failure fraction as the baseline"}[verdict]
    return Finding(cell_id, cur.label, "status", verdict, _failure_summary(base), _failure_summary(cur),
                   change=fc - fb, why=f"{why} ({fc:.0%} vs {fb:.0%})", nights=f"{nb} vs {nc} launches")


def compare_cell(cell_id: str, base: CellNights, cur: CellNights, t: Thresholds) -> list[Finding]:
    findings = [compare_failures(cell_id, base, cur),
                compare_timing(cell_id, base, cur, "step_time_s", t.step_time, t),
                compare_timing(cell_id, base, cur, "step_floor_s", t.step_time, t),
                compare_timing(cell_id, base, cur, "real_tokens_per_s", t.tokens_per_s, t),
                compare_memory(cell_id, base, cur, t)]
    return [f for f in findings if f is not None]


# ---------------------------------------------------------------- whole check

def software_diff(base: list[RunRecord], cur: list[RunRecord]) -> dict[str, tuple]:
    """Fingerprint fields (libraries included) that differ: shown beside the verdict, never refused."""

    def flat(env: dict) -> dict:
        out = {k: env.get(k) for k in SOFTWARE_KEYS}
        out.update({lib: v for lib, v in (env.get("libraries") or {}).items()})
        return out

    fb, fc = flat(base[-1].env), flat(cur[-1].env)
    return {k: (fb.get(k), fc.get(k)) for k in sorted(set(fb) | set(fc)) if fb.get(k) != fc.get(k)}


def check_hardware(base: list[RunRecord], cur: list[RunRecord], base_src: str, cur_src: str) -> str:
    hb, hc = single_hardware(base, base_src), single_hardware(cur, cur_src)
    if hb != hc:
        raise BaselineError(
            f"hardware mismatch: the baseline {base_src} was measured on {hb!r}, the results {cur_src} on "
            f"{hc!r}. Timings from different hardware are not comparable, so nothing was compared. "
            f"Fix: use the baseline for {hc!r} (--baseline auto), or make one on that machine: 3 or more "
            f"nights of `bench nightly MATRIX --no-verdict`, then `bench baseline promote NIGHT...`")
    return hb


def run_check(current: list[RunRecord], baseline: list[RunRecord], thresholds: Thresholds = Thresholds(),
              current_src: str = "results", baseline_src: str = "baseline") -> CheckResult:
    """Compare tonight's records (one night) with baseline records (each carrying its night).
    Raises BaselineError on input that must not be compared."""
    hardware = check_hardware(baseline, current, baseline_src, current_src)
    nights = validate_nights(baseline, baseline_src, thresholds.min_nights)
    slowed = next((s for r in current if (s := injected_slowdown(r))), None)
    result = CheckResult(current_src, baseline_src, hardware, software_diff(baseline, current), thresholds,
                         nights, slowed)
    base_cells, cur_cells = group_cells(baseline), group_cells(current, night="tonight")
    for cell_id, base in base_cells.items():
        if cell_id not in cur_cells:
            result.findings.append(Finding(cell_id, base.label, "status", "missing",
                                           why="in the baseline, not run tonight"))
            continue
        result.findings += compare_cell(cell_id, base, cur_cells[cell_id], thresholds)
    for cell_id, cur in cur_cells.items():
        if cell_id not in base_cells:
            result.findings.append(Finding(cell_id, cur.label, "status", "new", why="no baseline for this cell"))
    return result


# ---------------------------------------------------------------- entry points for the CLI

def parse_thresholds(items: list[str], alpha: float = 0.05, memory_mib: float = 256.0,
                     min_nights: int = MIN_NIGHTS) -> Thresholds:
    """``["step_time=3", "memory=5"]`` (percent) -> Thresholds; unknown metric names are bad input."""
    values = {"alpha": alpha, "memory_mib": memory_mib, "min_nights": min_nights}
    names = ("step_time", "tokens_per_s", "memory")
    for item in items:
        name, _, pct = item.partition("=")
        if name not in names:
            raise BaselineError(f"--threshold {item!r}: metric must be one of {', '.join(names)} (e.g. step_time=5)")
        try:
            values[name] = float(pct) / 100
        except ValueError:
            raise BaselineError(f"--threshold {item!r}: give a percentage, e.g. {name}=5") from None
    if not 0 < alpha < 1:
        raise BaselineError(f"--alpha {alpha}: give a probability between 0 and 1, e.g. 0.05")
    return Thresholds(**values)


def check_paths(results: Path, baselines: list[str], thresholds: Thresholds, baselines_dir: Path) -> CheckResult:
    """Load both sides and compare. ``baselines``: ['auto'] (the file for the results' hardware), one baseline
    file, or several results folders (each one night)."""
    current = load_any(results)
    if not current:
        raise BaselineError(f"{results}: no records to check. Fix: run the matrix first")
    if baselines == ["auto"]:
        baselines = [str(resolve_auto(current, str(results), baselines_dir))]
    return run_check(current, load_nights([Path(b) for b in baselines]), thresholds, str(results), ", ".join(baselines))


def scaled(records: list[RunRecord], factor: float) -> list[RunRecord]:
    """A night as it would read had every timed step (all ranks) taken ``factor`` times as long: how the
    gate's detection is measured on committed nights (benchmarks/nightly_gate.py, tests/check/test_check.py)."""
    out = []
    for r in records:
        raw = r.model_dump()
        for rank in raw["ranks"]:
            for step in rank["steps"]:
                if step["phase"] == "timed":
                    step["time_s"] *= factor
        out.append(RunRecord.model_validate(raw))
    return out
