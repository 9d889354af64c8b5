"""Predict a cell's peak GPU memory per rank before launching it, and decide whether to launch at all.

``predict(cell)`` is a pure function of the cell's settings (no torch): model states from
bench/estimate/states.py (ZeRO accounting, bytes per parameter from the precision policy and the
optimizer), activations from bench/estimate/activations.py, and the framework's own buffers (DDP
gradient buckets, DeepSpeed reduce buckets and ZeRO-3 prefetch, FSDP gathered units, autocast weight
copies (QLoRA's fp32-upcast LM head under ddp included), optimizer-step temporaries). The peak is taken
over the three moments that can hold it: the loss's backward (the logits peak), the layers' backward
(one recomputed layer, ZeRO-1/2 reduce buckets, gradients arriving) and the optimizer step (all
gradients plus the step's temporaries).

Torch reserved: for full fine-tuning on CUDA (catalogue strategies; of the offloads ZeRO-1/2's optimizer and
FSDP2's CPU offload), both peaks come from replaying the cell's allocations through a model of the caching
allocator (bench/estimate/replay/, bench/estimate/allocator.py: segment sizes, best fit, per-stream pools, the
first step's states landing in the activations' blocks); the formula's moment at the replay's peak phase gives
the breakdown, the overhead the rest. Elsewhere (adapters, offload, users' configs) reserved is the additive
model: the allocated peak plus named free blocks (reserved_only_blocks) plus allocator_slack, a fraction chosen
by hand (no fit). Judged by `bench estimate-check` (bench/estimate/protocol.py, results/ESTIMATOR.md).

``predicted_oom(prediction)`` is the pre-flight decision: a cell whose requirement exceeds its capacity
by more than the skip margin is recorded as ``predicted_oom`` without launching (``bench run --force``
launches it anyway); it "fits" only with the fit margin to spare. Both margins come per framework from the
measured out-of-sample errors (bench/estimate/margins.py). Every record stores its prediction
(``prediction_dict``) with ``ESTIMATOR_VERSION``; the schema is versioned apart (``PREDICTION_VERSION``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from bench.estimate import offload_blocks, offload_streams
from bench.estimate.activations import LORA_TARGET_INPUTS, ActivationBytes, activation_bytes, lora_input_width
from bench.estimate.cell_states import ModelStates, bytes_per_param_summary, model_states
from bench.estimate.parallel import rank_seq_len, rank_shape, shard_ranks
from bench.estimate.prediction import (CALIBRATION, COMPONENTS, ESTIMATOR_VERSION, GIB, Calibration, Prediction, margins_for,
                                       with_capacity)
from bench.estimate.replay import offload_copy_in_pool, replay
from bench.estimate.replay.tensors import ring_attention_backward, ring_attention_forward
from bench.estimate.states import NF4_PACKED_BYTES
from bench.estimate.user_deepspeed import overlaps_comm
from bench.estimate.terms import compute_bytes, converts_outputs_to_fp32, describe_strategy, is_half, residual_bytes, sharding_for
from bench.spec import CellSettings
from bench.spec.models import ModelShape
from bench.strategies import Strategy, is_user_config
from bench.strategies.constants import DEEPSPEED
from bench.strategies.build import builds_on_host as qlora_builds_on_host, builds_on_meta
from bench.strategies.build import upcasts_to_fp32 as qlora_upcasts_to_fp32
from bench.strategies.precision import policy_for


@dataclass
class _Parts:
    """Bytes of one rank at one moment, by component, and the buffers that make up the overhead."""

    components: dict[str, float]
    buffers: dict[str, float] = field(default_factory=dict)

    @property
    def allocated(self) -> float:
        return sum(self.components.values()) + sum(self.buffers.values())


def activations_for(cell: CellSettings, shape: ModelShape, strategy: Strategy, calib: Calibration) -> ActivationBytes:
    dropout_width = rank_width = 0
    if cell.adapter.type != "none":
        width = lora_input_width(shape, cell.adapter.target)
        targets = 7 if cell.adapter.target == "all-linear" else len(cell.adapter.target)
        dropout_width = width if cell.adapter.dropout > 0 else 0
        rank_width = targets * cell.adapter.r
    # ZeRO-3's zero.Init replaces F.linear with its own autograd function (memory_efficient_linear), which
    # saves the input whether or not the weight is trained: frozen linears keep their inputs there. (QLoRA
    # builds without zero.Init: bench/worker/qlora.py.)
    zero3 = strategy.uses_deepspeed and strategy.shards_params and cell.adapter.type != "qlora"
    targets = frozenset()
    if cell.adapter.type != "none":
        targets = frozenset(LORA_TARGET_INPUTS if cell.adapter.target == "all-linear" else cell.adapter.target)
    return activation_bytes(shape, rank_seq_len(cell, strategy), cell.train.micro_batch, compute_bytes(cell),
                            residual_bytes(cell, strategy), cell.train.grad_checkpointing,
                            calib.backward_temp_fraction, dropout_width, rank_width,
                            4 if converts_outputs_to_fp32(cell, strategy) else None,
                            frozen_base=cell.adapter.type != "none" and not zero3, lora_targets=targets,
                            fused_loss=cell.train.kernels == "liger", **_lora_inputs(cell, shape, strategy, targets))


def _lora_inputs(cell: CellSettings, shape: ModelShape, strategy: Strategy, targets: frozenset[str]) -> dict:
    """The widest input a LoRA adapter takes, and whether peft casts it to fp32 first (the adapters stay fp32
    under autocast; FSDP casts them to the compute dtype, DeepSpeed stores them in it)."""
    widths = {"h": shape.hidden, "q": shape.heads * shape.head_dim, "I": shape.intermediate}
    widest = max((widths[LORA_TARGET_INPUTS[t]] for t in targets), default=0)
    fp32 = policy_for(cell).name == "frozen-base" and not strategy.is_fsdp and is_half(cell)
    return {"lora_widest_input": widest, "fp32_adapter_inputs": fp32}


def _unit_params(shape: ModelShape) -> tuple[int, int]:
    """(one decoder layer, the root unit: embeddings + head + final norm), in parameters."""
    layer = shape.linear_params_per_layer + shape.norm_params_per_layer
    return layer, shape.embedding_params + shape.lm_head_params + shape.hidden


def _gathered_weight_bytes(cell: CellSettings, states: ModelStates) -> float:
    """Bytes per parameter of a gathered (unsharded) decoder-layer weight: the compute dtype, or the packed
    4-bit bytes for QLoRA's base."""
    if states.frozen_bpp is not None and cell.adapter.type == "qlora":
        return NF4_PACKED_BYTES
    return compute_bytes(cell)


