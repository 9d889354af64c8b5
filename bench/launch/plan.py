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
from typing import Any

import yaml

from bench import strategies
from bench.matrix import CellSettings, Limits
from bench.strategies import Strategy

WORKER_MODULE = "bench.worker"
TRANSFORMER_LAYER = "LlamaDecoderLayer"


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


# ---------------------------------------------------------------- DeepSpeed

def deepspeed_config(strategy: Strategy, cell: CellSettings) -> dict[str, Any]:
    """The DeepSpeed JSON a user would write for this strategy (overlap_comm on, as users run it)."""
    t = cell.train
    zero: dict[str, Any] = {
        "stage": strategy.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 500_000_000,
    }
    if strategy.zero_stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": 500_000_000,
            "stage3_param_persistence_threshold": 1_000_000,
            "stage3_gather_16bit_weights_on_model_save": False,
        })
    else:
        zero["allgather_bucket_size"] = 500_000_000
    if strategy.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cell.device == "cuda"}
    if strategy.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cell.device == "cuda"}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
    if t.optimizer == "adamw_bnb_8bit" and not strategy.offload_optimizer:
        # DeepSpeed refuses optimizers it has not tested with ZeRO unless told (accelerate sets this
        # too at prepare; written here so that the JSON works as it is in a user's own job).
        config["zero_allow_untested_optimizer"] = True
    if strategy.offload_optimizer:
        # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's own CPU Adam; a torch optimizer
        # object cannot be offloaded, so the optimizer is named here and the worker passes a placeholder.
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": t.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": t.weight_decay}}
    return config


# ---------------------------------------------------------------- accelerate

def _mixed_precision(cell: CellSettings) -> str:
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[cell.train.precision]


def accelerate_config(strategy: Strategy, cell: CellSettings, ds_config_path: Path | None) -> dict[str, Any]:
    """The accelerate config YAML, as `accelerate config` writes it."""
    multi = cell.gpus > 1
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "num_machines": 1,
        "machine_rank": 0,
        "num_processes": cell.gpus,
        "mixed_precision": _mixed_precision(cell),
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "downcast_bf16": "no",
    }
    if strategy.family == "single" or (strategy.family == "ddp" and not multi):
        config["distributed_type"] = "NO"
    elif strategy.family == "ddp":
        # On CPU too: MULTI_GPU plus ACCELERATE_USE_CPU=1 gives gloo ranks (MULTI_CPU would want mpirun).
        config["distributed_type"] = "MULTI_GPU"
    elif strategy.family == "deepspeed":
        config["distributed_type"] = "DEEPSPEED"
        del config["mixed_precision"]  # the DeepSpeed JSON owns precision; accelerate refuses it twice
        config["deepspeed_config"] = {
            "deepspeed_config_file": str(ds_config_path),
            "zero3_init_flag": strategy.zero_stage == 3,
        }
    else:
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = _fsdp_config(strategy, cell)
    if cell.device == "cuda" and config["distributed_type"] != "NO":
        config["gpu_ids"] = "all"
    return config


def _fsdp_config(strategy: Strategy, cell: CellSettings) -> dict[str, Any]:
    common = {
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": TRANSFORMER_LAYER,
        "fsdp_offload_params": strategy.offload_params,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": False,
        # Checkpointing is applied by the worker (gradient_checkpointing_enable), the way HF users do.
        "fsdp_activation_checkpointing": False,
    }
    if strategy.family == "fsdp2":
        return {"fsdp_version": 2, "fsdp_reshard_after_forward": strategy.reshard_after_forward, **common}
    return {
        "fsdp_version": 1,
        "fsdp_sharding_strategy": strategy.fsdp_sharding,
        "fsdp_backward_prefetch": "BACKWARD_PRE",
        "fsdp_forward_prefetch": False,
        "fsdp_sync_module_states": False,  # random init from one seed: every rank builds the same weights
        # LoRA: frozen and trainable parameters in one unit need the original parameters kept. QLoRA: the
        # documented FSDP-QLoRA setting (PEFT guide, HF recipes) is False, because bitsandbytes rebuilds its
        # 4-bit weight from the flat parameter's storage in forward; the adapters are their own units anyway.
        "fsdp_use_orig_params": cell.adapter.type != "qlora",
        **common,
    }


# ---------------------------------------------------------------- the plan

_FROM_ENVIRON = object()  # build_plan's default: read the parent's CUDA_VISIBLE_DEVICES at call time


def cell_visible_devices(gpus: int, parent_visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for a cuda cell of ``gpus`` ranks: the first ``gpus`` of the parent's devices.

    A rank must see exactly its cell's cards: torch sizes FSDP's hybrid-shard intra-node group from
    torch.cuda.device_count(), so a 2-rank cell on a 4-GPU host asked for a group of 4 in a world of 2.
    The parent's own list (indices or GPU-/MIG- UUIDs) is respected, cut to its first ``gpus`` entries;
    unset, it is 0..gpus-1. These are the devices bench.gpu_state / the NVML sampler watch for the cell
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
               extra_env: dict[str, str] | None = None) -> LaunchPlan:
    """``parent_visible_devices``: the parent's CUDA_VISIBLE_DEVICES (None: unset); read from the
    environment unless given, so that tests can pin it. ``extra_env``: added to the launch's environment
    (``--slow-step``: bench/slowdown.py)."""
    if parent_visible_devices is _FROM_ENVIRON:
        parent_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    cell_dir = results_dir.resolve() / "cells" / (cell.cell_id + (f"-r{repeat}" if repeat else ""))
    files: dict[str, str] = {"cell.json": json.dumps(cell.model_dump(mode="json"), indent=2)}
    notes: list[str] = []
    if strategies.is_user_config(cell.strategy):
        from bench.user_configs import resolve_with_originals

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
        strategy = strategies.get(cell.strategy)
        ds = deepspeed_config(strategy, cell) if strategy.family == "deepspeed" else None
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
    env.update(extra_env or {})
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


def _launch_script(plan: LaunchPlan) -> str:
    return f"#!/usr/bin/env bash\n# Re-run this cell by hand\n{plan.shell_command()}\n"


def write_plan_files(plan: LaunchPlan) -> None:
    plan.cell_dir.mkdir(parents=True, exist_ok=True)
    plan.rank_dir.mkdir(exist_ok=True)
    for name, content in plan.files.items():
        (plan.cell_dir / name).write_text(content)
