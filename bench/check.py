"""Baseline comparison for nightly CI: which cells got slower, bigger or started failing.

Cells are matched by id (a hash of all their settings) and only like is compared with like: both sides
must come from the same hardware (``env.hardware``: GPU model and count, or the CPU); anything else is
refused (exit 2), never compared. A differing software fingerprint (library versions, CUDA, NCCL,
driver, git sha) is not refused but shown beside the verdict, since it is usually what is under test.

Decision rules (the report states them):

- Status: a failure status (oom, timeout, hang, crash, ...) that the baseline's runs of a cell did
  not have is always a regression; a failure that is gone is an improvement. A baseline cell missing
  from the results is a regression too (the nightly run lost it); a new cell is listed without verdict.
- Step time and throughput (per timed step: tokens of all ranks / the slowest rank's step time) are
  flagged only when all three hold:
    1. size: the median over all timed steps of all runs moved by more than the metric's threshold
       (default 5%);
    2. steps: a two-sided Mann-Whitney U test on the per-step values pooled over runs gives p < alpha
       (default 0.01). Rank-based, so the heavy tail of step times (a descheduled step) does not drive it;
    3. runs: a Welch t-test on the log of each run's median gives p < run_alpha (default 0.05), which
       needs at least 2 runs per side (nightly: 3). Steps of one run share its machine state (load,
       clocks, placement, allocator layout), so they are not independent and (2) alone overstates the
       evidence: whole runs shift together. (3) measures that run-to-run noise on the hardware at hand
       and asks the change to stand out from it, so the bar rises by itself on a noisy machine: a
       per-hardware, noise-aware threshold without a table of noise figures to maintain.
  Why these choices, measured on the shared 2-core CPU of development (tiny Llama, 1 process, 40 timed
  steps, 3 runs a side, other jobs on the machine): per-step CV was about 35% and run medians of
  identical reruns differed by up to 2x under load (24 vs 48 ms), with whole runs shifting together.
  Over 6 identical reruns checked pairwise (30 checks), the per-step test alone gave p < 0.01 in 10
  checks although nothing changed, while the run-level test never went below p = 0.24; with all three
  rules: 0 alarms in 30 (tests/test_check.py::test_false_alarm_count measures it again). A simulation
  at the worst noise seen (30% between runs) puts (1)+(2), even with "every run beyond every baseline
  run" added, at 9% false alarms with 3+3 runs, and the three rules above at about 3%; at GPU-like noise (1-2% between runs) at 0%, with a 10% change caught in 95-100%
  of checks with 3+3 runs. Medians, not means, so that one descheduled step moves nothing.
  The same rules in the other direction list an improvement. A side with one run is never flagged on
  timing (the report says so): without repeats nothing says whether the change is the code or the run.
- Peak memory (torch peak reserved, max over ranks, on GPU; host RSS peak on CPU; median over runs)
  is deterministic enough for a plain threshold: flagged when it grows by more than both the relative
  and the absolute threshold (default +3% and +256 MiB), so that small cells do not trip on allocator
  noise and big ones are still held to a few percent. A drop past both is listed as an improvement.

Exit codes: 0 no regression, 1 at least one regression, 2 bad input (see bench.cli).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import mannwhitneyu, ttest_ind

from bench.baseline import BaselineError, load_any, resolve_auto, single_hardware
from bench.metrics import timed_step_times, tokens_per_step
from bench.results import RunRecord, latest_runs

SOFTWARE_KEYS = ("git_sha", "python", "cuda", "nccl", "driver", "cuda_driver", "platform")


@dataclass(frozen=True)
class Thresholds:
    step_time: float = 0.05  # relative change of the median
    tokens_per_s: float = 0.05
    memory: float = 0.03  # relative growth ...
    memory_mib: float = 256.0  # ... and absolute growth, both exceeded
    alpha: float = 0.01  # Mann-Whitney U significance level on per-step values
    run_alpha: float = 0.05  # Welch t-test significance level on run medians


@dataclass
class Finding:
    """One metric of one cell, compared."""

    cell_id: str
    label: str
    metric: str  # status | step_time_s | tokens_per_s | peak_memory_bytes
    verdict: str  # regression | improvement | unchanged | new | missing
    baseline: float | str | None = None
    current: float | str | None = None
    change: float | None = None  # relative, (current - baseline) / baseline
    p_value: float | None = None  # Mann-Whitney U over steps
    p_runs: float | None = None  # Welch t-test over run medians
    runs: str = ""  # e.g. "3 vs 3"
    why: str = ""


@dataclass
class CheckResult:
    results: str
    baseline: str
    hardware: str
    software_diff: dict[str, tuple]
    thresholds: Thresholds
    findings: list[Finding] = field(default_factory=list)

    def by_verdict(self, verdict: str) -> list[Finding]:
        return [f for f in self.findings if f.verdict == verdict]

    @property
    def exit_code(self) -> int:
        return 1 if self.by_verdict("regression") or self.by_verdict("missing") else 0


# ---------------------------------------------------------------- per-cell data

@dataclass
class CellRuns:
    """The runs of one cell on one side: latest record per repeat."""

    records: list[RunRecord]

    @property
    def label(self) -> str:
        return self.records[0].label

    @property
    def ok(self) -> list[RunRecord]:
        return [r for r in self.records if r.status == "ok" and timed_step_times(r)]

    def failures(self) -> Counter:
        return Counter(r.status for r in self.records if r.status != "ok")

    def step_times(self) -> list[np.ndarray]:
        return [np.asarray(timed_step_times(r)) for r in self.ok]

    def throughputs(self) -> list[np.ndarray]:
        return [tokens_per_step(r) / np.asarray(timed_step_times(r)) for r in self.ok]

    def peak_memory(self) -> tuple[float | None, str]:
        """Median over ok runs of the max-over-ranks peak: torch reserved on GPU, host RSS otherwise."""
        per_run, kind = [], "host RSS peak"
        for r in self.ok:
            reserved = [k["torch_peak_reserved_bytes"] for k in r.ranks if "torch_peak_reserved_bytes" in k]
            if reserved:
                per_run.append(max(reserved))
                kind = "torch peak reserved"
            else:
                per_run.append(max(k.get("host_rss_peak_bytes", 0) for k in r.ranks))
        return (float(np.median(per_run)) if per_run else None), kind


def group_by_cell(records: list[RunRecord]) -> dict[str, CellRuns]:
    cells: dict[str, list[RunRecord]] = {}
    for r in sorted(latest_runs(records), key=lambda r: r.repeat):
        cells.setdefault(r.cell_id, []).append(r)
    return {cid: CellRuns(rs) for cid, rs in cells.items()}


# ---------------------------------------------------------------- comparisons

def run_level_p(base: list[np.ndarray], cur: list[np.ndarray]) -> float | None:
    """Welch t-test on the log of each run's median: is the change larger than run-to-run noise?"""
    if len(base) < 2 or len(cur) < 2:
        return None
    log_b = np.log([np.median(x) for x in base])
    log_c = np.log([np.median(x) for x in cur])
    if np.ptp(log_b) == 0 and np.ptp(log_c) == 0:  # identical runs (a copied file): no spread to test
        return 0.0 if log_b[0] != log_c[0] else 1.0
    return float(ttest_ind(log_c, log_b, equal_var=False).pvalue)