def _built_model_bytes(cell: CellSettings, shape: ModelShape, states: ModelStates) -> float:
    """The whole model as built on one GPU: QLoRA's 4-bit linears plus its bf16 embeddings, head and norms."""
    if cell.adapter.type == "qlora":
        quantized = shape.layers * shape.linear_params_per_layer
        return states.frozen_bpp * quantized + compute_bytes(cell) * (shape.params - quantized)
    return _built_weight_bytes(cell, states) * shape.params


def _built_weight_bytes(cell: CellSettings, states: ModelStates) -> float:
    """Bytes per parameter of the model as built on the GPU (before any strategy re-lays it out)."""
    if states.frozen_bpp is not None:
        return states.frozen_bpp
    return {"float32": 4, "bfloat16": 2, "float16": 2}[policy_for(cell).weight_dtype]


def _root_weight_bytes(cell: CellSettings, states: ModelStates) -> float:
    """Bytes per parameter of the root unit's weights at rest (embeddings, norm, head): QLoRA keeps them in the
    16-bit compute dtype (bench/worker/qlora.py), else they are built like the rest of the model."""
    return compute_bytes(cell) if cell.adapter.type == "qlora" else _built_weight_bytes(cell, states)


def _zero3_gathered(cell: CellSettings, shape: ModelShape, states: ModelStates) -> float:
    """ZeRO-3's gathered working set: parameters are kept gathered while their reuse distance is under
    stage3_max_reuse_distance, and the backward reuses the last layers right after the forward, so the live
    set fills up to stage3_max_live_parameters (1e9 by default; the prefetch bucket is within it). On one
    rank the partition is the whole parameter and nothing is gathered."""
    if cell.gpus == 1:
        return 0.0
    return _gathered_weight_bytes(cell, states) * min(shape.params, DEEPSPEED.stage3_max_live_parameters)


