"""A strategy rendered as the files users write: the accelerate config YAML and, for DeepSpeed, the
DeepSpeed JSON. The plan (bench/launch/plan.py) writes them into each cell's folder, where a user can
take them as they are for their own job; a user's own accelerate config is completed with them
(bench/strategies/user_configs.py).

One renderer per framework over a small base: the base writes accelerate's keys every launch has, each
framework its distributed section (and DeepSpeed its JSON). Sizes come from bench/strategies/constants.py,
which the estimator reads too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.spec.schema import CellSettings
from bench.strategies.constants import DEEPSPEED, FSDP
from bench.strategies.strategy import Framework, Strategy


class Renderer:
    """accelerate's config as `accelerate config` writes it; a framework fills ``distributed``."""

    def deepspeed_config(self, strategy: Strategy, cell: CellSettings) -> dict[str, Any] | None:
        return None  # only DeepSpeed has a JSON of its own

    def accelerate_config(self, strategy: Strategy, cell: CellSettings, ds_config_path: Path | None) -> dict[str, Any]:
        config: dict[str, Any] = {
            "compute_environment": "LOCAL_MACHINE",
            "num_machines": 1,
            "machine_rank": 0,
            "num_processes": cell.processes,  # nodes x processes per node; a Slurm launch sets --num_machines per node
            "mixed_precision": {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[cell.train.precision],
            "rdzv_backend": "static",
            "same_network": True,
            "main_training_function": "main",
            "downcast_bf16": "no",
        }
        self.distributed(config, strategy, cell, ds_config_path)
        if strategy.uses_parallelism_config:
            config["parallelism_config"] = parallelism_config(strategy, cell.processes)
        if cell.device == "cuda" and config["distributed_type"] != "NO":
            config["gpu_ids"] = "all"
        return config

    def distributed(self, config: dict[str, Any], strategy: Strategy, cell: CellSettings,
                    ds_config_path: Path | None) -> None:
        raise NotImplementedError


def parallelism_config(strategy: Strategy, world: int) -> dict[str, Any]:
    """accelerate's parallelism_config section (as `accelerate config` writes it): `accelerate launch` exports it
    as PARALLELISM_CONFIG_* variables, from which each rank's Accelerator builds its ParallelismConfig."""
    config: dict[str, Any] = {
        "parallelism_config_dp_replicate_size": strategy.dp_replicate(world) if strategy.shards else 1,
        "parallelism_config_dp_shard_size": strategy.dp_shard(world) if strategy.shards else 1,
        "parallelism_config_tp_size": strategy.tp,
        "parallelism_config_cp_size": strategy.cp,
    }
    if strategy.cp > 1:
        config["parallelism_config_cp_backend"] = "torch"
        config["parallelism_config_cp_comm_strategy"] = "allgather"  # accelerate's default rotation
    return config


def parallelism_env(strategy: Strategy, world: int) -> dict[str, str]:
    """The variables `accelerate launch` derives from the parallelism_config section (utils/launch.py:
    prepare_extend_env_parallelism_config). The plan sets them too: a launch with --multi_gpu on the command
    line skips the section of the config file (commands/launch.py reads it only without such a flag)."""
    if not strategy.uses_parallelism_config:
        return {}
    env = {"ACCELERATE_USE_PARALLELISM_CONFIG": "true"}
    for key, value in parallelism_config(strategy, world).items():
        env[key.upper()] = str(value)
    return env


class TorchRenderer(Renderer):
    def distributed(self, config, strategy, cell, ds_config_path):
        # On CPU too: MULTI_GPU plus ACCELERATE_USE_CPU=1 gives gloo ranks (MULTI_CPU would want mpirun).
        # Tensor parallelism alone is a multi-GPU launch with a parallelism config and no wrapper.
        multi = strategy.uses_ddp(cell.processes) or (strategy.tensor_only and cell.processes > 1)
        config["distributed_type"] = "MULTI_GPU" if multi else "NO"


class DeepSpeedRenderer(Renderer):
    def distributed(self, config, strategy, cell, ds_config_path):
        config["distributed_type"] = "DEEPSPEED"
        del config["mixed_precision"]  # the DeepSpeed JSON owns precision; accelerate refuses it twice
        config["deepspeed_config"] = {
            "deepspeed_config_file": str(ds_config_path),
            "zero3_init_flag": strategy.shards_params,
        }

    def deepspeed_config(self, strategy, cell):
        """The DeepSpeed JSON a user would write for this strategy (overlap_comm on, as users run it)."""
        t = cell.train
        zero: dict[str, Any] = {
            "stage": strategy.zero_stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            **DEEPSPEED.written(strategy.shard_level),
        }
        if strategy.shards_params:
            zero["stage3_gather_16bit_weights_on_model_save"] = False
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


class FsdpRenderer(Renderer):
    """accelerate's fsdp_config: the keys both versions take, and each version's own."""

    def distributed(self, config, strategy, cell, ds_config_path):
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {**self.version_keys(strategy, cell), **{
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": FSDP.transformer_layer,
            "fsdp_offload_params": strategy.offload_params,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": False,
            # Checkpointing is applied by the worker (gradient_checkpointing_enable), the way HF users do.
            "fsdp_activation_checkpointing": False,
        }}

    def version_keys(self, strategy: Strategy, cell: CellSettings) -> dict[str, Any]:
        raise NotImplementedError


class Fsdp1Renderer(FsdpRenderer):
    def version_keys(self, strategy, cell):
        return {
            "fsdp_version": 1,
            "fsdp_sharding_strategy": strategy.fsdp_sharding,
            "fsdp_backward_prefetch": FSDP.backward_prefetch,
            "fsdp_forward_prefetch": FSDP.forward_prefetch,
            "fsdp_sync_module_states": False,  # random init from one seed: every rank builds the same weights
            # LoRA: frozen and trainable parameters in one unit need the original parameters kept. QLoRA: the
            # documented FSDP-QLoRA setting (PEFT guide, HF recipes) is False, because bitsandbytes rebuilds its
            # 4-bit weight from the flat parameter's storage in forward; the adapters are their own units anyway.
            "fsdp_use_orig_params": cell.adapter.type != "qlora",
        }


class Fsdp2Renderer(FsdpRenderer):
    def version_keys(self, strategy, cell):
        return {"fsdp_version": 2, "fsdp_reshard_after_forward": strategy.reshard_after_forward}


RENDERERS: dict[Framework, Renderer] = {
    "torch": TorchRenderer(), "deepspeed": DeepSpeedRenderer(), "fsdp1": Fsdp1Renderer(), "fsdp2": Fsdp2Renderer(),
}


def deepspeed_config(strategy: Strategy, cell: CellSettings) -> dict[str, Any] | None:
    """The DeepSpeed JSON a user would write for this strategy; None outside DeepSpeed."""
    return RENDERERS[strategy.framework].deepspeed_config(strategy, cell)


def accelerate_config(strategy: Strategy, cell: CellSettings, ds_config_path: Path | None) -> dict[str, Any]:
    """The accelerate config YAML, as `accelerate config` writes it."""
    return RENDERERS[strategy.framework].accelerate_config(strategy, cell, ds_config_path)
