"""Run a whole matrix: validate, select, resume, launch cell after cell with progress, record each.

Everything that can be wrong with the matrix file is found before the first launch (exit 2). A cell this
machine cannot run is an `unsupported` record with every reason (``--strict``: the whole matrix is refused
instead); a failed cell is a record and the matrix goes on; Ctrl-C records the running cell as interrupted
and says how to resume.
"""

from __future__ import annotations

import shlex
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bench.machine import bytecode, envinfo
from bench.launch import folder_lock
from bench.worker import memory_snapshot, slowdown
from bench import strategies
from bench.records.caveats import CPU_CAVEAT
from bench.spec import CellSettings, Matrix, MatrixError, check_time_budget, expand, load_matrix, select
from bench.strategies import check_names, collapse, unrunnable, validate_cells
from bench.launch.dry_run import print_dry_run
from bench.launch.plan import WORKER_MODULE, LaunchPlan, Unrunnable, build_plan
from bench.records import (DETERMINISTIC_FAILURES, RunRecord, append_record, check_writable, load_records,
                           not_launched_record, save_matrix_copy)
from bench.launch.runner import CellInterrupted, free_port, run_plan
from bench.launch.auto_batch import AutoCell, first_choices, plan_auto, run_auto


@dataclass
class RunOptions:
    results_dir: Path | None = None
    only: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    dry_run: bool = False
    retry_failed: bool = False
    force: bool = False
    repeats: int | None = None
    worker_module: str = WORKER_MODULE  # tests put a fault-injecting worker here
    device: str | None = None  # override the matrix's device (cpu/cuda)
    capacity_gib: float | None = None  # memory each rank must fit, for the pre-flight check (default: its GPU)
    wait_for_lock: bool = False  # another run writes the results folder: wait for it instead of stopping
    slow_step: float | None = None  # make every timed step this fraction slower on purpose (bench/worker/slowdown.py)
    strict: bool = False  # a cell this machine cannot run refuses the whole matrix (exit 2) instead of a record
    memory_snapshot: bool = False  # CUDA ranks record the allocator's history over the warm-up (bench/worker/memory_snapshot.py)


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


@dataclass
class Prepared:
    matrix: Matrix
    cells: list[CellSettings]
    results_dir: Path
    todo: list[tuple[CellSettings, int]]  # (cell, repeat index)
    skipped_done: int
    unrunnable: dict[str, list[str]] = field(default_factory=dict)  # cell id -> every reason it cannot run here
    visible_gpus: int = 0


def prepare(matrix_path: str, opts: RunOptions) -> Prepared:
    """Load, expand, select and validate; decide what is left to run. Raises MatrixError on bad input."""
    matrix = load_matrix(matrix_path)
    cells = expand(matrix, source=matrix_path, device=opts.device)
    cells = select(cells, opts.only, opts.exclude)
    if not cells:
        raise MatrixError(f"{matrix_path}: no cell left after --only/--exclude. Fix: loosen the selection")
    check_names(cells, matrix_path)
    from bench.launch.slurm_runner import check_launcher

    check_launcher(matrix, cells, matrix_path, submitting=not opts.dry_run)
    here = visible_gpus()
    # A dry run plans each cell for its own target machine; so does a Slurm run (its cells run elsewhere).
    target = None if opts.dry_run or matrix.launcher == "slurm" else here
    if opts.strict:
        validate_cells(cells, matrix_path, target)
    reasons = unrunnable(cells, target)
    if len(reasons) == len(cells):  # nothing would be measured: records would only say this machine is wrong
        problems = [(c, reasons[c.cell_id]) for c in cells]
        raise MatrixError(f"{matrix_path}: none of the {len(cells)} cell(s) can run on this machine\n"
                          + "\n".join(collapse(problems)))
    check_time_budget(cells, matrix.limits, matrix_path)
    results_dir = Path(opts.results_dir or Path("results") / matrix.name)
    if msg := check_writable(results_dir):
        raise MatrixError(msg)
    records = load_records(results_dir)
    refuse_foreign_records(records, results_dir)
    finished = finished_runs(records, opts.retry_failed, opts.force)
    repeats = opts.repeats or matrix.repeats
    # Round robin: every cell's first launch, then every cell's second... A cell's launches then lie minutes apart
    # and sample the machine's slower drifts (a host CPU at half pace for a minute: README, issue 16), which three
    # launches back to back share; their interval across launches would claim an agreement the next run lacks.
    todo = [(c, r) for r in range(repeats) for c in cells if (c.cell_id, r) not in finished]
    return Prepared(matrix, cells, results_dir, todo, len(cells) * repeats - len(todo), reasons, here)