def backward_buffers(cell: CellSettings, shape: ModelShape, strategy: Strategy, states: ModelStates,
                     calib: Calibration, moment: str = "layers") -> dict[str, float]:
    """Framework buffers alive during backward, by name (bytes, one rank).

    ``moment`` "loss": the loss's backward (the logits peak), before any parameter gradient exists;
    "layers": the decoder layers' backward (recomputed under checkpointing), gradients arriving.
    """
    out: dict[str, float] = {}
    policy = policy_for(cell)
    trained_bpp = states.base_bpp or states.adapter_bpp
    grad_bytes = trained_bpp.grads
    layer, root = _unit_params(shape)
    if policy.name == "autocast" and strategy.is_plain:
        # autocast caches a bf16 copy of every fp32 weight it casts; linears save it for backward. Under
        # (non-reentrant) checkpointing nothing is saved and the cache is cleared when the forward's autocast
        # exits, before the loss's backward; the recompute casts one layer's weights, saved until its backward.
        layers_with_copies = shape.layers
        if cell.train.grad_checkpointing:
            layers_with_copies = 1 if moment == "layers" else 0
        out["autocast_weight_copies"] = compute_bytes(cell) * layers_with_copies * shape.linear_params_per_layer
    if moment == "loss" and policy.name == "autocast" and strategy.is_plain:
        # The LM head is not checkpointed: autograd saves autocast's 16-bit copy of its fp32 weight for the
        # head's backward, right after the loss's.
        out["autocast_head_copy"] = compute_bytes(cell) * shape.vocab * shape.hidden
    if moment == "loss" and cell.adapter.type == "qlora" and qlora_upcasts_to_fp32(cell) \
            and converts_outputs_to_fp32(cell, strategy):
        # peft's k-bit recipe made the LM head fp32; under autocast its matmul runs on a half-precision copy
        # of the weight, which autograd saves (the hidden states need their gradient) until the head's
        # backward, right after the loss's. A frozen weight is not in autocast's cache, so only until then.
        out["autocast_head_copy"] = compute_bytes(cell) * shape.vocab * shape.hidden
    if strategy.cp > 1 and moment == "layers":  # context parallelism's ring attention in one layer's recompute or
        # backward (the larger): full-length K/V gathered, fp32 merges and accumulators (replay/tensors.py)
        tokens = rank_seq_len(cell, strategy) * cell.train.micro_batch
        out["cp_ring_attention"] = max(sum(b for _, b in ring(shape, tokens, strategy.cp, compute_bytes(cell)))
                                       for ring in (ring_attention_forward, ring_attention_backward))
    if strategy.uses_ddp(cell.gpus):
        # gradient_as_bucket_view=False (the default): the buckets are a second copy of the gradients,
        # allocated when the Reducer is built.
        out["ddp_buckets"] = grad_bytes * states.trainable
    if strategy.uses_deepspeed:
        if strategy.shards_params:
            # ZeRO-3 allocates its reduce bucket when the optimizer is built: alive all along.
            out["zero_reduce_buckets"] = DEEPSPEED.reduce_bucket_size * grad_bytes
            out["zero3_gathered_params"] = _zero3_gathered(cell, shape, states)
        elif moment == "layers":
            # ZeRO-1/2 allocate their (double, with overlap_comm) reduce bucket at the first gradient
            # hook, after the loss's backward: whole, whatever the model size.
            buffers = calib.ds_overlap_buffers if overlaps_comm(cell, strategy) else 1
            out["zero_reduce_buckets"] = buffers * DEEPSPEED.reduce_bucket_size * grad_bytes
    if strategy.is_fsdp and strategy.shards_grads and shard_ranks(cell, strategy) > 1:  # FSDP1 on one rank: NO_SHARD
        w, w_root = _gathered_weight_bytes(cell, states), compute_bytes(cell)
        resharded = strategy.reshards_after_forward
        # Resharding units hold the root (not resharded) plus, in the layers' backward, the current and
        # the prefetched layer; at the loss only the root (the head) is gathered.
        layers_gathered = (0 if moment == "loss" else 2) if resharded else shape.layers
        out["fsdp_gathered_params"] = w_root * root + w * min(shape.layers, layers_gathered) * layer
        if strategy.offload_params and strategy.fsdp_version == 1 and _root_weight_bytes(cell, states) == w_root:
            # FSDP1 parameter offload: a gathered unit's shard is copied to the GPU and stays while the unit is
            # unsharded (the root all along): FlatParamHandle.pre_unshard's flat_param_to(device); not where it
            # is cast (_use_low_precision_shard's 16-bit _mp_shard, freed by post_unshard). FSDP2: its copy-in pool.
            out["fsdp_offloaded_shard_copy"] = w_root * root / cell.gpus
        if states.base_bpp is not None and moment == "layers":
            out["fsdp_unsharded_grads"] = compute_bytes(cell) * (layer + shape.lm_head_params)
    if strategy.fsdp_version == 1 and not strategy.shards_at(cell.gpus) and is_half(cell) \
            and states.base_bpp is not None:
        # NO_SHARD's low-precision copy of a unit is made when the unit is used and freed at its reshard
        # (FlatParamHandle.post_reshard), after its forward and after its backward: the root and, in the
        # layers' backward, the current and the prefetched layer.
        out["fsdp_low_precision_params"] = compute_bytes(cell) * (root + (2 * layer if moment == "layers" else 0))
    return out


