"""DeepSpeed ZeRO-1/2 (stage_1_and_2.py): the 16-bit parameters flattened into one buffer, each rank's fp32
master partition, gradients through two reduce buckets into the rank's partition, the step over the partition;
with optimizer offload the master, gradients and step live on the host."""

from __future__ import annotations

from bench.estimate.replay.base import Run
from bench.estimate.replay.tensors import model_params
from bench.strategies import Strategy
from bench.strategies.constants import DEEPSPEED


class Zero12Run(Run):
    """Ranks differ: each holds its own range of the flat buffer (rank 0 the embedding)."""

    ranks_differ = True

    @classmethod
    def handles(cls, strategy: Strategy) -> bool:
        return strategy.uses_deepspeed and not strategy.shards_params

    @classmethod
    def replays_offload(cls, strategy: Strategy) -> bool:
        return strategy.offload_optimizer and not strategy.offload_params

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ds_offload = self.replays_offload(self.strategy)  # fp32 master, states, gradients and step on the host

    def build(self) -> None:
        self.build_on_device(self.c)
        self.prepare()

    def prepare(self) -> None:
        """DeepSpeed ZeRO-1/2 optimizer init (stage_1_and_2.py): empty_cache, then the 16-bit parameters
        flattened into one buffer on the GPU (torch.cat while the originals live; the parameters become
        views and the originals are freed), the fp32 master partition (a 16-bit clone upcast), and
        initialize_optimizer_states' zeroed fp32 gradient partition, dropped at once.
        With cpu_offload the master partition, its gradient and the optimizer live on the host; the GPU
        keeps temp_grad_buffer_for_gpu_offload instead, a 16-bit buffer of the largest parameter's size
        through which each gradient goes to the host."""
        self.owners, self.mine, self.bucket = self.partition_owners(), self.partition_pieces(), []
        self.mem.empty_cache()
        self.alloc("ds_flat_params", self.c * self.shape.params)
        self.free_all("param:")
        if self.ds_offload:
            self.alloc("ds_offload_grad_staging", self.c * max(k for _, k in model_params(self.shape)))
            return
        part = self.partition()
        self.alloc("ds_clone", self.c * part)
        self.alloc("ds_fp32_partition", 4 * part)
        self.free("ds_clone")
        self.alloc("ds_init_grad", 4 * part)
        self.free("ds_init_grad")

    def partition(self) -> float:
        return self.shape.params / self.n

    def partition_owners(self) -> dict[str, set[int]]:
        """The ranks whose ZeRO-1/2 partition holds part of each parameter."""
        size, offset, out = self.partition(), 0, {}
        for name, numel in model_params(self.shape):
            first, last = int(offset // size), int(min(offset + numel - 1, self.shape.params - 1) // size)
            out[name] = set(range(first, last + 1))
            offset += numel
        return out

    def partition_pieces(self) -> dict[str, float]:
        """This rank's part of each parameter: ZeRO-1/2 partition the flat 16-bit buffer (parameters in
        ``model.parameters()`` order) into N equal ranges, rank r the r-th."""
        lo, hi = self.rank * self.partition(), (self.rank + 1) * self.partition()
        out, offset = {}, 0
        for name, numel in model_params(self.shape):
            part = min(hi, offset + numel) - max(lo, offset)
            if part > 0:
                out[name] = part
            offset += numel
        return out

    def grad_ready(self, key: str, numel: int, from_buffer: bool = False) -> None:
        self.to_bucket(key, "grad_tied:embed_tokens" if from_buffer else f"grad_new:{key}", numel)

    def to_bucket(self, key: str, src: str, numel: int) -> None:
        """The gradient hook: on the first one, setup_buckets allocates the two reduce buckets (overlap_comm);
        each gradient is copied into the current bucket and freed; a bucket that cannot take the next
        gradient is reduced first (reduce_bucket)."""
        if not self.mem.live("ds_bucket0"):
            self.alloc("ds_bucket0", self.c * DEEPSPEED.reduce_bucket_size)
            self.alloc("ds_bucket1", self.c * DEEPSPEED.reduce_bucket_size)
        if sum(k for _, k in self.bucket) + numel > DEEPSPEED.reduce_bucket_size:
            self.reduce_bucket()
        self.bucket.append((key, numel))
        self.free(src)

    def reduce_bucket(self) -> None:
        """reduce_ipg_grads on the reduction stream: average_tensor all-reduces the bucket's slices, one per
        owning rank, through allreduce_bucket's flatten (use_multi_rank_bucket_allreduce): a copy of the
        bucket where it spans two partitions (flatten of a single tensor is a view). Then
        copy_grads_in_partition copies this rank's gradients into grads_in_partition, allocated there at its
        first use: early in the backward on the ranks holding the last layers, at its end on rank 0."""
        if len({r for key, _ in self.bucket for r in self.owners[key]}) > 1:
            self.alloc("ds_allreduce_flat", self.c * sum(k for _, k in self.bucket), "reduction")
            self.free("ds_allreduce_flat")
        if self.ds_offload:
            self.offload_grads()
        elif any(key in self.mine for key, _ in self.bucket) and not self.mem.live("ds_grads_in_partition"):
            self.alloc("ds_grads_in_partition", self.c * self.partition(), "reduction")
        self.bucket = []

    def offload_grads(self) -> None:
        """copy_grads_in_partition under cpu_offload, on the reduction stream, one parameter of this rank's
        partition at a time: set_norm_for_param_grad_in_gpu takes the norm of its slice upcast to fp64
        (.double()), then async_inplace_copy_grad_to_fp32_buffer_from_gpu upcasts it to fp32 (.float()) and
        copies that to the host's fp32 gradient; both temporaries are dropped at once."""
        for key, _ in self.bucket:
            if key in self.mine:
                self.alloc("ds_offload_norm_fp64", 8 * self.mine[key], "reduction")
                self.free("ds_offload_norm_fp64")
                self.alloc("ds_offload_fp32_grad", 4 * self.mine[key], "reduction")
                self.free("ds_offload_fp32_grad")

    def backward_epilogue(self) -> None:
        """independent_gradient_partition_epilogue: the last bucket reduced, the buckets released (the
        partition's gradients stay, as views, until the step)."""
        self.reduce_bucket()
        self.free("ds_bucket0")
        self.free("ds_bucket1")

    def optimizer_step(self) -> None:
        """stage_1_and_2.step: the gradient norm (each of this rank's gradients upcast to fp64 one at a time,
        get_grad_norm_direct: the largest is what counts; rank 0 holds the embedding's), the partition's gradients flattened to one 16-bit tensor and upcast
        to fp32, the 16-bit copies freed, the optimizer (states at its first step), the fp32 gradient freed.
        Offloaded: the norm and the step run on the host, and the fp32 result is copied into the 16-bit
        parameters (copy_ converts on the host): nothing on the GPU."""
        if self.ds_offload:
            return
        self.alloc("ds_norm_fp64", 8 * max(self.mine.values()))
        self.free("ds_norm_fp64")
        part = self.partition()
        self.alloc("ds_flat_grad", self.c * part)
        self.alloc("ds_fp32_grad", 4 * part)
        self.free("ds_flat_grad")
        self.free("ds_grads_in_partition")
        self.adam_states([("fp32_partition", part)])
        self.free("ds_fp32_grad")
