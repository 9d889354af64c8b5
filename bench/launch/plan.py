"""Cell -> LaunchPlan: the command, environment and config files of one run, built without side effects.

``build_plan`` is pure (``bench run --dry-run`` prints its result); ``write_plan_files`` puts the
generated accelerate YAML and DeepSpeed JSON into the cell's folder, where a user can take them as they
are for their own job.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from bench import strategies
from bench.spec import CellSettings, Limits, MatrixError
from bench.strategies.render import accelerate_config, deepspeed_config, parallelism_env

WORKER_MODULE = "bench.worker"


@dataclass(frozen=True)
class LaunchPlan:
    cell: CellSettings
    cell_dir: Path
    argv: list[str]
    env: dict[str, str]  # added to the parent's environment, never replacing it
    files: dict[str, str]  # file name in cell_dir -> content
    limits: Limits
    repeat: int = 0
    worker_module: str = WORKER_MODULE
    notes: list[str] = field(default_factory=list)

    @property
    def rank_dir(self) -> Path:
        return self.cell_dir / "ranks"

    def shell_command(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{env} {shlex.join(self.argv)}".strip()


# ---------------------------------------------------------------- the plan

_FROM_ENVIRON = object()  # build_plan's default: read the parent's CUDA_VISIBLE_DEVICES at call time


def cell_visible_devices(gpus: int, parent_visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for a cuda cell of ``gpus`` ranks: the first ``gpus`` of the parent's devices.

    A rank must see exactly its cell's cards: torch sizes FSDP's hybrid-shard intra-node group from
    torch.cuda.device_count(), so a 2-rank cell on a 4-GPU host asked for a group of 4 in a world of 2.
    The parent's own list (indices or GPU-/MIG- UUIDs) is respected, cut to its first ``gpus`` entries;
    unset, it is 0..gpus-1. These are the devices bench.machine.gpu_state / the NVML sampler watch for the cell
    (CUDA indices 0..gpus-1 mapped through the parent's CUDA_VISIBLE_DEVICES).
    """
    if parent_visible is None:
        return ",".join(str(i) for i in range(gpus))
    entries = [e.strip() for e in parent_visible.split(",") if e.strip()]
    return ",".join(entries[:gpus])