def reserved_only_blocks(cell: CellSettings, shape: ModelShape, strategy: Strategy, states: ModelStates,
                         acts: ActivationBytes, phase: str, on_meta: bool = False,
                         calib: Calibration = CALIBRATION) -> dict[str, float]:
    """Blocks the caching allocator holds (torch reserved) but that are free at the peak, by name.

    - ``released_build_blocks``: the model is built on the GPU one tensor per parameter; a strategy that
      copies the parameters into flat buffers (FSDP1's FlatParameters, ZeRO-1/2's flat 16-bit groups)
      frees those per-parameter segments, which stay cached and are too small for the large tensors of
      training (logits, gathered units). Under FSDP1 the sharded layer units are allocated while the
      originals are still alive, except where a layer's shard fits into a freed weight segment (the
      largest linear of the layer), in which case those segments are reused by the shards. ZeRO-3 builds
      the model partitioned on the host (zero.Init) and DDP uses the parameters in place: nothing freed.
      A model built on meta (``on_meta``: FSDP, bench/worker/meta_init.py) never exists whole on the GPU: nothing.
    - ``cached_half_logits``: under accelerate's autocast wrapper the output's bf16 logits are replaced by
      an fp32 copy; their segment stays cached, free, and smaller than the fp32 tensors of the loss.
    - ``fsdp_offload_init_blocks``: FSDP1 with parameter offload made each FlatParameter on the GPU before
      sending its shard to the host; what its root unit's blocks (and the loss's own) hold free at the peak,
      replayed through the allocator model (bench/estimate/offload_blocks.py). Replaces the two above.
    - ``fsdp_offload_grad_stream_pool`` / ``fsdp_offload_cast_stream_pool``: the same strategy's post-backward
      stream keeps every trained unit's sharded gradient until the backward ends, and its pre-unshard stream
      casts the offloaded fp32 shards through a GPU copy: pools compute cannot use (bench/estimate/offload_streams.py).
    - ``fsdp2_offload_copy_in_pool``: FSDP2 + CPU offload copies each shard to the GPU on its copy-in stream.
    - ``zero3_gather_stream_pool`` / ``zero3_reduce_stream_pool``: ZeRO-3 (n > 1) gathers parameters and
      reduce-scatters gradients on their own streams; the caching allocator keeps per-stream pools, so the
      gathered working set's and the reduce bucket's segments are not reusable by compute.
    """
    out: dict[str, float] = {}
    n = shard_ranks(cell, strategy)
    built = _built_weight_bytes(cell, states)
    if offload_blocks.applies(cell, strategy) and phase != "build":
        # FSDP1's parameter offload makes each FlatParameter on the GPU before sending its shard to the host:
        # the largest unit leaves U + U + U/world cached, of which the peak's compute-stream tensors fill
        # what fits (bench/estimate/offload_blocks.py); the 16-bit logits' block is among them.
        on_host = qlora_builds_on_host(cell)
        layer_bytes = NF4_PACKED_BYTES if cell.adapter.type == "qlora" else built
        root_bytes = _root_weight_bytes(cell, states)
        out["fsdp_offload_init_blocks"] = offload_blocks.free_at_peak(
            cell, shape, acts, layer_bytes, root_bytes, on_host, offload_blocks.shards(cell, strategy), compute_bytes(cell),
            4 if converts_outputs_to_fp32(cell, strategy) else compute_bytes(cell), calib.backward_temp_fraction,
            phase)
        # Its post-backward and pre-unshard streams keep their own pools: the sharded gradients, kept until the
        # backward ends, and the cast copies of the offloaded fp32 shards (bench/estimate/offload_streams.py).
        adapter_bytes = compute_bytes(cell) if cell.adapter.type == "qlora" else 4
        out.update(offload_streams.side_stream_pools(
            cell, shape, offload_blocks.shards(cell, strategy), int(root_bytes), adapter_bytes, compute_bytes(cell)))
        return {k: v for k, v in out.items() if v}
    if qlora_builds_on_host(cell):
        # Each layer is materialised in bf16 on the GPU, quantised, and sent to the host: what stays cached
        # is one bf16 layer's segments.
        layer, _ = _unit_params(shape)
        out["released_build_blocks"] = compute_bytes(cell) * layer
    elif phase == "build":
        pass  # nothing is released yet while the model is being built
    elif cell.adapter.type == "qlora" and (strategy.is_fsdp or (strategy.uses_deepspeed and strategy.shards_params)):
        # The whole 4-bit model is built on every GPU and then sharded (FSDP) or partitioned (ZeRO-3 cannot
        # zero.Init a model built layer by layer into 4-bit): the built tensors' segments stay cached.
        out["released_build_blocks"] = _built_model_bytes(cell, shape, states)
    elif on_meta:
        # Each FSDP unit is materialised, sharded and freed in turn: the next unit and training's tensors reuse
        # those blocks (Llama-3.1-8B LoRA, FSDP1, 2 ranks: 0.9 GiB cached after prepare, results/llama8b-meta-h200).
        pass
    elif strategy.fsdp_version == 1:
        released = built * shape.params
        layer, _ = _unit_params(shape)
        largest_linear = max(i * o for i, o in shape.layer_linear_shapes)
        if strategy.shards_at(n) and layer / n <= largest_linear:
            released -= built * shape.layers * layer / n
        out["released_build_blocks"] = released
    elif strategy.fsdp_version == 2 and strategy.offload_params:
        # CPUOffloadPolicy: every shard goes to the host (nothing refills the built model's segments) and comes
        # back through the copy-in stream's pool (bench/estimate/replay/fsdp2.py replays full fine-tuning).
        out["released_build_blocks"] = built * shape.params
        out["fsdp2_offload_copy_in_pool"] = offload_copy_in_pool(cell, shape, strategy, int(built))
    elif strategy.fsdp_version == 2 and n > 1:
        # accelerate's fsdp2_prepare_model holds the built model's state_dict (original_sd) through fully_shard,
        # so every shard is made while all the built tensors live: none refills their segments, all cached free
        # (a user's FSDP2 YAML built on the GPU, Llama-3.2-1B x2: 7.41 GiB reserved after prepare, 2.30 allocated)
        out["released_build_blocks"] = built * shape.params
    elif strategy.uses_deepspeed and strategy.shard_level in (1, 2):
        out["released_build_blocks"] = built * states.trainable
    if converts_outputs_to_fp32(cell, strategy) and phase == "backward" and cell.train.kernels != "liger":
        out["cached_half_logits"] = cell.train.seq_len * cell.train.micro_batch * shape.vocab * compute_bytes(cell)
    if strategy.uses_deepspeed and strategy.shards_params and n > 1 and overlaps_comm(cell, strategy):
        # (without overlap_comm both run on the default stream: no side pools, bench/estimate/user_deepspeed.py)
        out["zero3_gather_stream_pool"] = _zero3_gathered(cell, shape, states)
        # overlap_comm: the reduce-scatter stages a bucket-sized copy on the reduction stream (its own pool).
        trained_bpp = states.base_bpp or states.adapter_bpp
        out["zero3_reduce_stream_pool"] = DEEPSPEED.reduce_bucket_size * trained_bpp.grads
    return {k: v for k, v in out.items() if v}


