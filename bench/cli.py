"""The `bench` command line: thin wrappers over plain functions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bench.campaign import RunOptions, main_guard, run_matrix

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Benchmark ways of spreading LLM training over GPUs (DDP, DeepSpeed ZeRO, FSDP).")


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
):
    """Run every cell of a matrix as a real `accelerate launch` and append one record per run."""
    opts = RunOptions(results_dir=results, only=only, exclude=exclude, dry_run=dry_run, retry_failed=retry_failed,
                      force=force, repeats=repeats, worker_module=worker, device=device)
    raise typer.Exit(main_guard(run_matrix, matrix, opts))


@app.command()
def report(
    results: Annotated[list[Path], typer.Argument(help="one or more results folders")],
    out: Annotated[Optional[Path], typer.Option(help="output folder (default report/<name>)")] = None,
):
    """Tables (terminal, markdown, CSV) and plots from recorded runs."""
    from bench.report import write_report

    def _run() -> int:
        write_report(results, out or Path("report") / results[0].name)
        return 0

    try:
        raise typer.Exit(main_guard(_run))
    except FileNotFoundError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)


@app.command()
def env():
    """Print the environment fingerprint stored in every record."""
    import json

    from bench.envinfo import fingerprint

    typer.echo(json.dumps(fingerprint(), indent=2))


if __name__ == "__main__":
    app()