def compare_timing(cell_id: str, label: str, metric: str, base: list[np.ndarray], cur: list[np.ndarray],
                   threshold: float, t: Thresholds, worse_is_higher: bool) -> Finding:
    pooled_b, pooled_c = np.concatenate(base), np.concatenate(cur)
    mb, mc = float(np.median(pooled_b)), float(np.median(pooled_c))
    change = (mc - mb) / mb
    p_steps = float(mannwhitneyu(pooled_c, pooled_b, alternative="two-sided").pvalue)
    p_runs = run_level_p(base, cur)
    finding = Finding(cell_id, label, metric, "unchanged", mb, mc, change, p_value=p_steps, p_runs=p_runs,
                      runs=f"{len(base)} vs {len(cur)}")
    if abs(change) <= threshold:
        finding.why = f"within {threshold:.0%}"
    elif p_steps >= t.alpha:
        finding.why = f"not significant over steps (Mann-Whitney p={p_steps:.2g} >= {t.alpha:g})"
    elif p_runs is None:
        finding.why = "one run on a side: run-to-run noise unknown, not flagged (use --repeats 3)"
    elif p_runs >= t.run_alpha:
        finding.why = f"within run-to-run noise (Welch p={p_runs:.2g} >= {t.run_alpha:g})"
    else:
        worse = change > 0 if worse_is_higher else change < 0
        finding.verdict = "regression" if worse else "improvement"
        finding.why = (f"{abs(change):.1%} > {threshold:.0%}, steps: Mann-Whitney p={p_steps:.2g}, "
                       f"runs: Welch p={p_runs:.2g}")
    return finding