def step_buffers(cell: CellSettings, strategy: Strategy, states: ModelStates) -> dict[str, float]:
    """Temporaries of the optimizer step (bytes, one rank)."""
    out: dict[str, float] = {}
    sharding = sharding_for(strategy)
    local = states.trainable / shard_ranks(cell, strategy) if sharding.optimizer else states.trainable
    if sharding.optimizer_on_host:
        return out
    foreach = cell.train.optimizer == "adamw_torch"
    if strategy.uses_deepspeed:
        if strategy.shards_params:
            # stage3.step goes one optimizer sub-group at a time (sub_group_size, 1e9 elements by default)
            local = min(local, DEEPSPEED.sub_group_size)
        out["zero_fp32_grad_partition"] = 4 * local  # the 16-bit gradient partition upcast for the step
        if not foreach:
            # step flattens the partition's 16-bit gradients before the upcast and drops the copy after it;
            # both are gone by the time foreach AdamW makes its temporaries
            out["zero_flat_grad_partition"] = compute_bytes(cell) * local
    if foreach:
        out["adam_foreach_temp"] = 4 * local  # foreach AdamW materialises sqrt(v) for all tensors at once
    if strategy.uses_ddp(cell.gpus):
        trained_bpp = states.base_bpp or states.adapter_bpp
        out["ddp_buckets"] = trained_bpp.grads * states.trainable
    return out


