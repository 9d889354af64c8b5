"""FSDP1 with parameter offload: the segments its side streams reserve, which the compute stream cannot use.

The caching allocator keeps one pool per stream (bench/estimate/allocator.py): a block freed on FSDP's
post-backward or pre-unshard stream is never handed to an allocation of the compute stream, so whatever those
pools reserved adds to torch reserved on top of the compute stream's peak, while none of it (or, in the layers'
backward, part of it) is allocated when the compute stream peaks. Two such pools, read from torch 2.11
(torch/distributed/fsdp/_runtime_utils.py, _flat_param.py) under accelerate's FSDP1 mixed precision
(param_dtype = reduce_dtype = the training dtype, accelerate/utils/dataclasses.py set_mixed_precision):

1. The sharded gradients (``post_backward_stream``). ``_post_backward_hook`` runs, on the post-backward stream,
   ``_reduce_grad``: the unit's reduce-scatter output is a new 16-bit shard (``_get_reduce_scatter_tensors``,
   ``torch.empty_like(chunk)``), which ``_cast_grad_to_param_dtype`` upcasts to the flat parameter's dtype
   (fp32 when the weights are fp32 and compute is bf16), the 16-bit shard then freed; ``_accumulate_sharded_grad``
   keeps the result as ``flat_param._saved_grad_shard``, and ``_offload_grad`` only *copies* it to the pinned
   host gradient (non_blocking). It is dropped by ``prepare_gradient_for_optim`` in the final callback, at the
   end of the backward: every trained unit's shard is alive at once, so that pool grows to the whole rank's
   gradient in the flat parameters' dtype (3B full fine-tune, 2 ranks: 4 B x 3.2e9 / 2 = 6 GiB). Only units
   with trained parameters have a gradient: under LoRA/QLoRA the frozen base's units (peft's wrap policy gives
   each adapter Linear its own unit, bench/worker/train.py) reduce nothing, and the adapters' pool is a few
   hundred MiB. NO_SHARD (one rank) all-reduces in place and upcasts the whole unit's gradient.
2. The cast of the offloaded shard (``pre_unshard_stream``), where the flat parameter's dtype is not the compute
   dtype (fp32 weights, bf16 compute): ``FlatParamHandle._use_low_precision_shard`` allocates the 16-bit
   ``_mp_shard`` and copies into it ``_local_shard.to(device)``, a GPU temporary of the fp32 host shard; the
   temporary is freed at once, the 16-bit shard after the all-gather (``post_unshard``). The root (the
   embedding) makes the largest pair, and every layer's fits in its blocks. Without a cast (LoRA's and
   QLoRA's 16-bit base) ``flat_param_to(device)`` copies the shard instead: the root's copy is counted as
   allocated (additive.backward_buffers' ``fsdp_offloaded_shard_copy``), the rest is in the allocator slack.

Each pool is replayed through the caching-allocator model in the order FSDP makes its tensors; what it holds
reserved beyond what is allocated when the forward ends (NO_SHARD's unsharded 16-bit root) is the term.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.estimate.allocator import CachingAllocator
from bench.estimate.replay.tensors import backward_order, layer_params, root_params
from bench.spec import CellSettings
from bench.spec.models import ModelShape
from bench.strategies import Strategy

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Unit:
    """One FSDP1 unit: its FlatParameter's elements, their dtype's bytes, and whether they are trained."""

    name: str
    numel: int
    param_bytes: int
    trained: bool


def applies(cell: CellSettings, strategy: Strategy) -> bool:
    """FSDP1 with parameter offload on CUDA."""
    return cell.device == "cuda" and strategy.fsdp_version == 1 and strategy.offload_params


def units(cell: CellSettings, shape: ModelShape, base_bytes: int, adapter_bytes: int) -> list[Unit]:
    """FSDP1's units in backward order (the last layer's first, the root last). Full fine-tuning: the decoder
    layers and the root, all trained. LoRA/QLoRA: the frozen layers and root, and each adapter Linear apart
    (lora_B before lora_A: the backward reaches B first). ``base_bytes``/``adapter_bytes``: bytes per element
    of the base's and the adapters' flat parameters."""
    layer = sum(k for _, k in layer_params(shape))
    root = sum(k for _, k in root_params(shape))
    adapted = cell.adapter.type != "none"
    shapes = dict(zip(_LINEARS, shape.layer_linear_shapes))
    target = set(_LINEARS if cell.adapter.target == "all-linear" else cell.adapter.target)
    out: list[Unit] = []
    for i in reversed(range(shape.layers)):
        if adapted:
            r = cell.adapter.r
            for name, _ in backward_order(layer_params(shape)):
                if name in target:
                    fan_in, fan_out = shapes[name]
                    out += [Unit(f"layer{i}.{name}.lora_B", fan_out * r, adapter_bytes, True),
                            Unit(f"layer{i}.{name}.lora_A", r * fan_in, adapter_bytes, True)]
        out.append(Unit(f"layer{i}", layer, base_bytes, not adapted))
    return out + [Unit("root", root, base_bytes, not adapted)]


def grad_pool_bytes(unit_list: list[Unit], ranks: int, sharded: bool, reduce_bytes: int) -> float:
    """Bytes the post-backward stream's pool reserves by the end of the backward (mechanism 1 above):
    per trained unit, the 16-bit reduce-scatter output, its upcast to the flat parameter's dtype (kept: the
    ``_saved_grad_shard``), the 16-bit shard freed. NO_SHARD: the whole unit's upcast (its 16-bit gradient is
    the compute stream's)."""
    mem = CachingAllocator()
    split = ranks if sharded else 1
    for u in (u for u in unit_list if u.trained):
        shard = -(-u.numel // split)  # FlatParamHandle pads the flat parameter to a multiple of the ranks
        if sharded:
            mem.malloc(f"rs_out:{u.name}", reduce_bytes * shard, "post_backward")
        if u.param_bytes != reduce_bytes:
            mem.malloc(f"saved:{u.name}", u.param_bytes * shard, "post_backward")
            if sharded:
                mem.free(f"rs_out:{u.name}")
    return float(mem.reserved)


def cast_pool_bytes(unit_list: list[Unit], ranks: int, sharded: bool, compute: int) -> float:
    """Bytes the pre-unshard stream's pool reserves and holds free once the forward has ended (mechanism 2):
    per unit whose flat parameter is not in the compute dtype, in forward order (the root first), the 16-bit
    shard, then the GPU copy of the host shard, freed after the cast; the 16-bit shard freed after the
    all-gather, or (NO_SHARD, where it is the unsharded parameter) at the unit's reshard, never for the root."""
    mem = CachingAllocator()
    split = ranks if sharded else 1
    for u in [unit_list[-1], *unit_list[:-1][::-1]]:
        if u.param_bytes == compute:
            continue
        shard = -(-u.numel // split)
        mem.malloc(f"mp_shard:{u.name}", compute * shard, "pre_unshard")
        mem.malloc(f"host_copy:{u.name}", u.param_bytes * shard, "pre_unshard")
        mem.free(f"host_copy:{u.name}")
        if sharded or u.name != "root":
            mem.free(f"mp_shard:{u.name}")
    return float(mem.reserved - mem.allocated)


def side_stream_pools(cell: CellSettings, shape: ModelShape, sharded: bool, base_bytes: int, adapter_bytes: int,
                      compute: int) -> dict[str, float]:
    """The two terms, by name, for additive.reserved_only_blocks. ``compute``: the mixed-precision dtype's bytes
    (param_dtype and reduce_dtype; the flat parameters' own dtype when accelerate runs without one, fp32)."""
    unit_list = units(cell, shape, base_bytes, adapter_bytes)
    return {"fsdp_offload_grad_stream_pool": grad_pool_bytes(unit_list, cell.gpus, sharded, compute),
            "fsdp_offload_cast_stream_pool": cast_pool_bytes(unit_list, cell.gpus, sharded, compute)}