def compare_memory(cell_id: str, label: str, base: CellRuns, cur: CellRuns, t: Thresholds) -> Finding | None:
    (mb, kind), (mc, _) = base.peak_memory(), cur.peak_memory()
    if mb is None or mc is None or mb <= 0:
        return None
    delta, change = mc - mb, (mc - mb) / mb
    finding = Finding(cell_id, label, "peak_memory_bytes", "unchanged", mb, mc, change,
                      runs=f"{len(base.ok)} vs {len(cur.ok)}", why=kind)
    big = abs(change) > t.memory and abs(delta) > t.memory_mib * 2**20
    if big:
        finding.verdict = "regression" if delta > 0 else "improvement"
        finding.why = f"{kind}: {delta / 2**20:+.0f} MiB ({change:+.1%}), over {t.memory:.0%} and {t.memory_mib:g} MiB"
    return finding


def compare_status(cell_id: str, label: str, base: CellRuns, cur: CellRuns) -> Finding | None:
    fb, fc = base.failures(), cur.failures()
    new, gone = set(fc) - set(fb), set(fb) - set(fc)
    if not new and not gone and not fb:
        return None

    def summary(runs: CellRuns, failures: Counter) -> str:
        n = len(runs.records)
        parts = [f"ok {n - sum(failures.values())}/{n}"] if sum(failures.values()) < n else []
        return ", ".join(parts + [f"{s} {k}/{n}" for s, k in failures.items()])

    verdict = "regression" if new else "improvement" if gone else "unchanged"
    why = (f"new failure: {', '.join(sorted(new))}" if new
           else f"failure gone: {', '.join(sorted(gone))}" if gone else "same failure as the baseline")
    return Finding(cell_id, label, "status", verdict, summary(base, fb), summary(cur, fc), why=why,
                   runs=f"{len(base.records)} vs {len(cur.records)}")


def compare_cell(cell_id: str, base: CellRuns, cur: CellRuns, t: Thresholds) -> list[Finding]:
    label = cur.label
    findings = [f for f in [compare_status(cell_id, label, base, cur)] if f]
    if not base.ok or not cur.ok:
        return findings
    findings.append(compare_timing(cell_id, label, "step_time_s", base.step_times(), cur.step_times(),
                                   t.step_time, t, worse_is_higher=True))
    findings.append(compare_timing(cell_id, label, "tokens_per_s", base.throughputs(), cur.throughputs(),
                                   t.tokens_per_s, t, worse_is_higher=False))
    if memory := compare_memory(cell_id, label, base, cur, t):
        findings.append(memory)
    return findings


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
            f"Fix: use the baseline for {hc!r} (--baseline auto), or promote one from a trusted run on "
            f"that machine with `bench baseline promote {cur_src}`")
    return hb


def run_check(current: list[RunRecord], baseline: list[RunRecord], thresholds: Thresholds = Thresholds(),
              current_src: str = "results", baseline_src: str = "baseline") -> CheckResult:
    """Compare results with a baseline. Raises BaselineError on input that must not be compared."""
    hardware = check_hardware(baseline, current, baseline_src, current_src)
    result = CheckResult(current_src, baseline_src, hardware, software_diff(baseline, current), thresholds)
    base_cells, cur_cells = group_by_cell(baseline), group_by_cell(current)
    for cell_id, base in base_cells.items():
        if cell_id not in cur_cells:
            result.findings.append(Finding(cell_id, base.label, "status", "missing",
                                           why="in the baseline, not in the results"))
            continue
        result.findings += compare_cell(cell_id, base, cur_cells[cell_id], thresholds)
    for cell_id, cur in cur_cells.items():
        if cell_id not in base_cells:
            result.findings.append(Finding(cell_id, cur.label, "status", "new", why="no baseline for this cell"))
    return result


# ---------------------------------------------------------------- output

