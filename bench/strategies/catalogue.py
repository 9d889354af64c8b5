"""The strategy catalogue: each name -> the accelerate / DeepSpeed / FSDP settings users would write.

A strategy is data, not code: the plan turns it into an accelerate config YAML and, for DeepSpeed, a
DeepSpeed JSON, both written into the cell's folder so that a user can reuse them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["single", "ddp", "deepspeed", "fsdp", "fsdp2"]


@dataclass(frozen=True)
class Strategy:
    name: str
    family: Family
    summary: str
    zero_stage: int | None = None
    offload_optimizer: bool = False
    offload_params: bool = False
    fsdp_sharding: str | None = None  # FSDP1 sharding strategy name, as accelerate spells it
    reshard_after_forward: bool | None = None  # FSDP2
    shards_params: bool = False  # parameters are split across ranks (ZeRO-3, FSDP full/hybrid shard)

    @property
    def offloads(self) -> bool:
        """Parameters or optimizer states live on the host (ZeRO-Offload, FSDP parameter offload)."""
        return self.offload_params or self.offload_optimizer

    @property
    def runs_on_cpu(self) -> bool:
        """accelerate enables FSDP only on GPUs; DDP and DeepSpeed run over gloo on CPU."""
        return self.family in ("single", "ddp", "deepspeed")


def _zero(name: str, stage: int, summary: str, **kw) -> Strategy:
    return Strategy(name, "deepspeed", summary, zero_stage=stage, shards_params=stage == 3, **kw)


def _fsdp(name: str, sharding: str, summary: str, **kw) -> Strategy:
    shards = sharding in ("FULL_SHARD", "HYBRID_SHARD")
    return Strategy(name, "fsdp", summary, fsdp_sharding=sharding, shards_params=shards, **kw)


CATALOGUE: dict[str, Strategy] = {s.name: s for s in [
    Strategy("single", "single", "one process, no distributed wrapper (what a user runs today)"),
    Strategy("ddp", "ddp", "PyTorch DistributedDataParallel: full replica per rank, gradients all-reduced"),
    _zero("zero1", 1, "DeepSpeed ZeRO-1: optimizer states sharded"),
    _zero("zero2", 2, "DeepSpeed ZeRO-2: optimizer states and gradients sharded"),
    _zero("zero3", 3, "DeepSpeed ZeRO-3: optimizer states, gradients and parameters sharded"),
    _zero("zero2_offload", 2, "ZeRO-2 with optimizer states and step on the CPU", offload_optimizer=True),
    _zero("zero3_offload", 3, "ZeRO-3 with optimizer and parameters offloaded to the CPU",
          offload_optimizer=True, offload_params=True),
    _zero("zero3_offload_optimizer", 3, "ZeRO-3 with only the optimizer offloaded to the CPU", offload_optimizer=True),
    _fsdp("fsdp_full_shard", "FULL_SHARD", "FSDP1 full shard (ZeRO-3-like)"),
    _fsdp("fsdp_shard_grad_op", "SHARD_GRAD_OP", "FSDP1 shard gradients and optimizer (ZeRO-2-like)"),
    _fsdp("fsdp_hybrid_shard", "HYBRID_SHARD", "FSDP1 full shard within a node, replicate across nodes"),
    _fsdp("fsdp_no_shard", "NO_SHARD", "FSDP1 without sharding (DDP-like)"),
    _fsdp("fsdp_full_shard_offload", "FULL_SHARD", "FSDP1 full shard with parameters offloaded to the CPU",
          offload_params=True),
    Strategy("fsdp2", "fsdp2", "FSDP2 (fully_shard), parameters resharded after forward",
             reshard_after_forward=True, shards_params=True),
    Strategy("fsdp2_no_reshard", "fsdp2", "FSDP2 keeping gathered parameters from forward to backward",
             reshard_after_forward=False, shards_params=True),
    Strategy("fsdp2_offload", "fsdp2", "FSDP2 with parameters offloaded to the CPU",
             reshard_after_forward=True, shards_params=True, offload_params=True),
]}

# A strategy may also be a user's own config file: a DeepSpeed JSON or an accelerate config YAML.
USER_CONFIG_SUFFIXES = {".json": "deepspeed", ".yaml": "accelerate", ".yml": "accelerate"}


def is_user_config(strategy: str) -> bool:
    return any(strategy.endswith(s) for s in USER_CONFIG_SUFFIXES)


def check_strategy_name(strategy: str) -> str | None:
    if strategy in CATALOGUE or is_user_config(strategy):
        return None
    return (f"unknown strategy {strategy!r}: use one of {', '.join(CATALOGUE)}, "
            "or the path of your own DeepSpeed JSON (.json) or accelerate config (.yaml)")


def get(strategy: str) -> Strategy:
    """The catalogue entry; a user config file is described by what it contains (see user_configs)."""
    if strategy in CATALOGUE:
        return CATALOGUE[strategy]
    from bench.strategies.user_configs import describe_user_config

    return describe_user_config(strategy)
