"""FSDP2 (fully_shard): every parameter split evenly across ranks (DTensor shards), gathered per unit by
foreach_all_gather on its copy-in stream, gradients reduce-scattered by foreach_reduce and upcast to fp32.

With CPUOffloadPolicy (torch 2.11-2.13, torch/distributed/fsdp/_fully_shard/; accelerate 1.15's
fsdp2_prepare_model) the shards, their gradients and the optimizer live on the host, and three things move
onto the GPU's side-stream pools, which the compute stream cannot reuse (bench/estimate/allocator.py):

* the build: the model is built whole on the GPU (no meta init under offload: bench/strategies/build.py), each
  parameter's padded shard made there and copied to the host (FSDPParam._init_sharded_param), the originals
  freed when fsdp2_prepare_model drops its ``original_sd``: all of the model's segments stay cached, free;
* the gather (``all_gather_inputs``): an offloaded parameter skips the foreach copy-in and is copied to the
  GPU one parameter at a time, ``.to(device)`` (the fp32 shard) then cast to the compute dtype, on the
  copy-in stream; the all-gather output is allocated there too, and in the forward (implicit prefetch) it is
  kept until the next unit's copy-out (``comm_ctx.all_gather_state``), the last one until the root's
  post-forward;
* the reduction (``foreach_reduce``): the reduce-scatter output and its fp32 upcast are made on the
  reduce-scatter stream, and the upcast is copied to the host (``.to("cpu")``) and dropped at once: that pool
  holds one unit's pair, not every gradient.
On one rank FSDP2 skips the collectives: the shard is copied and cast on the compute stream
(FSDPParamGroup.wait_for_unshard's world-size-1 path).
"""

from __future__ import annotations

from bench.estimate.replay.base import COMPUTE
from bench.estimate.replay.fsdp import FsdpRun
from bench.estimate.replay.tensors import model_params
from bench.spec import CellSettings
from bench.spec.models import ModelShape
from bench.strategies import Strategy

COPY_IN, REDUCE_SCATTER = "ag_copy_in", "reduce_scatter"
WEIGHT_BYTES = 4  # the sharded parameters are fp32: accelerate upcasts trained ones under mixed precision


