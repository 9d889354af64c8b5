"""Rendering of a check (bench/check/gate.py): the markdown that `bench check` prints and the nightly writes as
``check.md``, and the JSON of ``--json`` / ``check.json``. Reads a CheckResult, judges nothing."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict

from bench.check.gate import CheckResult, Finding


def _fmt(metric: str, value) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if metric in ("step_time_s", "step_floor_s"):
        return f"{value * 1000:.1f} ms"
    if metric == "real_tokens_per_s":
        return f"{value:,.0f} tok/s"
    if metric == "peak_memory_bytes":
        return f"{value / 2**30:.2f} GiB"
    return f"{value:g}"


def _table(findings: list[Finding]) -> list[str]:
    lines = ["| cell | metric | baseline | tonight | change | interval for a new night | detectable | nights | why |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in findings:
        change = f"{f.change:+.1%}" if f.change is not None else ""
        interval = f"{_fmt(f.metric, f.interval[0])} .. {_fmt(f.metric, f.interval[1])}" if f.interval else ""
        detectable = f"{f.detectable:.1%}" if f.detectable is not None else ""
        lines.append(f"| {f.label} `{f.cell_id}` | {f.metric} | {_fmt(f.metric, f.baseline)} | "
                     f"{_fmt(f.metric, f.current)} | {change} | {interval} | {detectable} | {f.nights} | {f.why} |")
    return lines


def _detectable_lines(result: CheckResult) -> list[str]:
    """Per cell: the smallest step-time change this baseline lets the gate flag on this hardware, on the median
    and on the floor; a uniform slowdown (every step alike) moves both, so the gate catches the smaller."""
    median = {f.cell_id: f for f in result.findings if f.metric == "step_time_s" and f.detectable is not None}
    floor = {f.cell_id: f for f in result.findings if f.metric == "step_floor_s" and f.detectable is not None}
    if not median and not floor:
        return []
    threshold = result.thresholds.step_time

    def cell(f: Finding | None) -> str:
        return "" if f is None else f"{f.detectable:.1%}" + (" (nominal)" if f.detectable > threshold else "")

    lines = ["", "### Smallest detectable step-time change per cell", "",
             "| cell | detectable (median) | detectable (floor) | uniform slowdown detectable | threshold | nights |",
             "|---|---|---|---|---|---|"]
    for cell_id in list(median) + [c for c in floor if c not in median]:
        m, f = median.get(cell_id), floor.get(cell_id)
        either = min(x.detectable for x in (m, f) if x is not None)
        first = m or f
        lines.append(f"| {first.label} `{cell_id}` | {cell(m)} | {cell(f)} | {either:.1%} | {threshold:.0%} | "
                     f"{first.nights} |")
    return lines


def to_markdown(result: CheckResult) -> str:
    t = result.thresholds
    regressions = result.by_verdict("regression") + result.by_verdict("missing")
    improvements = result.by_verdict("improvement")
    verdict = f"REGRESSION ({len(regressions)})" if regressions else "no regression"
    lines = [f"## bench check: {verdict}", "",
             f"- tonight: `{result.results}`; baseline: `{result.baseline}` ({len(result.baseline_nights)} nights: "
             f"{', '.join(result.baseline_nights)})",
             f"- hardware: {result.hardware} (same on both sides)"]
    if result.slowed:
        lines.append(f"- **tonight was slowed on purpose** (--slow-step): {result.slowed}")
    if result.software_diff:
        diffs = "; ".join(f"{k} {b} -> {c}" for k, (b, c) in result.software_diff.items())
        lines.append(f"- software differs from the baseline: {diffs}")
    else:
        lines.append("- software: same fingerprint as the baseline")
    lines.append(f"- rules: per cell, tonight's figure (median over launches of each launch's median) is flagged "
                 f"when it lies outside the {1 - t.alpha:.0%} prediction interval for a new night that the "
                 f"baseline nights give (between- and within-night spread, log scale, t with nights-1 df) and "
                 f"moves more than {t.step_time:.0%} (step time) / {t.tokens_per_s:.0%} (throughput on real "
                 f"tokens); a higher failure fraction than the baseline's; peak memory growing more than "
                 f"{t.memory:.0%} and {t.memory_mib:g} MiB.")
    lines.append(f"- step time is judged twice, each figure at alpha {t.alpha:g}: the median step (step_time_s) "
                 f"and the fastest timed step (step_floor_s, a launch's floor: it moves with a shift of every "
                 f"step that a changed mix of fast and slow stretches hides from the median); either one flags "
                 f"the cell.")
    for title, items in (("Regressions", regressions), ("Improvements", improvements)):
        lines += ["", f"### {title} ({len(items)})"]
        lines += _table(items) if items else ["none"]
    new = result.by_verdict("new")
    if new:
        lines += ["", f"New cells without a baseline: {', '.join(f.label for f in new)}"]
    lines += _detectable_lines(result)
    lines += ["", "<details><summary>all comparisons</summary>", "", *_table(result.findings), "", "</details>"]
    return "\n".join(lines) + "\n"


def to_json(result: CheckResult) -> dict:
    return {
        "verdict": "regression" if result.exit_code else "ok",
        "exit_code": result.exit_code,
        "results": result.results,
        "baseline": result.baseline,
        "baseline_nights": result.baseline_nights,
        "hardware": result.hardware,
        "injected_slowdown": result.slowed,
        "software_diff": {k: list(v) for k, v in result.software_diff.items()},
        "thresholds": asdict(result.thresholds),
        "counts": dict(Counter(f.verdict for f in result.findings)),
        "findings": [asdict(f) for f in result.findings],
    }