# ---------------------------------------------------------------- the peak

def _state_components(states: ModelStates, grads: float, activations: float) -> dict[str, float]:
    a = states.adapter
    return {"params": states.base.weights, "grads": grads, "optimizer": states.base.optimizer,
            "master_weights": states.base.master, "activations": activations,
            "adapter": a.weights + a.grads + a.master + a.optimizer}


def peak_moments(cell: CellSettings, shape: ModelShape, strategy: Strategy, states: ModelStates,
                 acts: ActivationBytes, calib: Calibration) -> dict[str, _Parts]:
    """Bytes at the loss's backward (the logits peak), in the layers' backward (one layer's activations,
    recomputed under checkpointing) and at the optimizer step; the largest is the peak."""
    grads = states.base.grads
    if strategy.uses_deepspeed and strategy.shard_level == 1 and not is_user_config(cell.strategy):
        # The paper's ZeRO-1 keeps whole gradients; DeepSpeed's with overlap_comm and contiguous_gradients
        # (bench/strategies/render.py's JSON) reduces them through the buckets during the backward and copies only its
        # partition out, like stage 2 (stage_1_and_2.reduce_ipg_grads): the rest are views into the buckets.
        grads = grads / cell.gpus
    if cell.train.grad_accum > 1:
        grads_at_loss = grads  # the previous micro-batches' gradients are still held
    elif strategy.uses_deepspeed and strategy.shards_params and not strategy.offload_optimizer:
        grads_at_loss = grads  # ZeRO-3 allocates its flat gradient partition at init and keeps it
    else:
        # zero_grad(set_to_none=True): only the head's gradient exists when the logits peak.
        share = shape.lm_head_params / shape.params if shape.params else 0
        grads_at_loss = grads * share
    kept = acts.kept
    return {
        "backward": _Parts(_state_components(states, grads_at_loss, kept + acts.logits_peak),
                           backward_buffers(cell, shape, strategy, states, calib, "loss")),
        "backward (layers)": _Parts(
            _state_components(states, grads, kept + acts.logits_kept + acts.per_layer + acts.layer_temp),
            backward_buffers(cell, shape, strategy, states, calib, "layers")),
        "optimizer step": _Parts(_state_components(states, grads, acts.logits_kept),
                                 step_buffers(cell, strategy, states)),
        **_build_moment(cell, shape, strategy, states),
    }


def _build_moment(cell: CellSettings, shape: ModelShape, strategy: Strategy, states: ModelStates) -> dict[str, _Parts]:
    """QLoRA builds the whole 4-bit model on every GPU (unless FSDP offloads it to the host layer by layer),
    one bf16 layer at a time, before any strategy shards it: under FSDP and ZeRO-3 that can be the peak."""
    if cell.adapter.type != "qlora" or qlora_builds_on_host(cell) or cell.device != "cuda":
        return {}
    layer, _ = _unit_params(shape)
    components = dict.fromkeys(("params", "grads", "optimizer", "master_weights", "activations", "adapter"), 0.0)
    components["params"] = _built_model_bytes(cell, shape, states)
    return {"build": _Parts(components, {"bf16_layer_being_quantised": compute_bytes(cell) * layer})}


def shard_view(cell: CellSettings, strategy: Strategy) -> CellSettings:
    """The cell as one rank's memory sees it: ``gpus`` = the ranks its states are split over, on one node.

    A cell of ``nodes`` x ``gpus`` ranks shards over all of them (ZeRO, FSDP full sharding), so it is
    predicted as one node of that many ranks; sharding within a node (FSDP1 HYBRID_SHARD: replicas across
    nodes) splits over the node's ``gpus`` only. A one-node cell is itself."""
    if cell.nodes == 1:
        return cell
    within_node = strategy.shard_level and strategy.shard_scope == "node"
    return cell.model_copy(update={"nodes": 1, "gpus": cell.gpus if within_node else cell.processes})


