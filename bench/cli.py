"""The `bench` command line: thin wrappers over plain functions."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from bench.launch.campaign import RunOptions, main_guard, run_matrix

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Benchmark ways of spreading LLM training over GPUs (DDP, DeepSpeed ZeRO, FSDP).")


class HtmlImagesChoice(str, Enum):  # bench/report/render.py's HtmlImages, as typer reads a choice
    embedded = "embedded"
    linked = "linked"


SLOW_STEP_HELP = ("make every timed step this fraction slower on purpose with real device work (e.g. 0.10), "
                  "named in the record: proves the nightly gate; off by default")


@app.command()
def run(
    matrix: Annotated[str, typer.Argument(help="matrix YAML, e.g. matrices/smoke.yaml")],
    results: Annotated[Optional[Path], typer.Option(help="results folder (default results/<matrix name>)")] = None,
    only: Annotated[list[str], typer.Option(help="run only cells with KEY=V1,V2 (repeatable, ANDed)")] = [],
    exclude: Annotated[list[str], typer.Option(help="skip cells with KEY=V1,V2 (repeatable)")] = [],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print every command and config, launch nothing")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="rerun recorded failures too")] = False,
    force: Annotated[bool, typer.Option("--force", help="launch cells predicted not to fit")] = False,
    repeats: Annotated[Optional[int], typer.Option(min=1, help="runs per cell, each in fresh processes")] = None,
    device: Annotated[Optional[str], typer.Option(help="override the matrix's device: cpu or cuda")] = None,
    worker: Annotated[str, typer.Option(hidden=True)] = "bench.worker",
    capacity_gib: Annotated[Optional[float], typer.Option(
        min=0.0, help="memory (GiB) each rank must fit for the pre-flight check; default its GPU or gpu_memory_gib")] = None,
    wait_for_lock: Annotated[bool, typer.Option(
        "--wait-for-lock", help="if another run is writing the results folder, wait for it instead of stopping")] = False,
    slow_step: Annotated[Optional[float], typer.Option(min=0.0, max=10.0, help=SLOW_STEP_HELP)] = None,
    strict: Annotated[bool, typer.Option(
        "--strict", help="refuse the whole matrix (exit 2, every reason) if any cell cannot run on this machine, "
                         "instead of recording such cells as unsupported")] = False,
    memory_snapshot: Annotated[bool, typer.Option(
        "--memory-snapshot", help="CUDA: record PyTorch's allocator history over each rank's warm-up (at most 3 "
                                  "steps) into its ranks folder (benchmarks/memory_snapshot_peak.py reads it)")] = False,
):
    """Run every cell of a matrix as a real `accelerate launch` and append one record per run. A cell this
    machine cannot run is recorded as unsupported with every reason, and the rest of the matrix runs."""
    opts = RunOptions(results_dir=results, only=only, exclude=exclude, dry_run=dry_run, retry_failed=retry_failed,
                      force=force, repeats=repeats, worker_module=worker, device=device, capacity_gib=capacity_gib,
                      wait_for_lock=wait_for_lock, slow_step=slow_step or None, strict=strict,
                      memory_snapshot=memory_snapshot)
    raise typer.Exit(main_guard(run_matrix, matrix, opts))


@app.command()
def report(
    results: Annotated[list[Path], typer.Argument(help="one or more results folders (mixed hardware is kept apart)")],
    out: Annotated[Optional[Path], typer.Option(help="output folder (default report/<name>[+<name>...])")] = None,
    tokens: Annotated[Optional[str], typer.Option(help="token budget to project the time to train, e.g. 50M")] = None,
    epochs: Annotated[float, typer.Option(min=0.0, help="epochs over --tokens")] = 1.0,
    matrix: Annotated[Optional[Path], typer.Option(help="read token_budget from this matrix file")] = None,
    compare: Annotated[list[str], typer.Option(help="strategy for the head-to-head vs plain 1 GPU (repeatable; default all)")] = [],
    compare_gpus: Annotated[Optional[int], typer.Option(min=2, help="GPU count of the head-to-head (default 2)")] = None,
    trace_cell: Annotated[Optional[str], typer.Option(help="cell id whose NVML trace is plotted (default the first ok GPU cell)")] = None,
    html_images: Annotated[HtmlImagesChoice, typer.Option(
        help="embedded: one self-contained index.html; linked: it refers to the PNGs beside it (a third the size; "
             "how the reports under report/ are committed)")] = HtmlImagesChoice.embedded,
):
    """Tables (terminal, markdown, HTML, CSV) and plots from recorded runs."""
    from bench.spec import TokenBudget
    from bench.report.document import ReportOptions, parse_count, write_report

    def _run() -> int:
        try:
            budget = TokenBudget(tokens=parse_count(tokens), epochs=epochs) if tokens else None
        except ValueError as e:
            typer.echo(f"error: --tokens {e}", err=True)
            return 2
        options = ReportOptions(budget=budget, compare=compare, compare_gpus=compare_gpus, trace_cell=trace_cell,
                                matrix=matrix, html_images=html_images.value)
        write_report(results, out or Path("report") / "+".join(r.name for r in results), options=options)
        return 0

    try:
        raise typer.Exit(main_guard(_run))
    except FileNotFoundError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def estimate(
    matrix: Annotated[str, typer.Argument(help="matrix YAML")],
    device: Annotated[Optional[str], typer.Option(help="plan for cpu or cuda (default the matrix's; auto means cuda)")] = None,
    capacity_gib: Annotated[Optional[float], typer.Option(
        min=0.0, help="memory (GiB) per rank to check against, e.g. 80 for an H100, 141 for an H200")] = None,
    only: Annotated[list[str], typer.Option(help="only cells with KEY=V1,V2 (repeatable, ANDed)")] = [],
    exclude: Annotated[list[str], typer.Option(help="skip cells with KEY=V1,V2 (repeatable)")] = [],
    as_json: Annotated[bool, typer.Option("--json", help="print the predictions as JSON")] = False,
    gpus: Annotated[Optional[int], typer.Option(
        min=1, help="keep only the cells a box of this many GPUs can run (gpus <= N), e.g. --gpus 2")] = None,
):
    """Predict each cell's peak GPU memory per rank (and host memory), launching nothing, on any machine:
    each cell ends with the smallest card it fits on."""
    from bench.estimate import run_estimate

    raise typer.Exit(main_guard(run_estimate, matrix, device, capacity_gib, only, exclude, as_json, max_gpus=gpus))


@app.command("estimate-check")
def estimate_check(
    results: Annotated[list[Path], typer.Argument(
        help="results folders of GPU runs (default: every tuning and judge folder under results/)")] = [],
    tolerance: Annotated[float, typer.Option(min=0.0, help="largest |error| allowed on a judged out-of-sample cell")] = 0.10,
):
    """Re-predict every ok GPU cell with the current estimator; in-sample and out-of-sample errors apart.
    Exit 1 when a judged out-of-sample cell is off by more than --tolerance, 2 on bad input."""
    from bench.estimate import run_check

    raise typer.Exit(main_guard(run_check, results, tolerance))


@app.command("estimate-margins")
def estimate_margins(
    results_root: Annotated[Path, typer.Option(help="where the judge folders are")] = Path("results"),
):
    """Recompute the pre-flight margins per framework from the judge folders' out-of-sample errors
    into bench/estimate/margins.json (commit it)."""
    from bench.estimate import MARGINS_FILE, write_margins

    def _write() -> int:
        data = write_margins(results_root)
        typer.echo(f"{MARGINS_FILE}: {len(data['folders'])} judge folder(s), "
                   f"{(data['pooled'] or {}).get('cells', 0)} judged cells")
        for fw, e in data["frameworks"].items():
            typer.echo(f"  {fw}: {e['cells']} cells, fit +{e['fit']:.1%}, skip +{e['skip']:.1%}")
        return 0

    raise typer.Exit(main_guard(_write))


@app.command()
def env():
    """Print the environment fingerprint stored in every record."""
    import json

    from bench.machine.envinfo import fingerprint

    typer.echo(json.dumps(fingerprint(), indent=2))


def _bad_input_exits_2(fn) -> int:
    """check and baseline: a refused comparison or an unreadable file is exit 2 with the message."""
    from bench.check import BaselineError
    from bench.records import SchemaError

    try:
        return fn()
    except (BaselineError, SchemaError) as e:
        typer.echo(f"error: {e}", err=True)
        return 2


THRESHOLD_HELP = "METRIC=PERCENT for step_time, tokens_per_s (real tokens), memory (defaults 5, 5, 3); repeatable"
ALPHA_HELP = "1 - coverage of the prediction interval for a new night (0.05: 95 %)"


@app.command()
def check(
    results: Annotated[Path, typer.Argument(help="one night's results folder (or .jsonl) to check")],
    baseline: Annotated[list[str], typer.Option(help="'auto' (<baselines-dir>/<hardware>.jsonl for the results' "
                                                     "hardware), a baseline .jsonl, or night folders (repeat the "
                                                     "option: each folder one night)")],
    threshold: Annotated[list[str], typer.Option(help=THRESHOLD_HELP)] = [],
    memory_mib: Annotated[float, typer.Option(help="peak memory must also grow by more than this (MiB)")] = 256,
    alpha: Annotated[float, typer.Option(help=ALPHA_HELP)] = 0.05,
    min_nights: Annotated[int, typer.Option(min=2, help="baseline nights needed (fewer than 3: very wide intervals)")] = 3,
    markdown: Annotated[Optional[Path], typer.Option(help="also write the markdown summary here")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the findings as JSON here")] = None,
    baselines_dir: Annotated[Path, typer.Option(help="where --baseline auto looks")] = Path("results/baselines"),
):
    """Judge one night against baseline nights of the same hardware: exit 0 clean, 1 regression, 2 bad input."""
    import json

    from bench.check import check_paths, parse_thresholds, to_json, to_markdown

    def _run() -> int:
        result = check_paths(results, baseline, parse_thresholds(threshold, alpha, memory_mib, min_nights),
                             baselines_dir)
        text = to_markdown(result)
        typer.echo(text)
        if markdown:
            markdown.write_text(text)
        if json_out:
            json_out.write_text(json.dumps(to_json(result), indent=2))
        return result.exit_code

    raise typer.Exit(_bad_input_exits_2(_run))


@app.command()
def nightly(
    matrix: Annotated[str, typer.Argument(help="matrix YAML, e.g. matrices/nightly.yaml")],
    root: Annotated[Optional[Path], typer.Option(help="where night folders go (default results/nightly/<hardware>)")] = None,
    launches: Annotated[Optional[int], typer.Option(min=1, help="fresh launches per cell (default the matrix's repeats)")] = None,
    no_verdict: Annotated[bool, typer.Option("--no-verdict", help="record the night without a check: how the "
                                                                  "first nights of a new baseline are made")] = False,
    slow_step: Annotated[Optional[float], typer.Option(min=0.0, max=10.0, help=SLOW_STEP_HELP)] = None,
    threshold: Annotated[list[str], typer.Option(help=THRESHOLD_HELP)] = [],
    memory_mib: Annotated[float, typer.Option(help="peak memory must also grow by more than this (MiB)")] = 256,
    alpha: Annotated[float, typer.Option(help=ALPHA_HELP)] = 0.05,
    baselines_dir: Annotated[Path, typer.Option(help="where this hardware's baseline is looked for")] = Path("results/baselines"),
    device: Annotated[Optional[str], typer.Option(help="override the matrix's device: cpu or cuda")] = None,
    worker: Annotated[str, typer.Option(hidden=True)] = "bench.worker",
):
    """One night: run the matrix into a fresh folder, check it against this hardware's baseline, write check.md,
    check.json and the report there. Exit 0 clean, 1 regression (or nothing measured), 2 bad input."""
    from bench.check import NightOptions, parse_thresholds, run_night

    def _run() -> int:
        opts = NightOptions(root=root, launches=launches, slow_step=slow_step or None, no_verdict=no_verdict,
                            baselines_dir=baselines_dir, thresholds=parse_thresholds(threshold, alpha, memory_mib),
                            device=device, worker_module=worker)
        return main_guard(run_night, matrix, opts)  # bad matrix: 2; a baseline refused: 2 (below)

    raise typer.Exit(_bad_input_exits_2(_run))


baseline_app = typer.Typer(no_args_is_help=True, help="Baselines kept in the repository, one per hardware.")
app.add_typer(baseline_app, name="baseline")


@baseline_app.command("promote")
def baseline_promote(
    results: Annotated[list[Path], typer.Argument(
        help="night folders of trusted nights (3 or more), e.g. results/nightly/<hardware>/<night>; each one night")],
    baselines_dir: Annotated[Path, typer.Option(help="where baselines live")] = Path("results/baselines"),
):
    """Make 3 or more nights the baseline for their hardware: <baselines-dir>/<hardware-slug>.jsonl."""
    from bench.check import describe, promote

    def _run() -> int:
        path, records = promote(results, baselines_dir)
        typer.echo(f"baseline {path}: {describe(records)}")
        return 0

    raise typer.Exit(_bad_input_exits_2(_run))


if __name__ == "__main__":
    app()
