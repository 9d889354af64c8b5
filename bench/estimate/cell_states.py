"""A cell's model states per rank: the base model's and the adapter's weights, gradients, optimizer states and
master weights, after the strategy's sharding and offload (bench/estimate/states.py's arithmetic applied to a
cell: its precision policy, optimizer, adapter, and, for QLoRA, the 4-bit packed weights and the constants every
rank keeps). Pure arithmetic: no torch import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.estimate.parallel import shard_ranks
from bench.estimate.states import (NF4_PACKED_BYTES, BytesPerParam, StateBytes, bytes_per_frozen_param,
                                   bytes_per_trainable_param, frozen_states, per_rank_formula, shard_states)
from bench.estimate.terms import sharding_for
from bench.spec import CellSettings
from bench.spec.models import ModelShape
from bench.strategies import Strategy
from bench.strategies.build import upcasts_to_fp32 as qlora_upcasts_to_fp32
from bench.strategies.precision import policy_for


@dataclass(frozen=True)
class ModelStates:
    base: StateBytes
    adapter: StateBytes
    trainable: int  # trained parameters (all, or the adapter's)
    base_bpp: BytesPerParam | None  # None for a frozen base
    adapter_bpp: BytesPerParam | None
    frozen_bpp: float | None


def model_states(cell: CellSettings, shape: ModelShape, strategy: Strategy) -> ModelStates:
    sharding = sharding_for(strategy)
    n, t = shard_ranks(cell, strategy), cell.train
    bpp = bytes_per_trainable_param(policy_for(cell).name, strategy.uses_deepspeed, t.optimizer, t.precision)
    if cell.adapter.type == "none":
        return ModelStates(shard_states(shape.params, bpp, sharding, n), StateBytes(0, 0, 0, 0, 0),
                           shape.params, bpp, None, None)
    adapter_count = shape.lora_params(cell.adapter.r, cell.adapter.target)
    frozen_bpp = bytes_per_frozen_param(cell.adapter.type, t.precision)
    quantized = shape.layers * shape.linear_params_per_layer if cell.adapter.type == "qlora" else 0
    # QLoRA keeps embeddings, head and norms in bf16, except where peft's k-bit recipe upcasts them to fp32
    # (bench/strategies/build.py: not under FSDP, not above 20B parameters).
    kept_dtype = 4 if cell.adapter.type == "qlora" and qlora_upcasts_to_fp32(cell) else \
        bytes_per_frozen_param("lora", t.precision)
    if quantized and not strategy.is_plain:
        # Sharding and offload move the packed 4-bit bytes (the parameter); the quantization constants
        # (absmax ...) are module attributes: every rank keeps all of them on its GPU.
        a = frozen_states(quantized, NF4_PACKED_BYTES, sharding, n)
        a = StateBytes(a.weights + (frozen_bpp - NF4_PACKED_BYTES) * quantized, 0, 0, 0, a.host)
    else:
        a = frozen_states(quantized, frozen_bpp, sharding, n)
    b = frozen_states(shape.params - quantized, kept_dtype, sharding, n)
    base = StateBytes(a.weights + b.weights, 0, 0, 0, a.host + b.host)
    return ModelStates(base, shard_states(adapter_count, bpp, sharding, n), adapter_count, None, bpp, frozen_bpp)


def bytes_per_param_summary(states: ModelStates, strategy: Strategy, ranks: int) -> dict[str, Any]:
    sharding = sharding_for(strategy)
    trained = states.base_bpp or states.adapter_bpp
    out: dict[str, Any] = {"weights": trained.weights, "grads": trained.grads, "master_weights": trained.master,
                           "optimizer": trained.optimizer, "total": trained.total, "ranks": ranks,
                           "per_rank": per_rank_formula(trained, sharding, ranks, strategy.tp),
                           "applies_to": "adapter" if states.adapter_bpp else "all parameters"}
    if strategy.tp > 1:
        out["tensor_split"] = strategy.tp
    if states.frozen_bpp is not None:
        out["frozen_base"] = round(states.frozen_bpp, 4)
    return out
