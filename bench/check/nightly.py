"""`bench nightly MATRIX`: one night of the nightly gate, and the only command the nightly workflow calls.

    bench nightly matrices/nightly.yaml                     run, check against this hardware's baseline, report
    bench nightly matrices/nightly.yaml --no-verdict        run and report only: a night for a new baseline
    bench nightly matrices/nightly.yaml --slow-step 0.10    a night slowed on purpose, to prove the gate

Each night runs into a fresh folder named by date (UTC) and commit, never reused (a second night of the same
day and commit gets ``-2``, ``-3``, ...), so a night can only be judged on launches it made itself:

    <root>/<YYYY-MM-DD>-<commit7>[-dirty][-<n>]/    root: --root, default results/nightly/<hardware-slug>
        runs.jsonl, matrix.yaml, cells/...          the launches, as `bench run` writes them
        night.json                                  what ran: hardware, git sha, launches, slow step, times
        check.md, check.json                        the verdict against the baseline (or "no verdict")
        report/                                     `bench report` of the night

The baseline is ``<baselines-dir>/<hardware-slug>.jsonl`` for the machine it runs on (``--baseline auto``).
Exit codes: 0 clean; 1 a regression, or a night that measured nothing; 2 bad input, found before anything
launches: a bad matrix, no baseline for this hardware (unless --no-verdict), a baseline of fewer than 3
nights, or one that shares no cell with the matrix. Baseline cells the matrix no longer runs are left out of
the comparison and named in check.md.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console

from bench.check.baseline import BaselineError, DEFAULT_DIR, baseline_path, hardware_slug, load_nights, validate_nights
from bench.check.gate import Thresholds, is_timed_ok, run_check
from bench.check.render import to_json, to_markdown
from bench.launch.campaign import RunOptions, prepare, run_matrix
from bench.launch.plan import WORKER_MODULE
from bench.machine import envinfo
from bench.records import RunRecord, latest_runs, load_records
from bench.worker.slowdown import injected_slowdown

DEFAULT_ROOT = Path("results/nightly")


@dataclass
class NightOptions:
    root: Path | None = None  # default results/nightly/<hardware-slug>
    launches: int | None = None  # per cell; default the matrix's repeats
    slow_step: float | None = None
    no_verdict: bool = False
    baselines_dir: Path = DEFAULT_DIR
    thresholds: Thresholds = field(default_factory=Thresholds)
    device: str | None = None
    worker_module: str = WORKER_MODULE


def night_folder(root: Path, git_sha: str | None, day: str) -> Path:
    """``<root>/<day>-<commit7>[-dirty]``, with ``-2``, ``-3`` ... after it if that night exists already."""
    sha = git_sha or "nogit"
    base = f"{day}-{sha[:7]}" + ("-dirty" if sha.endswith("-dirty") else "")
    folder, n = root / base, 1
    while folder.exists():
        n += 1
        folder = root / f"{base}-{n}"
    return folder


def load_baseline(hardware: str, cell_ids: set[str], opts: NightOptions
                  ) -> tuple[Path, list[RunRecord], list[str]] | None:
    """This hardware's baseline, validated before anything launches, as (path, the records of the cells this
    matrix runs, the labels of those it no longer runs); None with --no-verdict."""
    if opts.no_verdict:
        return None
    path = baseline_path(hardware, opts.baselines_dir)
    if not path.is_file():
        raise BaselineError(
            f"no baseline for this machine ({hardware!r}): {path} does not exist. Fix: record the first nights "
            f"without a verdict, `bench nightly MATRIX --no-verdict` (3 or more, 5 is better), then "
            f"`bench baseline promote NIGHT_DIR...` and commit {path}")
    records = load_nights([path])
    validate_nights(records, str(path), opts.thresholds.min_nights)
    if not cell_ids & {r.cell_id for r in records}:
        raise BaselineError(
            f"{path} holds none of this matrix's cells (cell ids are hashes of every setting: the matrix changed "
            f"since the baseline was made?). Fix: make a new baseline from nights of this matrix "
            f"(`bench nightly MATRIX --no-verdict`, 3 or more, then `bench baseline promote NIGHT_DIR...`)")
    # A cell the matrix no longer runs (its settings changed, so its id) would read "missing" every night: a
    # verdict of exit 1 for a matrix change, not a regression. It leaves the comparison, said in check.md;
    # the cells both hold stay gated, and a changed cell shows as "new" until a baseline with it is promoted.
    retired = sorted({f"{r.label} [{r.cell_id}]" for r in records if r.cell_id not in cell_ids})
    return path, [r for r in records if r.cell_id in cell_ids], retired


def unmeasured(records: list[RunRecord], planned: int, started: float) -> str | None:
    """Why the night's folder does not hold a measured night made by this invocation, or None."""
    if older := [r for r in records if r.started_at < started]:
        return f"{len(older)} record(s) in the night's folder predate this night"
    launched = len(latest_runs(records))
    if launched != planned:
        return f"{launched} of {planned} planned launches recorded"
    if not any(is_timed_ok(r) for r in records):
        return f"no launch measured anything ({', '.join(sorted({r.status for r in records})) or 'no records'})"
    return None