class Fsdp2Run(FsdpRun):
    """Parameters split evenly: every rank replays alike."""

    @classmethod
    def handles(cls, strategy: Strategy) -> bool:
        return strategy.fsdp_version == 2

    @classmethod
    def replays_offload(cls, strategy: Strategy) -> bool:
        """CPUOffloadPolicy: parameters, gradients and the optimizer on the host."""
        return strategy.offload_params

    def __init__(self, *args, shard_bytes: int = WEIGHT_BYTES, **kwargs):
        super().__init__(*args, **kwargs)
        self.offload = self.replays_offload(self.strategy)
        self.shard_bytes = shard_bytes  # an offloaded shard's dtype on the host (LoRA's frozen base: 16-bit)

    def shard(self, numel: int) -> int:
        """A parameter's padded shard, in elements (dim-0 chunks, the first padded)."""
        return -(-numel // self.n)

    def build(self) -> None:
        """FSDP2: fully_shard on meta, then each parameter's local shard allocated and initialised. Offload:
        built on the GPU, each padded shard made there and sent to the host, the originals then freed."""
        if self.offload:
            self.build_on_device(WEIGHT_BYTES)
            for name, numel in model_params(self.shape):
                self.alloc(f"padded_shard:{name}", WEIGHT_BYTES * self.shard(numel))
                self.free(f"padded_shard:{name}")
            self.free_all("param:")
            return
        for name, numel in model_params(self.shape):
            self.alloc(f"shard:{name}", 4 * numel / self.n)

    def unshard(self, unit: str) -> None:
        """On one rank too (the 16-bit copies come from a one-rank all-gather). foreach_all_gather: on the copy-in stream a flat copy of the shards and the all-gather output
        (world x shards); the copy-out allocates each parameter's unsharded tensor on the compute stream;
        then the copy-in buffers are dropped."""
        params = self.unit_params(unit)
        if any(self.mem.live(f"unsharded:{unit}.{name}") for name, _ in params):
            return
        if self.offload:
            self.unshard_offloaded(unit, params)
            return
        numel = sum(k for _, k in params)
        self.alloc(f"ag_input:{unit}", self.c * numel / self.n, COPY_IN)
        self.alloc(f"ag_output:{unit}", self.c * numel, COPY_IN)
        self.free(f"ag_input:{unit}")
        for name, k in params:
            self.alloc(f"unsharded:{unit}.{name}", self.c * k)
        self.free(f"ag_output:{unit}")

    def unshard_offloaded(self, unit: str, params: list[tuple[str, int]]) -> None:
        """Offload: per parameter the fp32 shard copied to the GPU and cast (the copy dropped once cast), then
        the all-gather output, into which the casts are copied and dropped; the copy-out; in the forward the
        output kept until the next unit's copy-out. One rank: the copy and cast on the compute stream, each
        cast copied into the parameter's unsharded tensor."""
        stream = COPY_IN if self.n > 1 else COMPUTE
        for name, k in params:
            self.alloc(f"h2d:{unit}.{name}", self.shard_bytes * self.shard(k), stream)
            if self.shard_bytes == self.c:  # _to_dtype_if_needed: the copy is the all-gather input
                self.mem.rename(f"h2d:{unit}.{name}", f"ag_cast:{unit}.{name}")
            else:
                self.alloc(f"ag_cast:{unit}.{name}", self.c * self.shard(k), stream)
                self.free(f"h2d:{unit}.{name}")
            if self.n == 1:
                self.alloc(f"unsharded:{unit}.{name}", self.c * k)
                self.free(f"ag_cast:{unit}.{name}")
        if self.n == 1:
            return
        self.alloc(f"ag_output:{unit}", self.c * self.n * sum(self.shard(k) for _, k in params), COPY_IN)
        self.free_all(f"ag_cast:{unit}.")
        self.free_all("ag_output_kept:")  # wait_for_unshard frees the previous unit's result (forward only)
        for name, k in params:
            self.alloc(f"unsharded:{unit}.{name}", self.c * k)
        if self.mem.phase == "forward":
            self.mem.rename(f"ag_output:{unit}", f"ag_output_kept:{unit}")
        else:
            self.free(f"ag_output:{unit}")

    def reshard_after_forward(self, unit: str) -> None:
        if unit == "root":  # the root's post-forward frees the last kept all-gather result
            self.free_all("ag_output_kept:")
        if unit != "root" and self.strategy.reshards_after_forward:  # the root stays for the backward
            self.free_all(f"unsharded:{unit}.")

    def post_backward(self, unit: str) -> None:
        """foreach_reduce: the reduce-scatter input (the group's gradients copied into one 16-bit buffer,
        compute stream) is kept until the next group's reduce-scatter; the output shard is made on the
        reduce-scatter stream and upcast there to fp32 (the sharded gradients, kept until zero_grad; under
        offload copied to the host and dropped); the unsharded gradients and parameters are freed."""
        numel = self.unit_numel(unit)
        previous = self.mem.live_names("rs_input:")
        self.alloc(f"rs_input:{unit}", self.c * numel)
        self.free_all(f"unit_grad:{unit}:")
        for name in previous:
            self.free(name)
        first = not self.mem.live(f"grad:{unit}")
        self.alloc(f"rs_out:{unit}", self.c * numel / self.n, REDUCE_SCATTER)
        self.alloc(f"grad_fp32_new:{unit}", 4 * numel / self.n, REDUCE_SCATTER)
        self.free(f"rs_out:{unit}")
        if self.offload:
            self.free(f"grad_fp32_new:{unit}")
        else:
            self.keep_first_sharded_grad(unit, first)
        self.free_all(f"unsharded:{unit}.")
        if unit == "root":
            self.free_all("rs_input:")

    def optimizer_step(self) -> None:
        if self.offload:
            return  # the sharded gradients and the step are on the host
        self.adam_states([(n, k / self.n) for n, k in model_params(self.shape)])
        self.free_all("grad:")


def offload_copy_in_pool(cell: CellSettings, shape: ModelShape, strategy: Strategy, shard_bytes: int) -> int:
    """Bytes the copy-in stream's pool reserves in a forward under CPUOffloadPolicy (unshard_offloaded: the root,
    then each layer with the previous unit's all-gather output kept), for the additive model of the cells the
    replay does not cover (LoRA: its 16-bit frozen base is copied without a cast; its adapters are a few MiB).
    One rank gathers nothing: its copies are the compute stream's, transient."""
    run = Fsdp2Run(cell, shape, strategy, shard_bytes=shard_bytes)
    if run.n == 1:
        return 0
    run.mem.phase = "forward"
    run.unshard("root")
    for layer in range(shape.layers):
        run.unshard(f"layer{layer}")
        run.reshard_after_forward(f"layer{layer}")
    return run.mem.reserved_on(COPY_IN)
