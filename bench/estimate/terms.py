"""Terms the additive model (bench/estimate/additive.py) and the allocation replay (bench/estimate/replay/)
both read: which strategy a cell runs, what it shards, and the dtypes its tensors take. Kept apart so that
neither of the two imports the other.
"""

from __future__ import annotations

from bench import strategies
from bench.estimate.states import Sharding
from bench.spec import CellSettings
from bench.strategies import Strategy
from bench.strategies.precision import policy_for


# ---------------------------------------------------------------- strategy -> what is sharded

def describe_strategy(cell: CellSettings) -> Strategy | None:
    """The catalogue entry, or what a user's config file amounts to; None if it cannot be told."""
    try:
        if strategies.is_user_config(cell.strategy):
            return strategies.get(cell.strategy)
        return strategies.for_cell(cell)  # at the cell's tensor and context degrees
    except Exception:  # noqa: BLE001 - a user config we cannot read is estimated as unknown, never fatal
        return None


def sharding_for(strategy: Strategy) -> Sharding:
    if strategy.uses_deepspeed:
        return Sharding.zero(strategy.shard_level, strategy.offload_optimizer, strategy.offload_params)
    if strategy.is_fsdp and strategy.shards:
        # FSDP shards parameters at rest even under SHARD_GRAD_OP; the optimizer then runs where they live.
        offload = strategy.offload_params
        return Sharding(weights=True, grads=True, optimizer=True, optimizer_on_host=offload, weights_on_host=offload)
    return Sharding()


def is_half(cell: CellSettings) -> bool:
    return cell.train.precision in ("bf16", "fp16")


def compute_bytes(cell: CellSettings) -> int:
    return 2 if is_half(cell) else 4


def residual_bytes(cell: CellSettings, strategy: Strategy) -> int:
    """The residual stream follows the weights' dtype: fp32 under autocast unless FSDP casts the params."""
    if strategy.is_fsdp:
        return compute_bytes(cell)
    return {"float32": 4, "bfloat16": 2, "float16": 2}[policy_for(cell).weight_dtype]


def converts_outputs_to_fp32(cell: CellSettings, strategy: Strategy) -> bool:
    """accelerate wraps forward in autocast + convert_outputs_to_fp32 when it runs native AMP (bf16/fp16
    outside DeepSpeed, whose JSON owns precision): the output then holds fp32 logits. Not under FSDP2:
    Accelerator._prepare_fsdp2 never calls prepare_model, where that wrapper is put on (accelerate 1.15);
    FSDP2's MixedPrecisionPolicy casts the parameters and the output keeps the compute dtype."""
    return is_half(cell) and not strategy.uses_deepspeed and strategy.fsdp_version != 2 and cell.device == "cuda"
