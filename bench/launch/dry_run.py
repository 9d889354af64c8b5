"""`bench run --dry-run`: every cell's launch printed (command, accelerate and DeepSpeed configs, a user config's
resolution notes; under `launcher: slurm` the batch script), the auto micro-batch proposals, and the cells that
would be recorded unsupported, launching nothing. A CUDA matrix on a machine with fewer GPUs is planned for its
target and says so."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from bench.launch.auto_batch import AutoCell
from bench.launch.plan import LaunchPlan, Unrunnable
from bench.spec import CellSettings, Matrix
from bench.strategies import collapse


def planned_elsewhere_note(cells: list[CellSettings], here: int) -> str | None:
    """Said once when cells are planned for more GPUs than this machine has (a dry run on a laptop)."""
    need = max((c.gpus for c in cells if c.device == "cuda"), default=0)
    return f"planned for a machine with {need} GPU(s); this machine has {here}" if need > here else None


def print_dry_run(console: Console, items: list, here: int, matrix: Matrix | None = None) -> None:
    """Every plan's command and configs; under `launcher: slurm` the batch script `bench run` would submit."""
    for auto in (i for i in items if isinstance(i, AutoCell)):
        console.print(f"[dim]micro_batch auto[/]: {escape(auto.cell.label)}: "
                      + escape(f"proposed {auto.proposed} for {auto.capacity_gib:.1f} GiB ({auto.capacity_source})"
                               if auto.proposed else str(auto.reason)))
    plans = [i.plan_for(i.proposed) if isinstance(i, AutoCell) and i.proposed else i for i in items]
    plans = [i for i in plans if isinstance(i, LaunchPlan)]
    if note := planned_elsewhere_note([p.cell for p in plans], here):
        console.print(f"[yellow]note[/]: {escape(note)}")
    for i, plan in enumerate(plans, 1):
        console.rule(f"[bold]cell {i}/{len(plans)}[/] {plan.cell.label}  id={plan.cell.cell_id}")
        console.print(f"[dim]folder:[/] {plan.cell_dir}")
        if matrix is not None and matrix.launcher == "slurm":
            _print_batch_script(console, plan, matrix)
        else:
            console.print(plan.shell_command(), soft_wrap=True, markup=False)
        for name, content in plan.files.items():  # a user config's notes say where each "auto" came from
            if name in ("accelerate.yaml", "deepspeed.json", "resolution_notes.txt"):
                console.print(f"[dim]--- {name}[/]")
                console.print(content, markup=False)
    skipped = [i for i in items if isinstance(i, Unrunnable)]
    if skipped:
        console.rule(f"[bold]{len(skipped)} run(s) would be recorded unsupported[/]")
        for line in collapse([(u.cell, list(u.reasons)) for u in skipped]):
            console.print(line, markup=False, soft_wrap=True)


def _print_batch_script(console: Console, plan: LaunchPlan, matrix: Matrix) -> None:
    from bench.launch.slurm import SCRIPT_FILE
    from bench.launch.slurm_runner import job_script

    path = plan.cell_dir / SCRIPT_FILE
    console.print(f"sbatch --parsable {path}", soft_wrap=True, markup=False)
    console.print(f"[dim]--- {SCRIPT_FILE} (written to {escape(str(path))} when the cell runs)[/]")
    console.print(job_script(plan, matrix.slurm), soft_wrap=True, markup=False)
