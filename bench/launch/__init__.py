"""Launching: a matrix's cells run as real `accelerate launch` processes, one after the other.

Rooms: ``campaign`` (``bench run``: a matrix prepared, checked, its cells launched, records appended),
``plan`` (a cell -> the command, environment and config files of one launch, built without side
effects; or why it cannot launch), ``dry_run`` (``--dry-run``: every launch printed, nothing run), ``runner`` (one plan run: watched for hangs and timeouts, its outcome classified, its record
made), ``process_tree`` (the launch's processes, ended together), ``failures`` (what went wrong and on
which rank), ``folder_lock`` (one writer per results folder), ``cuda_arch`` (an arch list DeepSpeed's
op builder can read), ``slurm`` (a cell as a Slurm batch job across nodes: the cluster launcher). The
worker it launches is bench.worker (by module name, never imported here but for the slowdown's
environment).

The front is lazy (a name loads its room on first use): the campaign pulls in the estimator and rich.
"""

from bench.lazy_front import lazy_front

_ROOM = {
    "RunOptions": "campaign", "main_guard": "campaign", "prepare": "campaign", "run_matrix": "campaign",
    "WORKER_MODULE": "plan", "LaunchPlan": "plan", "build_plan": "plan", "write_plan_files": "plan",
    "CellInterrupted": "runner", "run_plan": "runner",
}

__all__ = [
    "CellInterrupted", "LaunchPlan", "RunOptions", "WORKER_MODULE", "build_plan", "main_guard", "prepare",
    "run_matrix", "run_plan", "write_plan_files",
]

__getattr__, __dir__ = lazy_front(__name__, _ROOM, globals(), __all__)