def refuse_foreign_records(records: list[RunRecord], results_dir: Path) -> None:
    """Resume reuses only records this machine and this code wrote: records of other hardware or other code
    in the folder would be skipped as done and mixed with tonight's. Raises MatrixError naming them.

    The code is the bench package and its dependencies (`envinfo.code_digest`): a commit that touched only
    documentation or results between two halves of a run resumes; records from before the digest was kept
    are matched by git commit, as then."""
    if not records:
        return
    here = envinfo.fingerprint()
    foreign = sorted({(r.env.get("hardware"), r.env.get("git_sha")) for r in records
                      if not _same_code_and_machine(r.env, here)}, key=str)
    if foreign:
        listed = "; ".join(f"{hw} at git {sha}" for hw, sha in foreign)
        raise MatrixError(f"{results_dir} holds records measured on {listed}; this run is {here.get('hardware')} "
                          f"at git {here.get('git_sha')} (code {here.get('code_digest')}), and the hardware or the "
                          f"code differs. Resuming would reuse records it did not write. Fix: run into a fresh folder "
                          f"(--results {results_dir}-<date>), or move that folder away")


def _same_code_and_machine(env: dict, here: dict) -> bool:
    """A record's fingerprint against this run's: the same hardware, and the same code digest where both have
    one, else the same git commit."""
    if env.get("hardware") != here.get("hardware"):
        return False
    if env.get("code_digest") and here.get("code_digest"):
        return env["code_digest"] == here["code_digest"]
    return env.get("git_sha") == here.get("git_sha")


def finished_runs(records: list[RunRecord], retry_failed: bool, force: bool = False) -> set[tuple[str, int]]:
    """Runs that resume skips: ok ones, and deterministic failures unless --retry-failed.

    --force launches cells predicted not to fit, so their predicted_oom records are not final then; nor is
    one made by another version of the estimator: the cell is predicted again (and launched if it fits)."""
    from bench.estimate import ESTIMATOR_VERSION

    keep = {"ok"} if retry_failed else {"ok"} | DETERMINISTIC_FAILURES
    if force:
        keep = keep - {"predicted_oom"}

    def final(r: RunRecord) -> bool:
        if r.status == "predicted_oom":
            return (r.prediction or {}).get("estimator_version") == ESTIMATOR_VERSION
        return True

    return {(r.cell_id, r.repeat) for r in records if r.status in keep and final(r)}


def strategy_info(cell: CellSettings) -> dict:
    from bench.strategies.precision import policy_for

    info = {"precision_policy": policy_for(cell).description}
    s = strategies.get(cell.strategy)  # a user config is described from its content (family, ZeRO stage, offload)
    info.update(family=s.family, summary=s.summary)
    if cell.tp > 1 or cell.cp > 1:  # the degrees and the data-parallel layout they leave (absent at 1, as before)
        s = s.with_degrees(cell.tp, cell.cp)
        info.update(label=s.label, tp=s.tp, cp=s.cp, dp=s.dp_degree(cell.processes),
                    dp_shard=s.dp_shard(cell.processes) if s.shards else 1)
    # degrees: what the report asks of the strategy, kept so that it can ask even once a user's config is gone
    info["degrees"] = s.degrees()
    if strategies.is_user_config(cell.strategy):
        from bench.strategies.user_configs import deepspeed_own_blocks

        info.update(deepspeed_own_blocks(cell))
    return info


def resume_command(matrix_path: str, opts: RunOptions) -> str:
    args = ["bench", "run", matrix_path]
    if opts.results_dir:
        args += ["--results", str(opts.results_dir)]
    for o in opts.only:
        args += ["--only", o]
    for e in opts.exclude:
        args += ["--exclude", e]
    if opts.device:
        args += ["--device", opts.device]
    if opts.repeats:
        args += ["--repeats", str(opts.repeats)]
    if opts.retry_failed:
        args.append("--retry-failed")
    if opts.strict:
        args.append("--strict")
    if opts.slow_step:
        args += ["--slow-step", str(opts.slow_step)]
    if opts.memory_snapshot:
        args.append("--memory-snapshot")
    if opts.worker_module != WORKER_MODULE:
        args += ["--worker", opts.worker_module]
    return shlex.join(args)