def predict(cell: CellSettings, calib: Calibration = CALIBRATION, margin: float | None = None,
            capacity_gib: float | None = None, capacity_source: str | None = None,
            built_on_meta: bool | None = None) -> Prediction | None:
    """Peak memory per rank of ``cell``; None when its strategy cannot be described (an unreadable user config).

    ``built_on_meta``: None for the way bench builds the cell now (model_build.builds_on_meta); a record's
    check passes the way that record was built (``model_init``), as older records built FSDP+LoRA on the GPU.
    ``margin``: the skip margin; None takes the framework's from the margins file, as does the fit margin.
    A cell of several nodes is predicted per card with its states sharded over all its ranks (``shard_view``);
    ``host_gib`` is then the host memory of every rank on every node together.
    """
    if cell.train.micro_batch == "auto":  # a size is needed: propose() (bench/estimate/auto_batch.py) tries them
        raise ValueError("train.micro_batch auto has no single prediction: predict at a number (with_micro_batch) "
                         "or let bench.estimate.auto_batch.propose find the largest that fits")
    strategy = describe_strategy(cell)
    if strategy is None:
        return None
    ranks = cell.processes
    cell = shard_view(cell, strategy)
    if built_on_meta is None:
        built_on_meta = builds_on_meta(cell, strategy)
    shape = rank_shape(ModelShape.of(cell.model), strategy)  # one tensor-parallel rank's part (all at tp 1)
    states = model_states(cell, shape, strategy)
    acts = activations_for(cell, shape, strategy, calib)
    moments = peak_moments(cell, shape, strategy, states, acts, calib)
    phase, parts = max(moments.items(), key=lambda kv: kv[1].allocated)
    rep = replay(cell, shape, strategy, calib)
    if rep is not None:
        # The replay through the caching-allocator model (bench/estimate/replay/) gives both peaks; the
        # formula's moment at the replay's peak phase gives the breakdown, and the overhead is what the
        # replay holds beyond that moment's states and activations: buffers, the blocks the allocator keeps
        # free at the peak, and the (small) difference between the replayed and the formula's allocated.
        phase = rep.peak_phase if rep.peak_phase in moments else phase
        parts = moments[phase]
        allocated, reserved = float(rep.peak_allocated), float(rep.peak_reserved)
        states_and_acts = sum(parts.components.values())
        cached = {"free_blocks_at_peak": reserved - allocated,
                  "replay_minus_formula": allocated - parts.allocated}
        slack = 0.0
        components = {**parts.components, "overhead": reserved - states_and_acts}
    else:
        allocated = parts.allocated
        cached = reserved_only_blocks(cell, shape, strategy, states, acts, phase, built_on_meta, calib) \
            if cell.device == "cuda" else {}
        slack = allocated * calib.allocator_slack
        components = {**parts.components, "overhead": sum(parts.buffers.values()) + sum(cached.values()) + slack}
        reserved = allocated + sum(cached.values()) + slack
    outside = 0.0
    if cell.device == "cuda":
        outside = calib.cuda_context_gib * GIB + (calib.nccl_gib * GIB if cell.gpus > 1 else 0)
    host_rank = states.base.host + states.adapter.host + calib.host_process_gib * GIB
    if cell.device == "cpu":
        host_rank += reserved  # on CPU the "device" memory is host memory
    pred = Prediction(
        peak_reserved_gib=reserved / GIB, peak_allocated_gib=allocated / GIB,
        device_total_gib=(reserved + outside) / GIB, peak_phase=phase,
        components_gib={k: components[k] / GIB for k in COMPONENTS},
        overhead_detail_gib={**{k: v / GIB for k, v in parts.buffers.items()},
                             **{f"cached:{k}": v / GIB for k, v in cached.items()}, "allocator_slack": slack / GIB},
        activations_detail_gib={k: v / GIB for k, v in acts.as_dict().items()},
        bytes_per_param=bytes_per_param_summary(states, strategy, shard_ranks(cell, strategy)),
        host_gib=ranks * host_rank / GIB, host_per_rank_gib=host_rank / GIB,
        calibration=asdict(calib), reserved_model="replay" if rep is not None else "additive",
        estimator_version=ESTIMATOR_VERSION, **margins_for(strategy, margin, cell.adapter.type),
    )
    return with_capacity(pred, capacity_gib, capacity_source)
