"""What the estimator says about a cell: the stored ``Prediction``, its versions, the hand-chosen
``Calibration``, and the fit decision
against a capacity (``with_capacity``, ``predicted_oom``).

Pure data and arithmetic: no torch import. The margins come per framework from bench/estimate/margins.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from bench.strategies import Strategy

GIB = 2**30
PREDICTION_VERSION = 1  # the stored form's schema
# The estimator's own version: bump it with every change that can move a prediction. A predicted_oom record
# made by another version is re-evaluated on resume (bench/launch/campaign.py), reports show the version that made
# each stored prediction, and the margins file must be regenerated (bench estimate-margins).
ESTIMATOR_VERSION = 7
# 3: ZeRO-3's replay keeps each sub-group's fp32 copy until the next is made, gathers on the all-gather stream
#    (one-parameter gathers without a flat buffer); FSDP1 parameter offload reserves its initialisation's blocks
#    (bench/estimate/offload_blocks.py) and keeps the offloaded shard copy only for an uncast root.
# 4: FSDP1 parameter offload reserves its post-backward stream's pool (every trained unit's sharded gradient,
#    upcast to the flat parameter's dtype, kept until the backward ends) and its pre-unshard stream's (the cast
#    of each offloaded fp32 shard through a GPU copy): bench/estimate/offload_streams.py.
# 5: FSDP2 with CPU offload: full fine-tuning replayed (the model built on the GPU, all of it then cached free;
#    each shard copied and cast on the copy-in stream, the all-gather output kept to the next copy-out in the
#    forward; the reduce-scatter stream's output and fp32 upcast dropped once copied to the host), and the
#    additive model's build blocks and copy-in pool for adapters: bench/estimate/replay/fsdp2.py.
# 6: FSDP2 with context parallelism (tp 1) replayed like FSDP2 (its reserved peak is the allocator's free blocks,
#    not a 7 % slack: Llama-3.2-1B, cp 2, seq 4096 on 2x H200 measured 16.09 GiB reserved at 12.07 allocated), each
#    rank with seq / cp tokens, states over dp_shard x cp, and ring attention's transients per layer (full-length
#    K/V gathered, fp32 merges and gradient accumulators: bench/estimate/replay/tensors.py). And a checkpointed
#    layer's forward keeps at most three of its tensors live at once, all freed before its output is made
#    (Run.unsaved_forward), where it made the layer's whole set first: from the real allocator's history of the
#    1B FSDP1 x2 cell (results/llama-full-h200-snap/snapshot-vs-replay.md), whose reserved peak was over-predicted
#    by 15-16 % (52.09 GiB against 44.81; now 43.88).
#    And FSDP1's flat gradient (the views' backward) and a tied embedding's gradient sum (out of place) are made on
#    the unshard stream, where FSDP1 makes its views, not the compute stream (same snapshot: 3 x 501 MiB live
#    there at the root's post-backward; 43.88 -> 44.98 GiB): Fsdp1Run.post_backward and TIED_SUM_STREAM.
#    Every framework sums a tied embedding's two gradients out of place (torch's autograd), on the compute stream
#    elsewhere (Run.sum_tied_grads): 8 of 312 judged records' predictions move, none of the judge folders'.
# 7: (fifteenth session, from results/tp-h200, kernels-h200 and corpus-gpu) tensor parallelism alone replayed at one
#    rank's slices with the head's gather (replay/tp.py: Llama-3.2-3B tp 2 -10.3 % -> -0.3 %); FSDP2 built on the GPU
#    caches its whole built model, not (1 - 1/n) of it (accelerate keeps original_sd through fully_shard); ZeRO-3's
#    side-stream pools and ZeRO-1/2's second reduce bucket only with overlap_comm (a user's JSON may turn it off:
#    user_deepspeed.py); Liger's RMSNorm and SwiGLU save their inputs, not transformers' fp32 upcast and SiLU output,
#    and a Liger layer's backward temporaries are down_proj's input gradient and its LoRA chain (fp32 where peft
#    casts inputs to fp32 adapters), not a fraction of the layer's activations.
COMPONENTS = ("params", "grads", "optimizer", "master_weights", "activations", "adapter", "overhead")


@dataclass(frozen=True)
class Calibration:
    """The constants no formula gives, chosen by hand while reading the in-sample GPU records
    (bench/estimate/protocol.py TUNING_FOLDERS); none is the output of a fit."""

    # torch reserved / allocated - 1 where the allocations are not replayed (bench/estimate/replay/ covers
    # full fine-tuning): a stand-in for the caching allocator's free blocks
    allocator_slack: float = 0.07
    backward_temp_fraction: float = 0.5  # a recomputed layer's backward temporaries, as a share of its activations
    cuda_context_gib: float = 0.5  # CUDA context + kernels per process: outside torch reserved
    nccl_gib: float = 0.5  # NCCL communicator buffers per process (gpus > 1): outside torch reserved
    host_process_gib: float = 2.5  # host RSS of one rank before any offloaded state (torch, CUDA, libraries)
    ds_overlap_buffers: int = 2  # ZeRO-1/2 overlap_comm double-buffers its reduce bucket


CALIBRATION = Calibration()


class Prediction(BaseModel):
    """Stored in RunRecord.prediction (as a dict). All sizes in GiB, per rank unless named host."""

    version: int = PREDICTION_VERSION
    estimator_version: int | None = None  # ESTIMATOR_VERSION of the code that predicted; absent in old records
    peak_reserved_gib: float  # what torch.cuda.max_memory_reserved should read: the sum of components_gib
    peak_allocated_gib: float  # the same without the allocator slack
    device_total_gib: float  # reserved + CUDA context + NCCL: what NVML should read
    peak_phase: str  # "backward" (activations at their largest) or "optimizer step"
    components_gib: dict[str, float]
    overhead_detail_gib: dict[str, float]
    activations_detail_gib: dict[str, float]
    bytes_per_param: dict[str, Any]
    host_gib: float  # host memory of all ranks of the cell together (offloaded states + processes)
    host_per_rank_gib: float
    capacity_gib: float | None = None
    capacity_source: str | None = None  # "gpu_memory_gib", "device", "--capacity-gib"
    required_gib: float | None = None  # what is compared with the capacity
    fits: bool = True  # required * (1 + fit_margin) <= capacity (True when the capacity is unknown)
    margin: float = 0.10  # the skip margin
    fit_margin: float = 0.0  # room kept for the estimator's under-prediction (bench/estimate/margins.py)
    margin_source: str | None = None  # where both margins come from
    predicted_oom: bool = False  # required > capacity * (1 + margin): not launched unless --force
    calibration: dict[str, float] = {}
    # "replay": both peaks from replaying the cell's allocations through the caching-allocator model
    # (bench/estimate/replay/: full fine-tuning on CUDA without offload); "additive": the formula's
    # allocated peak plus the named cached blocks plus allocator_slack.
    reserved_model: str = "additive"


# ---------------------------------------------------------------- the fit decision

def margins_for(strategy: Strategy, skip: float | None, adapter: str = "none") -> dict[str, Any]:
    """The framework's margins (bench/estimate/margins.py; QLoRA apart); an explicit skip margin (a matrix's
    estimate_margin) replaces the measured one."""
    from bench.estimate.margins import margin_for

    m = margin_for(strategy, adapter)
    source = m.source if skip is None else f"skip {skip:.0%} set by the matrix (estimate_margin); fit from {m.source}"
    return {"margin": m.skip if skip is None else skip, "fit_margin": m.fit, "margin_source": source}


def with_capacity(pred: Prediction, capacity_gib: float | None, source: str | None) -> Prediction:
    """Fill in the fit fields. A memory cap limits torch's allocator only, so it is compared with the
    reserved peak; a whole device (or an explicit capacity) with everything the process holds on it."""
    if capacity_gib is None:
        return pred.model_copy(update={"capacity_gib": None, "capacity_source": None, "required_gib": None,
                                       "fits": True, "predicted_oom": False})
    required = pred.peak_reserved_gib if source == "gpu_memory_gib" else pred.device_total_gib
    return pred.model_copy(update={
        "capacity_gib": capacity_gib, "capacity_source": source, "required_gib": required,
        "fits": required * (1 + pred.fit_margin) <= capacity_gib,
        "predicted_oom": predicted_oom(required, capacity_gib, pred.margin)})


def predicted_oom(required_gib: float, capacity_gib: float | None, margin: float) -> bool:
    """Skip only a clear miss: the requirement exceeds the capacity by more than the margin."""
    return capacity_gib is not None and required_gib > capacity_gib * (1 + margin)


def prediction_dict(pred: Prediction | None) -> dict[str, Any] | None:
    """The form stored in RunRecord.prediction (floats rounded to a kilobyte-ish precision)."""
    if pred is None:
        return None
    return _rounded(pred.model_dump(mode="json"))


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value
