"""Precision policy: which dtype the weights are stored in and how compute is done.

It changes speed and memory as much as the strategy does, so every record states it:
- ``autocast``: fp32 weights (the master copy), bf16/fp16 compute under autocast (accelerate DDP, single).
- ``fsdp-mixed``: fp32 sharded weights; FSDP casts parameters to bf16/fp16 for forward and backward and
  reduces gradients in that dtype (accelerate's FSDP1 MixedPrecision / FSDP2 MixedPrecisionPolicy).
- ``pure``: weights stored in bf16/fp16, fp32 master copy inside the optimizer (DeepSpeed's bf16/fp16 mode).
- ``frozen-base``: LoRA/QLoRA: base weights frozen in bf16 (or 4-bit), fp32 adapter, autocast compute.
- ``fp32``: everything in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.spec import CellSettings
from bench.strategies import registry as strategies


@dataclass(frozen=True)
class PrecisionPolicy:
    name: str
    weight_dtype: str  # dtype the model is built in: "float32" | "bfloat16" | "float16"
    compute_dtype: str
    master_weights_fp32: bool
    description: str


def policy_for(cell: CellSettings) -> PrecisionPolicy:
    half = {"bf16": "bfloat16", "fp16": "float16"}.get(cell.train.precision)
    if half is None:
        return PrecisionPolicy("fp32", "float32", "float32", True, "fp32 weights, gradients and compute")
    strategy = strategies.get(cell.strategy)  # a user's own config is described by what it contains
    if strategy.uses_deepspeed:
        return PrecisionPolicy("pure", half, half, True,
                               f"DeepSpeed {cell.train.precision}: {half} weights and gradients, fp32 master copy in the optimizer")
    if cell.adapter.type != "none":
        base = "4-bit NF4" if cell.adapter.type == "qlora" else half
        return PrecisionPolicy("frozen-base", half, half, False,
                               f"frozen {base} base weights, fp32 adapter weights, {half} autocast compute")
    if strategy.is_fsdp:
        return PrecisionPolicy("fsdp-mixed", "float32", half, True,
                               f"fp32 sharded weights and optimizer; FSDP casts parameters to {half} for compute "
                               f"and reduces gradients in {half}")
    return PrecisionPolicy("autocast", "float32", half, True,
                           f"fp32 weights and optimizer, {half} autocast compute")
