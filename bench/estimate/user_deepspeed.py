"""What a DeepSpeed config says beyond the strategy's degrees that moves memory: ``overlap_comm``.

DeepSpeed runs ZeRO-3's parameter gathers (DeepSpeedZeRoOffload.__allgather_stream, parameter_offload.py) and its
gradient reduce-and-partition (DeepSpeedZeroOptimizer_Stage3.reduce_and_partition_stream, stage3.py) on streams of
their own only with ``overlap_comm``; without it both are the default stream, where compute reuses their blocks:
the caching allocator keeps no side-stream pools (bench/estimate/allocator.py). ZeRO-1/2 double their reduce
bucket (stage_1_and_2's ipg buffers) only with it too. bench's own JSONs set it (bench/strategies/render.py); a
user's file may not: its value, else DeepSpeed's default (ZeroConfig.overlap_comm_valid: on at stage 3 only).
Two of the corpus's ZeRO-3 offload files differ in it alone of what moves memory (llamafactory's
ds_z3_offload_config.json false, LLaVA's zero3_offload.json true: 16.40 and 19.47 GiB reserved, the same allocated).
"""

from __future__ import annotations

from bench.spec import CellSettings, MatrixError
from bench.strategies import Strategy, is_user_config


def zero_settings(cell: CellSettings) -> dict:
    """The ``zero_optimization`` block of a user's DeepSpeed config as written; empty for a catalogue strategy or a
    file that cannot be read (the estimate then takes bench's own settings)."""
    from bench.strategies.user_configs import deepspeed_config_as_written

    try:
        ds = deepspeed_config_as_written(cell.strategy)
    except MatrixError:
        return {}
    zero = (ds or {}).get("zero_optimization")
    return zero if isinstance(zero, dict) else {}


def overlaps_comm(cell: CellSettings, strategy: Strategy) -> bool:
    """Whether DeepSpeed overlaps communication with compute on side streams (always in bench's own configs)."""
    if not strategy.uses_deepspeed or not is_user_config(cell.strategy):
        return strategy.uses_deepspeed
    value = zero_settings(cell).get("overlap_comm")
    if isinstance(value, str):  # "auto" is dropped for DeepSpeed's default, as the launch resolves it (issue 18)
        value = {"true": True, "false": False}.get(value.strip().lower())
    return strategy.shard_level == 3 if value is None else bool(value)