def _launch_env(cell: CellSettings, limits: Limits, deepspeed: bool,
                parent_visible: str | None = None) -> dict[str, str]:
    env = {
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        # A stuck collective must surface before the hang watchdog fires, not after NCCL's 10 minutes.
        "BENCH_COLLECTIVE_TIMEOUT_S": str(limits.collective_timeout_s),
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }
    if cell.device == "cpu":
        if not deepspeed:
            # With DeepSpeed this would turn the run into plain MULTI_CPU; DeepSpeed finds the CPU itself.
            env["ACCELERATE_USE_CPU"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
        # Two ranks on a 2-core machine: one thread each, or they fight over cores.
        env["OMP_NUM_THREADS"] = "1"
    elif cell.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = cell_visible_devices(cell.gpus, parent_visible)
    return env


def build_plan(cell: CellSettings, results_dir: Path, limits: Limits, repeat: int = 0,
               worker_module: str = WORKER_MODULE, port: int = 29500,
               parent_visible_devices: str | None | object = _FROM_ENVIRON,
               extra_env: dict[str, str] | None = None, cpu_plan: tuple[str, str] | None = None) -> LaunchPlan:
    """``parent_visible_devices``: the parent's CUDA_VISIBLE_DEVICES (None: unset); read from the
    environment unless given, so that tests can pin it. ``extra_env``: added to the launch's environment
    (``--slow-step``: bench/worker/slowdown.py). ``cpu_plan``: (BENCH_CPU_AFFINITY value, note) of a
    ``cpu_affinity: cores`` cell; planned from this host's CPUs (and NVML) unless given."""
    if parent_visible_devices is _FROM_ENVIRON:
        parent_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    cell_dir = results_dir.resolve() / "cells" / (cell.cell_id + (f"-r{repeat}" if repeat else ""))
    files: dict[str, str] = {"cell.json": json.dumps(cell.model_dump(mode="json"), indent=2)}
    notes: list[str] = []
    if strategies.is_user_config(cell.strategy):
        from bench.strategies.user_configs import resolve_with_originals

        # The user's files are copied as original_<name> beside the resolved ones.
        accel, ds, notes, originals = resolve_with_originals(cell, cell_dir)
        if cell.device == "cuda" and str(accel.get("gpu_ids", "all")) != "all":
            # accelerate would set CUDA_VISIBLE_DEVICES from gpu_ids, away from the cards bench checks
            # and samples for the cell (see cell_visible_devices).
            notes = [*notes, f"gpu_ids {accel['gpu_ids']!r} -> 'all': bench gives the cell its first "
                             f"{cell.gpus} visible GPU(s) through CUDA_VISIBLE_DEVICES"]
            accel["gpu_ids"] = "all"
        files.update(originals)
        files["resolution_notes.txt"] = "\n".join(notes) + "\n"
    else:
        strategy = strategies.for_cell(cell)  # at the cell's tensor and context degrees
        ds = deepspeed_config(strategy, cell)
        accel = accelerate_config(strategy, cell, cell_dir / "deepspeed.json" if ds else None)
    if ds is not None:
        files["deepspeed.json"] = json.dumps(ds, indent=2)
    files["accelerate.yaml"] = yaml.safe_dump(accel, sort_keys=False)
    argv = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(cell_dir / "accelerate.yaml"),
        "--main_process_port", str(port),
        "-m", worker_module,
        "--cell", str(cell_dir / "cell.json"),
        "--out", str(cell_dir / "ranks"),
    ]
    if cell.device == "cpu" and accel.get("distributed_type") == "MULTI_GPU":
        argv.insert(argv.index("--config_file"), "--multi_gpu")
    env = _launch_env(cell, limits, deepspeed=accel.get("distributed_type") == "DEEPSPEED",
                      parent_visible=parent_visible_devices)
    if not strategies.is_user_config(cell.strategy):
        env.update(parallelism_env(strategies.for_cell(cell), cell.processes))
    env.update(extra_env or {})
    if cell.cpu_affinity == "cores":
        from bench.machine import cpu_affinity

        try:  # planned on this host: a dry run here of a cell for a bigger machine may not fit its ranks
            value, note = cpu_plan or cpu_affinity.launch_value(cell.gpus, cell.device)
        except ValueError as e:
            raise MatrixError(f"{cell.label}: {e}") from None
        env[cpu_affinity.ENV] = value
        notes = [*notes, note]
    plan = LaunchPlan(cell, cell_dir, argv, env, files, limits, repeat, worker_module, notes)
    files["launch.sh"] = _launch_script(plan)
    return plan


def with_env(plan: LaunchPlan, key: str, value: str, note: str) -> LaunchPlan:
    """The plan with one more environment variable (decided at launch time, from the machine), its
    launch.sh and notes saying so."""
    env = {**plan.env, key: value}
    changed = replace(plan, env=env, notes=[*plan.notes, note], files=dict(plan.files))
    changed.files["launch.sh"] = _launch_script(changed)
    return changed


def with_port(plan: LaunchPlan, port: int) -> LaunchPlan:
    """The plan rendezvousing on ``port`` (its ``--main_process_port``), launch.sh saying so. bench picks the
    port at launch: one picked when the matrix was planned may be taken minutes later (results/llama-full-h200-b2,
    a 2-GPU cell's TCPStore failed with EADDRINUSE)."""
    if "--main_process_port" not in plan.argv:
        return plan
    argv = list(plan.argv)
    argv[argv.index("--main_process_port") + 1] = str(port)
    changed = replace(plan, argv=argv, files=dict(plan.files))
    changed.files["launch.sh"] = _launch_script(changed)
    return changed


def _launch_script(plan: LaunchPlan) -> str:
    return f"#!/usr/bin/env bash\n# Re-run this cell by hand\n{plan.shell_command()}\n"


def write_plan_files(plan: LaunchPlan) -> None:
    plan.cell_dir.mkdir(parents=True, exist_ok=True)
    plan.rank_dir.mkdir(exist_ok=True)
    for name, content in plan.files.items():
        (plan.cell_dir / name).write_text(content)


@dataclass(frozen=True)
class Unrunnable:
    """A cell of the matrix that this machine cannot run: recorded as unsupported, never launched."""

    cell: CellSettings
    repeat: int
    reasons: tuple[str, ...]
