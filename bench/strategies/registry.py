"""The registry: each strategy name -> its Strategy (bench/strategies/strategy.py), the one place that knows
names. Everything else asks a strategy what it does (``shards_params``, ``dp_shard`` ...).

A strategy is data, not code: the plan renders it into an accelerate config YAML and, for DeepSpeed, a
DeepSpeed JSON, both written into the cell's folder so that a user can reuse them as they are. A strategy may
also be a user's own config file, described by what it holds (bench/strategies/user_configs.py).
"""

from __future__ import annotations

from typing import Callable

from bench.strategies.strategy import FAMILY_DEGREES, FSDP1_SHARDING, Strategy

CATALOGUE: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add a strategy under its name; a name is registered once."""
    if strategy.name in CATALOGUE:
        raise ValueError(f"strategy {strategy.name!r} is registered already")
    CATALOGUE[strategy.name] = strategy
    return strategy


def names() -> list[str]:
    return list(CATALOGUE)


def families(question: Callable[[Strategy], bool]) -> tuple[str, ...]:
    """The record family labels of the registered strategies that answer yes, e.g. ``families(lambda s:
    s.is_plain)``: for code that groups records, which carry the label, not the strategy."""
    return tuple(dict.fromkeys(s.family for s in CATALOGUE.values() if question(s)))


def _zero(name: str, stage: int, summary: str, **kw) -> Strategy:
    return Strategy(name, "deepspeed", summary, shard_level=stage, **kw)


def _fsdp(name: str, sharding: str, summary: str, **kw) -> Strategy:
    level, scope = FSDP1_SHARDING[sharding]
    return Strategy(name, "fsdp1", summary, shard_level=level, shard_scope=scope, **kw)


for _s in [
    Strategy("single", "torch", "one process, no distributed wrapper (what a user runs today)", single_process=True),
    Strategy("ddp", "torch", "PyTorch DistributedDataParallel: full replica per rank, gradients all-reduced"),
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
             shard_level=3, reshard_after_forward=True),
    Strategy("fsdp2_no_reshard", "fsdp2", "FSDP2 keeping gathered parameters from forward to backward",
             shard_level=3, reshard_after_forward=False),
    Strategy("fsdp2_offload", "fsdp2", "FSDP2 with parameters offloaded to the CPU",
             shard_level=3, reshard_after_forward=True, offload_params=True),
    # Tensor parallelism alone: the cell's tp is its world; each rank holds a slice of every layer and no data
    # parallel wrapper runs (accelerate refuses FSDP2 with nothing left to shard over: dp_shard 1, cp 1).
    Strategy("tp", "torch", "tensor parallelism alone: each rank holds a slice of every layer, one batch for all",
             tensor_only=True),
]:
    register(_s)

# A strategy may also be a user's own config file: a DeepSpeed JSON or an accelerate config YAML.
USER_CONFIG_SUFFIXES = {".json": "deepspeed", ".yaml": "accelerate", ".yml": "accelerate"}


def is_user_config(strategy: str) -> bool:
    return any(strategy.endswith(s) for s in USER_CONFIG_SUFFIXES)


def check_strategy_name(strategy: str) -> str | None:
    if strategy in CATALOGUE or is_user_config(strategy):
        return None
    return (f"unknown strategy {strategy!r}: use one of {', '.join(CATALOGUE)}, "
            "or the path of your own DeepSpeed JSON (.json) or accelerate config (.yaml)")


def for_cell(cell) -> Strategy:
    """The cell's strategy at the cell's tensor and context degrees (settings ``tp``, ``cp``)."""
    return get(cell.strategy).with_degrees(getattr(cell, "tp", 1), getattr(cell, "cp", 1))


def get(strategy: str) -> Strategy:
    """The registered strategy; a user config file is described by what it contains (see user_configs)."""
    if strategy in CATALOGUE:
        return CATALOGUE[strategy]
    from bench.strategies.user_configs import describe_user_config

    return describe_user_config(strategy)


def of_record(strategy: str, info: dict | None) -> Strategy | None:
    """The strategy a record ran, as it was then: rebuilt from the degrees the record kept
    (``strategy_info.degrees``), else looked up by name (the catalogue, or a user's config still readable),
    else, for an older record whose config is gone, from its family label: framework and whether one process
    ran without a wrapper are known, sharding and offload are not (left at none). None if nothing says."""
    info = info or {}
    if info.get("degrees"):
        return Strategy.from_degrees(strategy, info.get("summary", ""), info["degrees"])
    try:
        return get(strategy)
    except Exception:  # noqa: BLE001 - an unreadable or vanished user config: the record's label may still say
        if info.get("family") not in FAMILY_DEGREES:
            return None
        framework, alone = FAMILY_DEGREES[info["family"]]
        return Strategy(strategy, framework, info.get("summary", ""), single_process=alone)
