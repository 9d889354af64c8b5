"""FSDP1 with parameter offload: the blocks its initialisation leaves in the caching allocator, and how much
of them is still free when training peaks (torch reserved, not allocated).

FSDP1 builds a unit's FlatParameter on the GPU even when the parameters end on the host
(torch/distributed/fsdp/_init_utils.py, _init_param_handle_from_module / _init_param_handle_from_params):

1. ``_move_module_to_device``: a unit whose parameters are on the host (QLoRA's 4-bit model built there,
   bench/worker/qlora.py) is moved to ``device_id`` first; a model built on the GPU is there already;
2. ``FlatParamHandle``: ``flatten_tensors`` concatenates the unit's parameters into one flat tensor (the
   unit's size, U) while the originals are alive;
3. ``FlatParamHandle.shard``: the rank's shard is cloned out of it (U / world) and the flat storage freed;
4. ``flat_param_to(cpu)``: the shard goes to the host, its GPU copy is freed; the originals are freed once
   ``_init_param_handle_from_module`` returns (its ``managed_params`` list holds them until then).

So the largest unit (the root: embeddings, norm and an untied head) leaves segments of U, U and U / world
cached, and free: nothing on the GPU holds the parameters at rest. Training allocates its gathers on
FSDP's unshard and pre-unshard streams (_runtime_utils._unshard), whose pools cannot use those blocks; only
compute-stream tensors that fit can (best fit): the checkpointed layer inputs, the 16-bit logits, the fp32
logits when they are no larger than U. What they do not fill is reserved at the peak and allocated by
nothing. Measured (results/estimate-judge-h200, Llama-3.2-3B QLoRA, 2 ranks): 2.05 GiB reserved after
prepare = 2.5 x the 0.73 GiB root + the layers' and quantisation constants' blocks; 7.22 GiB at the peak,
of which 5.20 allocated: the 3B fp32 logits (0.98 GiB) do not fit a 0.73 GiB block.

The blocks are replayed through the caching-allocator model (bench/estimate/allocator.py): the build and
FSDP's initialisation, then the compute-stream tensors the peak moment holds, in the order they are made.
"""

from __future__ import annotations

from bench.estimate.activations import ActivationBytes
from bench.estimate.allocator import CachingAllocator
from bench.estimate.replay.tensors import layer_params, model_params
from bench.spec import CellSettings
from bench.spec.models import ModelShape
from bench.strategies import Strategy


def applies(cell: CellSettings, strategy: Strategy) -> bool:
    """FSDP1 with parameter offload on CUDA: the FlatParameters are made on the GPU, then offloaded."""
    return cell.device == "cuda" and strategy.fsdp_version == 1 and strategy.offload_params


def shards(cell: CellSettings, strategy: Strategy) -> bool:
    """Whether FlatParamHandle.shard clones a shard: not under NO_SHARD, nor on one rank (FSDP1 runs NO_SHARD)."""
    return strategy.shards_at(cell.gpus)


def _units(shape: ModelShape, layer_bytes: float, root_bytes: float) -> list[tuple[str, list[float]]]:
    """FSDP1's units in initialisation order (auto-wrap is bottom-up: the decoder layers, then the root),
    each with its parameters' sizes in bytes. ``layer_bytes`` / ``root_bytes``: bytes per parameter."""
    layer = [layer_bytes * numel for _, numel in layer_params(shape)]
    root = [root_bytes * numel for name, numel in model_params(shape) if not name.startswith("layers.")]
    return [(f"layer{i}", layer) for i in range(shape.layers)] + [("root", root)]


def init_blocks(mem: CachingAllocator, cell: CellSettings, shape: ModelShape, layer_bytes: float,
                root_bytes: float, on_host: bool, sharded: bool = True) -> None:
    """The build and FSDP1's initialisation (steps 1-4 above) through ``mem``; nothing stays allocated.
    ``on_host``: the model waits on the host (moved to the GPU unit by unit), else it was built on the GPU;
    ``sharded``: a shard is cloned out of the flat parameter (``shards``)."""
    units = _units(shape, layer_bytes, root_bytes)
    if not on_host:
        for unit, sizes in units:
            for i, size in enumerate(sizes):
                mem.malloc(f"{unit}.param{i}", int(size))
    for unit, sizes in units:
        if on_host:
            for i, size in enumerate(sizes):
                mem.malloc(f"{unit}.param{i}", int(size))  # _move_module_to_device
        mem.malloc(f"{unit}.flat", int(sum(sizes)))  # flatten_tensors
        if sharded:
            mem.malloc(f"{unit}.shard", int(sum(sizes) / cell.gpus))  # _get_shard's clone
        mem.free(f"{unit}.flat")
        if sharded:
            mem.free(f"{unit}.shard")  # flat_param_to(cpu)
        mem.free_prefix(f"{unit}.param")  # managed_params released on return


def peak_tensors(cell: CellSettings, shape: ModelShape, acts: ActivationBytes, compute_bytes: int,
                 output_bytes: int, temp_fraction: float, phase: str) -> list[tuple[str, str, float]]:
    """The compute-stream tensors up to the peak ``phase``, as (op, name, bytes): the checkpointed inputs
    (one per layer), then the loss (bench/estimate/replay/base.py's forward and backward: 16-bit logits, their
    fp32 upcast, the log-softmax, the output's logits, the two fp32 gradients), then for the layers' backward
    one recomputed layer and its temporaries."""
    ops: list[tuple[str, str, float]] = [("malloc", f"kept{i}", acts.kept / shape.layers) for i in range(shape.layers)]
    v = cell.train.seq_len * cell.train.micro_batch * shape.vocab
    ops.append(("malloc", "logits", compute_bytes * v))
    if compute_bytes != 4:
        ops.append(("malloc", "logits_fp32", 4 * v))
    ops += [("malloc", "log_softmax", 4 * v), ("free", "logits_fp32", 0)]
    if output_bytes != compute_bytes:  # accelerate's convert_outputs_to_fp32 replaces the output's logits
        ops += [("malloc", "output_logits", 4 * v), ("free", "logits", 0)]
    if phase == "optimizer step":
        return ops + [("free", "log_softmax", 0)]
    ops += [("malloc", "grad_log_softmax", 4 * v), ("malloc", "grad_logits_fp32", 4 * v)]
    if phase != "backward (layers)":
        return ops
    ops += [("free", "grad_log_softmax", 0), ("free", "log_softmax", 0), ("free", "grad_logits_fp32", 0)]
    pieces = 8  # a layer's activations are a handful of tensors (q, k, v, gate, up ...): not one block
    layer = acts.per_layer + acts.layer_temp
    return ops + [("malloc", f"recompute{i}", layer / pieces) for i in range(pieces)]


def free_at_peak(cell: CellSettings, shape: ModelShape, acts: ActivationBytes, layer_bytes: float,
                 root_bytes: float, on_host: bool, sharded: bool, compute_bytes: int, output_bytes: int,
                 temp_fraction: float, phase: str) -> float:
    """Bytes reserved but free at the peak, among the blocks FSDP1's initialisation left and those the
    peak's compute-stream tensors needed beyond them (the 16-bit logits' block included)."""
    mem = CachingAllocator()
    init_blocks(mem, cell, shape, layer_bytes, root_bytes, on_host, sharded)
    for op, name, size in peak_tensors(cell, shape, acts, compute_bytes, output_bytes, temp_fraction, phase):
        if op == "malloc":
            mem.malloc(name, int(size))
        elif mem.live(name):
            mem.free(name)
    mem.complete()
    return float(mem.reserved - mem.allocated)