def _fmt(metric: str, value) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if metric == "step_time_s":
        return f"{value * 1000:.1f} ms"
    if metric == "tokens_per_s":
        return f"{value:,.0f} tok/s"
    if metric == "peak_memory_bytes":
        return f"{value / 2**30:.2f} GiB"
    return f"{value:g}"


def _table(findings: list[Finding]) -> list[str]:
    lines = ["| cell | metric | baseline | current | change | runs | why |", "|---|---|---|---|---|---|---|"]
    for f in findings:
        change = f"{f.change:+.1%}" if f.change is not None else ""
        lines.append(f"| {f.label} `{f.cell_id}` | {f.metric} | {_fmt(f.metric, f.baseline)} | "
                     f"{_fmt(f.metric, f.current)} | {change} | {f.runs} | {f.why} |")
    return lines


def to_markdown(result: CheckResult) -> str:
    t = result.thresholds
    regressions = result.by_verdict("regression") + result.by_verdict("missing")
    improvements = result.by_verdict("improvement")
    verdict = f"REGRESSION ({len(regressions)})" if regressions else "no regression"
    lines = [f"## bench check: {verdict}", "",
             f"- results: `{result.results}`; baseline: `{result.baseline}`",
             f"- hardware: {result.hardware} (same on both sides)"]
    if result.software_diff:
        diffs = "; ".join(f"{k} {b} -> {c}" for k, (b, c) in result.software_diff.items())
        lines.append(f"- software differs from the baseline: {diffs}")
    else:
        lines.append("- software: same fingerprint as the baseline")
    lines.append(f"- rules: step time / throughput flagged when the median moves more than "
                 f"{t.step_time:.0%} / {t.tokens_per_s:.0%}, Mann-Whitney U on per-step values pooled over "
                 f"runs gives p < {t.alpha:g}, and a Welch t-test on run medians p < {t.run_alpha:g} (2+ runs "
                 f"per side); peak memory "
                 f"when it grows more than {t.memory:.0%} and {t.memory_mib:g} MiB; any new failure status.")
    for title, items in (("Regressions", regressions), ("Improvements", improvements)):
        lines += ["", f"### {title} ({len(items)})"]
        lines += _table(items) if items else ["none"]
    new = result.by_verdict("new")
    if new:
        lines += ["", f"New cells without a baseline: {', '.join(f.label for f in new)}"]
    lines += ["", "<details><summary>all comparisons</summary>", "", *_table(result.findings), "", "</details>"]
    return "\n".join(lines) + "\n"


def to_json(result: CheckResult) -> dict:
    return {
        "verdict": "regression" if result.exit_code else "ok",
        "exit_code": result.exit_code,
        "results": result.results,
        "baseline": result.baseline,
        "hardware": result.hardware,
        "software_diff": {k: list(v) for k, v in result.software_diff.items()},
        "thresholds": asdict(result.thresholds),
        "counts": dict(Counter(f.verdict for f in result.findings)),
        "findings": [asdict(f) for f in result.findings],
    }


# ---------------------------------------------------------------- entry points for the CLI

def parse_thresholds(items: list[str], alpha: float, run_alpha: float, memory_mib: float) -> Thresholds:
    """``["step_time=3", "memory=5"]`` (percent) -> Thresholds; unknown metric names are bad input."""
    values = {"alpha": alpha, "run_alpha": run_alpha, "memory_mib": memory_mib}
    names = ("step_time", "tokens_per_s", "memory")
    for item in items:
        name, _, pct = item.partition("=")
        if name not in names:
            raise BaselineError(f"--threshold {item!r}: metric must be one of {', '.join(names)} (e.g. step_time=5)")
        try:
            values[name] = float(pct) / 100
        except ValueError:
            raise BaselineError(f"--threshold {item!r}: give a percentage, e.g. {name}=5") from None
    return Thresholds(**values)


def check_paths(results: Path, baseline: str, thresholds: Thresholds, baselines_dir: Path) -> CheckResult:
    """Load both sides (``baseline='auto'`` picks the file for the results' hardware) and compare."""
    current = load_any(results)
    if not current:
        raise BaselineError(f"{results}: no records to check. Fix: run the matrix first")
    base_path = resolve_auto(current, str(results), baselines_dir) if baseline == "auto" else Path(baseline)
    return run_check(current, load_any(base_path), thresholds, str(results), str(base_path))