def make_plans(prep: Prepared, opts: RunOptions) -> list[LaunchPlan | Unrunnable]:
    """What is left to do, in matrix order: a launch plan for each run, or why its cell cannot run here."""
    from bench.estimate import capacity_for

    extra_env = {**slowdown.launch_env(opts.slow_step), **memory_snapshot.launch_env(opts.memory_snapshot)}

    def plan(c: CellSettings, r: int) -> LaunchPlan:
        return build_plan(c, prep.results_dir, prep.matrix.limits, r, opts.worker_module, port=free_port(),
                          extra_env=extra_env)

    def item(c: CellSettings, r: int):
        if c.cell_id in prep.unrunnable:
            return Unrunnable(c, r, tuple(prep.unrunnable[c.cell_id]))
        if c.train.micro_batch == "auto":  # the estimator proposes, the launch confirms (launch/auto_batch.py)
            return plan_auto(c, r, capacity_for(c, opts.capacity_gib), lambda concrete: plan(concrete, r),
                             prep.matrix.estimate_margin)
        return plan(c, r)

    return [item(c, r) for c, r in prep.todo]


def run_matrix(matrix_path: str, opts: RunOptions, console: Console | None = None) -> int:
    console = console or Console()
    prep = prepare(matrix_path, opts)
    if opts.dry_run:
        plans = make_plans(prep, opts)
        print_dry_run(console, plans, prep.visible_gpus, prep.matrix)
        if warning := oversubscription_warning([plan.cell for plan in plans if isinstance(plan, LaunchPlan)]):
            console.print(f"[yellow]warning[/]: {escape(warning)}")
        return 0
    with folder_lock.hold(prep.results_dir, wait=opts.wait_for_lock,
                          on_wait=lambda who: console.print(f"waiting for the results folder, held by {escape(who)}"),
                          on_takeover=lambda who: console.print(
                              f"[yellow]note[/]: took over the results folder's lock left by a run that ended "
                              f"without releasing it ({escape(who)})")):
        # Again under the lock: a run that held the folder meanwhile may have recorded cells.
        return _run_locked(matrix_path, prepare(matrix_path, opts), opts, console)


def _run_locked(matrix_path: str, prep: Prepared, opts: RunOptions, console: Console) -> int:
    plans = make_plans(prep, opts)
    if prep.skipped_done:
        console.print(f"resuming: {prep.skipped_done} run(s) already recorded in {prep.results_dir} are skipped")
    if not plans:
        console.print("nothing to run: every cell is already recorded (use --retry-failed to rerun failures)")
        return 0
    try:
        if note := save_matrix_copy(Path(matrix_path), prep.results_dir):
            console.print(f"[yellow]note[/]: {escape(note)}")
    except OSError as e:  # informational only: never stop a run over it
        console.print(f"[yellow]note[/]: matrix not copied into {escape(str(prep.results_dir))}: {escape(str(e))}")
    fingerprint = envinfo.fingerprint()
    if warning := bytecode.recompile_warning(fingerprint["bytecode_cache"]):
        console.print(f"[yellow]note[/]: {escape(warning)}")
    if warning := oversubscription_warning([plan.cell for plan in plans if isinstance(plan, LaunchPlan)]):
        console.print(f"[yellow]warning[/]: {escape(warning)}")
    hooks = CellHooks(prep.matrix, opts, first_choices(load_records(prep.results_dir)))
    with sigterm_as_interrupt():
        return _launch_all(plans, prep, fingerprint, hooks, matrix_path, opts, console)


