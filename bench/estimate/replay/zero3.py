"""DeepSpeed ZeRO-3 (stage3.py): partitions built by zero.Init and defragmented, parameters gathered per
module by the PartitionedParameterCoordinator (prefetch, reuse distance, live-parameter limit), gradients
through a kept reduce bucket into the partition, the step by sub-group."""

from __future__ import annotations

from bench.estimate.replay.base import Run
from bench.estimate.replay.tensors import backward_order, layer_params, model_params
from bench.spec.models import ModelShape
from bench.strategies import Strategy
from bench.strategies.constants import DEEPSPEED

STREAM = "allgather"  # the PartitionedParameterCoordinator's all-gather stream: gathers and waits run on it


class Zero3Run(Run):
    """Parameters split evenly: every rank replays alike."""

    @classmethod
    def handles(cls, strategy: Strategy) -> bool:
        return strategy.uses_deepspeed and strategy.shards_params

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bucket_fill = 0  # the reduce bucket, elements

    def build(self) -> None:
        """DeepSpeed ZeRO-3 (stage3.py): zero.Init built each parameter and kept only its partition;
        defragment moves the partitions to the host, calls empty_cache and copies them back as one flat
        16-bit buffer; _create_fp32_partitions upcasts it per sub-group (.to(fp32), then .clone(): the first
        copy is dropped only when the next sub-group's replaces it, the last one when the function returns); initialize_optimizer_states zeroes an fp32 gradient partition and drops it; then the
        reduce bucket (ipg buffer) and the flat 16-bit gradient partition, both kept. The fp32 work goes by
        sub-group (sub_groups)."""
        part = self.shape.params / self.n
        self.alloc("ds_flat_params", self.c * part)
        for i, numel in enumerate(self.sub_groups()):
            # ``converted = flat.to(fp32)`` is a loop variable: the previous sub-group's copy is dropped only
            # when the name is rebound, after this one is made; the last one lives until the function returns.
            self.alloc(f"ds_fp32_converted{i}", 4 * numel)
            self.free(f"ds_fp32_converted{i - 1}")
            self.alloc(f"ds_fp32_partition{i}", 4 * numel)
        self.free_all("ds_fp32_converted")
        self.alloc("ds_init_grad", 4 * max(self.sub_groups()))
        self.free("ds_init_grad")
        self.alloc("ds_ipg_bucket", self.c * DEEPSPEED.reduce_bucket_size)
        self.alloc("ds_grad_partitions", self.c * part)
        self.z3 = Zero3Coordinator(self, self.shape, self.checkpointing)

    def use_module(self, module: str) -> None:
        if self.n > 1 and module in self.z3.step_of:
            self.z3.fetch(module)

    def done_module(self, module: str) -> None:
        if self.n > 1 and module in self.z3.step_of:
            self.z3.release(module)

    def grad_ready(self, key: str, numel: int, from_buffer: bool = False) -> None:
        self.to_bucket("grad_tied:embed_tokens" if from_buffer else f"grad_new:{key}", numel)

    def to_bucket(self, src: str, numel: int) -> None:
        """reduce_ready_partitions_and_remove_grads: the gradient is copied into the (kept) reduce bucket and
        freed; a bucket that cannot take it is reduced first."""
        if self.bucket_fill + numel > DEEPSPEED.reduce_bucket_size:
            self.reduce_bucket()
        self.bucket_fill += numel
        self.free(src)

    def reduce_bucket(self) -> None:
        """__reduce_and_partition_ipg_grads on its own stream: reduce_scatter_coalesced interleaves the
        bucket's gradients into one flat buffer (torch.cat), this rank's part is copied into the gradient
        partition buffer, the flat buffer is dropped."""
        if self.bucket_fill and self.n > 1:
            self.alloc("ds_reduce_scatter_flat", self.c * self.bucket_fill, "reduce_and_partition")
            self.free("ds_reduce_scatter_flat")
        self.bucket_fill = 0

    def backward_epilogue(self) -> None:
        self.reduce_bucket()
        self.z3.end_of_pass()

    def optimizer_step(self) -> None:
        """stage3.step: every gathered parameter released (_partition_all_parameters); the gradient norm
        (each parameter's partition upcast to fp64 in turn); the partition's 16-bit gradients flattened and
        upcast to fp32 (_prepare_fp32_grad_for_sub_group); the optimizer; the fp32 gradient dropped."""
        if self.n > 1:
            self.z3.release_all()
        self.alloc("ds_norm_fp64", 8 * max(k for _, k in model_params(self.shape)) / self.n)
        self.free("ds_norm_fp64")
        for i, numel in enumerate(self.sub_groups()):
            self.alloc("ds_flat_grad", self.c * numel)
            self.alloc("ds_fp32_grad", 4 * numel)
            self.free("ds_flat_grad")
            self.adam_states([(f"fp32_partition{i}", numel)])
            self.free("ds_fp32_grad")

    def sub_groups(self) -> list[float]:
        """Partition elements of each optimizer sub-group (stage3._create_fp16_sub_groups): parameters in
        order, a group closed once it reaches sub_group_size (DeepSpeed's default 1e9): the fp32 copies,
        gradients and the step go one sub-group at a time."""
        groups, current = [], 0.0
        for _, numel in model_params(self.shape):
            current += -(-numel // self.n)
            if current >= DEEPSPEED.sub_group_size:
                groups.append(current)
                current = 0.0
        return groups + ([current] if current else [])


class Zero3Coordinator:
    """DeepSpeed ZeRO-3's PartitionedParameterCoordinator, per module (each linear; the norms are
    persistent), as partitioned_param_coordinator.py runs it:

    * the first pass records the module order and releases every parameter after its module;
    * from then on (a complete trace) each fetch also prefetches the parameters used next, up to
      stage3_prefetch_bucket_size elements and as long as the gathered total stays under
      stage3_max_live_parameters; after a module, a parameter stays gathered if the trace uses it again
      within stage3_max_reuse_distance elements, or if a prefetch already walked past its next use.

    Both the gather and the wait run inside ``with stream(allgather_stream)`` (the coordinator's
    __all_gather_params and fetch_sub_module), so every gathered tensor comes from that stream's pool,
    never from compute's. A gather of one parameter (all_gather_coalesced -> _all_gather_sequential) fills
    one buffer of the padded size that becomes the parameter's data; a gather of several
    (_all_gather_coalesced) fills one flat buffer (world x the partitions) and, at the wait, each parameter
    is concatenated out of it into its own 16-bit tensor (AllGatherCoalescedHandle.wait), then the flat
    buffer is dropped. DeepSpeed's defaults, which the generated JSON keeps."""

    PREFETCH_BUCKET = DEEPSPEED.stage3_prefetch_bucket_size  # written by bench/strategies/render.py
    MAX_LIVE = DEEPSPEED.stage3_max_live_parameters  # DeepSpeed's default, kept
    MAX_REUSE = DEEPSPEED.stage3_max_reuse_distance  # DeepSpeed's default, kept

    def __init__(self, run: Zero3Run, shape: ModelShape, checkpointing: bool):
        self.run, self.shape = run, shape
        sizes = dict(model_params(shape))
        head = "embed_tokens" if shape.tied_embeddings else "lm_head"
        linears = [n for n, _ in layer_params(shape)[:7]]
        order = [("embed", "embed_tokens")]
        for layer in range(shape.layers):
            order += [(f"{layer}.{n}", f"layers.{layer}.{n}") for n in linears]
        order.append(("lm_head", head))
        order.append(("lm_head~b", head))
        for layer in reversed(range(shape.layers)):
            if checkpointing:
                order += [(f"{layer}.{n}~r", f"layers.{layer}.{n}") for n in linears]
            order += [(f"{layer}.{n}~b", f"layers.{layer}.{n}") for n, _ in backward_order(layer_params(shape))[:7]
                      if n in linears]
        order.append(("embed~b", "embed_tokens"))
        self.order = order
        self.step_of = {module: i for i, (module, _) in enumerate(order)}
        self.numel = {param: sizes[param] for _, param in order}
        self.complete = False  # the first pass records the trace
        self.available: set[str] = set()
        self.inflight: dict[str, str] = {}  # param -> its gather
        self.fetched_for: dict[str, int] = {}  # param -> the furthest step a prefetch walked past for it
        self.queue = 0  # position in the trace's parameter uses
        self.n_available = 0
        self.gathers = 0

    def _gather(self, params: list[str]) -> None:
        name = f"ag_flat{self.gathers}"
        self.gathers += 1
        if len(params) == 1:  # _all_gather_sequential: the buffer is the parameter
            name = f"z3_param:{params[0]}"
            self.run.alloc(name, self.run.c * -(-self.numel[params[0]] // self.run.n) * self.run.n, STREAM)
        else:
            self.run.alloc(name, self.run.c * sum(self.numel[p] for p in params), STREAM)
        for p in params:
            self.inflight[p] = name
            self.n_available += self.numel[p]

    def _wait(self, gather: str) -> None:
        for p in [p for p, g in self.inflight.items() if g == gather]:
            del self.inflight[p]
            if gather != f"z3_param:{p}":
                self.run.alloc(f"z3_param:{p}", self.run.c * self.numel[p], STREAM)
            self.available.add(p)
        if not gather.startswith("z3_param:"):
            self.run.free(gather)

    def fetch(self, module: str) -> None:
        step = self.step_of[module]
        param = self.order[step][1]
        if param not in self.available and param not in self.inflight:
            self._gather([param])
        if param in self.inflight:
            self._wait(self.inflight[param])
        if not self.complete:
            return
        self.queue = max(self.queue, step + 1)
        budget = min(self.MAX_LIVE - self.n_available, self.PREFETCH_BUCKET)
        chosen, numel = [], 0
        while self.queue < len(self.order) and numel < budget:
            _, p = self.order[self.queue]
            self.fetched_for[p] = max(self.fetched_for.get(p, -1), self.queue)
            if p not in self.available and p not in self.inflight and p not in chosen:
                chosen.append(p)
                numel += self.numel[p]
            self.queue += 1
        if chosen:
            self._gather(chosen)

    def release(self, module: str) -> None:
        step = self.step_of[module]
        param = self.order[step][1]
        if self.complete:
            if self.fetched_for.get(param, -1) > step:
                return
            traversed = 0
            for _, p in self.order[step + 1:]:
                if traversed >= self.MAX_REUSE:
                    break
                if p == param:
                    return
                traversed += self.numel[p]
        self._release(param)

    def _release(self, param: str) -> None:
        if param in self.available:
            self.available.discard(param)
            self.run.free(f"z3_param:{param}")
            self.n_available -= self.numel[param]

    def release_all(self) -> None:
        for gather in set(self.inflight.values()):
            self._wait(gather)
        for param in list(self.available):
            self._release(param)

    def end_of_pass(self) -> None:
        """reset_step: the trace is complete after the first forward and backward."""
        self.complete = True
        self.queue = 0
        self.fetched_for = {}