def no_verdict_summary(night: Path, records: list[RunRecord]) -> tuple[str, dict]:
    ok = sum(is_timed_ok(r) for r in records)
    slowed = next((s for r in records if (s := injected_slowdown(r))), None)
    text = (f"## bench nightly: no verdict (--no-verdict: a night for a baseline)\n\n- night: `{night}`\n"
            f"- launches: {len(records)}, measured ok: {ok}\n")
    if slowed:
        text += f"- **slowed on purpose** (--slow-step): {slowed}; not fit for a baseline\n"
    return text, {"verdict": "none", "exit_code": 0, "results": str(night), "launches": len(records),
                  "ok_launches": ok, "injected_slowdown": slowed}


def write_report(night: Path, console: Console) -> str | None:
    """`bench report` of the night into ``<night>/report``; the error if it could not be written."""
    from bench.report.document import write_report as report

    try:
        report([night], night / "report", console=console)
    except Exception as e:  # noqa: BLE001 - the verdict is already written; say what broke and fail the night
        return f"{type(e).__name__}: {e}"
    return None


def run_night(matrix_path: str, opts: NightOptions, console: Console | None = None) -> int:
    console = console or Console()
    fp = envinfo.fingerprint()
    hardware = fp["hardware"]
    root = opts.root or DEFAULT_ROOT / hardware_slug(hardware)
    night = night_folder(root, fp.get("git_sha"), time.strftime("%Y-%m-%d", time.gmtime()))
    run_opts = RunOptions(results_dir=night, repeats=opts.launches, slow_step=opts.slow_step, device=opts.device,
                          worker_module=opts.worker_module, strict=True)  # the gate loses no cell silently
    prep = prepare(matrix_path, run_opts)  # the matrix is valid before the night's folder exists
    baseline = load_baseline(hardware, {c.cell_id for c in prep.cells}, opts)
    night.mkdir(parents=True)
    started = time.time()
    meta = {"night": night.name, "matrix": matrix_path, "hardware": hardware, "git_sha": fp.get("git_sha"),
            "launches_planned": len(prep.todo), "slow_step": opts.slow_step, "no_verdict": opts.no_verdict,
            "baseline": str(baseline[0]) if baseline else None, "thresholds": asdict(opts.thresholds),
            "started_at": started, "command": sys.argv}
    (night / "night.json").write_text(json.dumps(meta, indent=2))
    console.print(f"night {night}")
    code = run_matrix(matrix_path, run_opts, console)
    if code != 0:  # bad input found late, or interrupted: no verdict on a partial night
        return code
    records = load_records(night)
    if baseline is None:
        text, summary = no_verdict_summary(night, records)
        code = 0
    else:
        result = run_check(records, baseline[1], opts.thresholds, str(night), str(baseline[0]))
        text, summary, code = to_markdown(result), to_json(result), result.exit_code
        if retired := baseline[2]:
            text += (f"\nBaseline cells this matrix no longer runs, left out of the comparison: {'; '.join(retired)}. "
                     f"Promote nights of the current matrix to gate its changed cells.\n")
            summary["baseline_cells_not_in_matrix"] = retired
    problem = unmeasured(records, len(prep.todo), started)
    if problem:
        text += f"\n**The night measured nothing it can be judged on**: {problem}\n"
        summary.update(exit_code=1, unmeasured=problem)
        code = 1
    (night / "check.md").write_text(text)
    (night / "check.json").write_text(json.dumps(summary, indent=2))
    console.print(text, markup=False)
    if error := write_report(night, console):
        print(f"error: report of {night} not written: {error}", file=sys.stderr)
        code = code or 1
    meta.update(ended_at=time.time(), exit_code=code)
    (night / "night.json").write_text(json.dumps(meta, indent=2))
    console.print(f"night {night}: exit {code}")
    return code