@contextmanager
def sigterm_as_interrupt():
    """A SIGTERM to bench (a CI job's time limit, a scheduler) stops the matrix the way Ctrl-C does."""
    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _launch_all(plans, prep, fingerprint, hooks, matrix_path, opts, console) -> int:
    statuses: dict[str, int] = {}
    columns = [TextColumn("[bold]cell {task.completed}/{task.total}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.description}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("", total=len(plans))
        for plan in plans:
            progress.update(task, description=plan.cell.label)
            try:
                record = hooks.run(plan, prep.matrix.name, fingerprint)
            except (CellInterrupted, KeyboardInterrupt) as stop:
                # Ctrl-C in a cell: the runner stopped its tree and made it a record. Between cells:
                # nothing runs, nothing to record. Either way the cells not yet run stay unrecorded.
                what = "recorded as interrupted" if isinstance(stop, CellInterrupted) else "not recorded"
                if isinstance(stop, CellInterrupted):
                    append_record(prep.results_dir, stop.record)
                progress.stop()
                console.print(f"[yellow]interrupted[/]: {escape(plan.cell.label)} {what}. "
                              f"Resume with:\n  {escape(resume_command(matrix_path, opts))}")
                return 130
            append_record(prep.results_dir, record)
            statuses[record.status] = statuses.get(record.status, 0) + 1
            print_outcome(progress.console, plan, record)
            progress.advance(task)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    console.print(f"recorded {len(plans)} run(s) in {prep.results_dir / 'runs.jsonl'}: {summary}")
    if any(plan.cell.device == "cpu" for plan in plans if isinstance(plan, LaunchPlan)):
        console.print(f"[yellow]note[/]: {CPU_CAVEAT}")
    return 0


def oversubscription_warning(cells: list[CellSettings]) -> str | None:
    """CPU cells with more processes than this process may use cores time each other, not the strategy.
    The cores counted are those this process may run on (a container's or taskset's share), not the host's."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    over = sorted({c.gpus for c in cells if c.device == "cpu" and c.gpus > cores})
    if not over:
        return None
    return (f"CPU cells with {', '.join(map(str, over))} processes on a machine with {cores} core(s): the processes "
            "share cores and their times say nothing about the strategy. Fix: --only gpus=<n <= cores>")


def print_outcome(console: Console, plan: LaunchPlan | Unrunnable, record: RunRecord) -> None:
    style = "green" if record.status == "ok" else "red"
    # Error text comes from logs ("[/path/pair.cc:537]"): never let rich read it as markup.
    lines = record.error.message.splitlines() if record.error and record.error.message else []
    detail = f" - {lines[0][:160]}" if lines else ""
    console.print(f"[{style}]{record.status:>13}[/] {escape(plan.cell.label)} ({record.wall_s:.1f} s){escape(detail)}")
    if isinstance(plan, Unrunnable):  # every reason: the user fixes them all at once
        for line in lines[1:]:
            console.print(f"{'':>13} - {escape(line)}")
    if record.leftover_processes:
        names = ", ".join(f"{p['pid']} {p.get('name', '')}" for p in record.leftover_processes)
        console.print(f"[yellow]{'':>13} killed {len(record.leftover_processes)} process(es) left by this cell: "
                      f"{escape(names)}[/]")


class CellHooks:
    """What happens around each launch: GPU checks, memory prediction, NVML sampling.

    Kept apart from the loop so that each concern lives in its own module and plugs in here.
    """

    def __init__(self, matrix: Matrix, opts: RunOptions, auto_chosen: dict[str, tuple[int, int]] | None = None):
        self.matrix = matrix
        self.opts = opts
        self.auto_chosen = dict(auto_chosen or {})  # auto cell id -> (micro-batch, repeat) of its first ok launch

    def run(self, plan: LaunchPlan | Unrunnable | AutoCell, matrix_name: str, fingerprint: dict) -> RunRecord:
        if isinstance(plan, Unrunnable):
            return unsupported_record(plan, matrix_name, fingerprint)
        if isinstance(plan, AutoCell):
            if plan.proposed is None:
                return unsupported_record(Unrunnable(plan.cell, plan.repeat, (str(plan.reason),)), matrix_name,
                                          fingerprint)
            # a micro-batch above the proposal is launched because a measurement says it fits: no pre-flight skip
            record = run_auto(plan, lambda concrete, measured_fit: self.launch(concrete, matrix_name, fingerprint,
                                                                               measured_fit),
                              reuse=self.auto_chosen.get(plan.cell.cell_id))
            for cell_id, choice in first_choices([record]).items():
                self.auto_chosen.setdefault(cell_id, choice)
            return record
        return self.launch(plan, matrix_name, fingerprint)

    def launch(self, plan: LaunchPlan, matrix_name: str, fingerprint: dict, force: bool = False) -> RunRecord:
        """Predict, check the GPUs, launch and record one plan (``force``: even if predicted not to fit)."""
        from bench.estimate import preflight

        info = strategy_info(plan.cell)
        prediction, not_launched = preflight(plan, matrix_name, fingerprint, self.matrix.estimate_margin,
                                             self.opts.force or force, self.opts.capacity_gib, info)
        if not_launched is not None:
            return not_launched
        if self.matrix.launcher == "slurm":  # the nodes set the arch list themselves and add their notes
            from bench.launch.slurm_runner import run_slurm_plan

            return run_slurm_plan(plan, matrix_name, fingerprint, self.matrix.slurm,
                                  strategy_info=with_launch_notes(info, plan), prediction=prediction)
        sampler = None
        if plan.cell.device == "cuda":
            plan = with_deepspeed_arch_list(plan)
        info = with_launch_notes(info, plan)
        if plan.cell.device == "cuda":
            if busy := wait_for_free_gpus(plan.cell.gpus):
                return busy_record(plan, matrix_name, fingerprint, busy, info)
            from bench.machine.sampler import NvmlSampler, sampler_enabled

            sampler = NvmlSampler(plan.cell.gpus) if sampler_enabled() else None
        return run_plan(plan, matrix_name, fingerprint, sampler=sampler, strategy_info=info, prediction=prediction)


def with_launch_notes(info: dict, plan: LaunchPlan) -> dict:
    """The record's strategy_info with what was decided for this launch (a user config's resolution, the
    arch list, the cores): ``launch_notes``, absent when nothing was."""
    return {**info, "launch_notes": list(plan.notes)} if plan.notes else info


def with_deepspeed_arch_list(plan: LaunchPlan) -> LaunchPlan:
    """A DeepSpeed cell on CUDA gets a TORCH_CUDA_ARCH_LIST its JIT op builder can read (bench/launch/cuda_arch.py);
    the value and why are in the cell's command, launch.sh and plan notes."""
    import os

    from bench.launch import cuda_arch
    from bench.launch.plan import with_env

    if "deepspeed.json" not in plan.files:
        return plan
    fix = cuda_arch.jit_arch_fix(os.environ.get("TORCH_CUDA_ARCH_LIST"), cuda_arch.capabilities_of(plan.cell.gpus))
    return with_env(plan, "TORCH_CUDA_ARCH_LIST", fix.value, fix.note) if fix else plan


def wait_for_free_gpus(gpu_count: int, patience_s: float = 15.0) -> str | None:
    """None once the cell's GPUs are free; the reason they are busy if still so after ``patience_s``.

    The wait covers the driver releasing the previous cell's memory a moment after its processes end.
    """
    import time

    from bench.machine.gpu_state import busy_reason

    deadline = time.time() + patience_s
    while (reason := busy_reason(gpu_count)) and time.time() < deadline:
        time.sleep(1.0)
    return reason


def busy_record(plan: LaunchPlan, matrix_name: str, fingerprint: dict, reason: str, info: dict) -> RunRecord:
    """A busy GPU is reported, not measured: numbers taken beside another tenant would mislead."""
    return not_launched_record(matrix_name, plan.cell, plan.repeat, fingerprint, "busy",
                               f"GPU busy, not measured: {reason}", info, command=plan.shell_command())


def unsupported_record(item: Unrunnable, matrix_name: str, fingerprint: dict) -> RunRecord:
    """A cell this machine or stack cannot run: every reason, one per line; nothing launched."""
    try:
        info = strategy_info(item.cell)
    except MatrixError:  # a user config that cannot be read: its reason is in the message
        info = {}
    return not_launched_record(matrix_name, item.cell, item.repeat, fingerprint, "unsupported",
                               "\n".join(item.reasons), info)


def main_guard(fn, *args, **kwargs) -> int:
    """Turn bad input into exit code 2 with the message, nothing launched."""
    from bench.records import ErratumError, SchemaError

    try:
        return fn(*args, **kwargs)
    except (MatrixError, SchemaError, ErratumError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the first launch or between cells: nothing running, nothing to record
        print("interrupted", file=sys.stderr)
        return 130
