"""Model states per rank: parameters, gradients, optimizer states and fp32 master weights.

The accounting is the ZeRO paper's (Rajbhandari et al. 2020, section 3.1): mixed-precision Adam holds
2 bytes of 16-bit weights + 2 bytes of 16-bit gradients + 12 bytes of optimizer state (fp32 master
copy, momentum, variance) per parameter; ZeRO-1 divides the 12 by the number of ranks N, ZeRO-2 the
12 + 2, ZeRO-3 all 16. The bytes per parameter themselves follow the cell's precision policy
(bench/strategies/precision.py) and optimizer, so that autocast DDP (fp32 weights, fp32 gradients, fp32 Adam)
costs 4 + 4 + 8 and adamw_bnb_8bit holds 2 bytes of state instead of 8.

Pure arithmetic: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

# bitsandbytes 8-bit Adam: two uint8 states (m, v) + one fp32 absmax per 256-element block per state.
BNB_8BIT_BLOCK = 256
ADAM_8BIT_BYTES = 2 + 2 * 4 / BNB_8BIT_BLOCK
ADAM_32BIT_BYTES = 8  # fp32 m and v
# QLoRA NF4: 4 bits per weight, one absmax per 64-weight block; with double quantization the absmax is
# itself 8-bit with one fp32 constant per 256 absmax values (Dettmers et al. 2023, section 3).
NF4_BLOCK = 64
NF4_DOUBLE_QUANT_BLOCK = 256
NF4_BYTES = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_DOUBLE_QUANT_BLOCK)
NF4_PACKED_BYTES = 0.5  # the 4-bit weight itself (the parameter); the rest is quantization constants


@dataclass(frozen=True)
class BytesPerParam:
    """Bytes per parameter of each model state, before sharding."""

    weights: float
    grads: float
    master: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.master + self.optimizer


@dataclass(frozen=True)
class Sharding:
    """Which model states are split over the N ranks, and which live on the host."""

    weights: bool = False
    grads: bool = False
    optimizer: bool = False  # optimizer states and master weights together
    optimizer_on_host: bool = False
    weights_on_host: bool = False

    @classmethod
    def zero(cls, stage: int, offload_optimizer: bool = False, offload_params: bool = False) -> "Sharding":
        return cls(weights=stage >= 3, grads=stage >= 2, optimizer=stage >= 1,
                   optimizer_on_host=offload_optimizer, weights_on_host=offload_params)


@dataclass(frozen=True)
class StateBytes:
    """Bytes of one rank's model states on the GPU, plus what it keeps on the host."""

    weights: float
    grads: float
    master: float
    optimizer: float
    host: float

    @property
    def gpu_total(self) -> float:
        return self.weights + self.grads + self.master + self.optimizer


def optimizer_state_bytes(optimizer: str) -> float:
    return ADAM_8BIT_BYTES if optimizer == "adamw_bnb_8bit" else ADAM_32BIT_BYTES


def bytes_per_trainable_param(policy: str, deepspeed: bool, optimizer: str, precision: str) -> BytesPerParam:
    """Weights, gradients, master and optimizer bytes of a trained parameter.

    - autocast / fp32 (accelerate DDP, FSDP): the fp32 weights are the master copy: 4 + 4 + 0 + Adam.
    - DeepSpeed: weights and gradients in the training dtype, and always an fp32 master partition
      (DeepSpeed clones one even in fp32): 2 + 2 + 4 + Adam in bf16/fp16.
    """
    states = optimizer_state_bytes(optimizer)
    half = precision in ("bf16", "fp16")
    if deepspeed:
        w = 2 if half else 4
        return BytesPerParam(weights=w, grads=w, master=4, optimizer=states)
    del policy  # autocast, frozen-base adapters and fp32 all keep fp32 trained weights
    return BytesPerParam(weights=4, grads=4, master=0, optimizer=states)


def bytes_per_frozen_param(adapter: str, precision: str) -> float:
    """A frozen base weight of LoRA (training dtype) or QLoRA (NF4 + quantization constants)."""
    if adapter == "qlora":
        return NF4_BYTES
    return 2 if precision in ("bf16", "fp16") else 4


def shard_states(count: int, bpp: BytesPerParam, sharding: Sharding, ranks: int) -> StateBytes:
    """One rank's share of ``count`` trained parameters: sharded states are divided by the rank count."""
    def share(sharded: bool) -> float:
        return count / ranks if sharded else count

    weights = bpp.weights * share(sharding.weights)
    grads = bpp.grads * share(sharding.grads)
    master = bpp.master * share(sharding.optimizer)
    optimizer = bpp.optimizer * share(sharding.optimizer)
    host = 0.0
    if sharding.optimizer_on_host:
        # ZeRO-Offload keeps the fp32 gradient partition next to the states it updates on the CPU.
        host += master + optimizer + 4 * share(sharding.optimizer)
        master = optimizer = 0.0
        grads = 0.0 if sharding.grads else grads
    if sharding.weights_on_host:
        host += weights
        weights = 0.0
    return StateBytes(weights, grads, master, optimizer, host)


def frozen_states(count: int, bytes_per_param: float, sharding: Sharding, ranks: int) -> StateBytes:
    """Frozen base weights: no gradient, no optimizer state; sharded with the weights."""
    weights = bytes_per_param * (count / ranks if sharding.weights else count)
    if sharding.weights_on_host:
        return StateBytes(0.0, 0.0, 0.0, 0.0, weights)
    return StateBytes(weights, 0.0, 0.0, 0.0, 0.0)


def per_rank_formula(bpp: BytesPerParam, sharding: Sharding, ranks: int, tp: int = 1) -> str:
    """E.g. "2 + 2 + 12/2" for ZeRO-1 bf16 on 2 ranks: the ZeRO paper's notation, computed. A tensor split
    divides every term (each tensor rank holds its slice of the layers, embedding and head; only the norms
    stay whole): "16/tp2" for tp 2 alone, "16/2/tp2" for FSDP2 with tp 2 on 4 ranks."""
    kept, split = 0.0, 0.0
    for size, sharded in ((bpp.weights, sharding.weights), (bpp.grads, sharding.grads),
                          (bpp.master + bpp.optimizer, sharding.optimizer)):
        if sharded and ranks > 1:
            split += size
        else:
            kept += size
    parts = ([f"{kept:.3g}"] if kept else []) + ([f"{split:.3g}/{ranks}"] if split else [])
    formula = " + ".join(parts) or "0"
    if tp > 1:
        formula = (f"({formula})" if len(parts) > 1 else formula) + f"/tp{tp}"
    return formula
