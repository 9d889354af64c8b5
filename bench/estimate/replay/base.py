"""Replay a full fine-tuning cell's GPU allocations through the caching-allocator model
(bench/estimate/allocator.py): torch's *reserved* peak is what the allocator holds, not what is allocated.

Why a replay and not a formula: reserved = allocated + the free blocks the allocator keeps, and which
blocks are free at the peak depends on sizes, order and streams. A 2 GiB fp32 logits tensor needs 2 GiB of
*contiguous* free memory; the optimizer states, created at the first step, land in whatever cached blocks
fit then (best fit), so the next step's logits find their old segments taken and get new ones. FSDP's
gathers and reductions and ZeRO's reductions allocate on their own CUDA streams, whose free blocks
compute cannot reuse; FSDP1 frees blocks used on two streams through record_stream, reusable only once
the GPU has caught up. The measured gaps between reserved and allocated (3-13 GiB on Llama-3.2-1B/3B,
results/llama-full-h100x4) are these effects; no constant fraction describes them (ZeRO-2 on 3B, 2 GPUs:
+32 % of allocated; FSDP2 on 1B, 4 GPUs: +36 %; DDP on 3B: +5-6 %).

The replay writes the allocations down from the frameworks' code (named where each step is written):

* the build: on the device (DDP, ZeRO-1/2: a tensor per parameter; a tied LM head is first built untied
  and dropped); on meta, materialised per shard (FSDP1: each unit whole, flattened, its shard cloned;
  FSDP2: each parameter's shard); or partitioned by zero.Init and defragmented (ZeRO-3);
* prepare: DDP's broadcast chunks and gradient buckets; ZeRO's flat 16-bit buffer, fp32 master partition
  and the zeroed gradient of its optimizer-state initialisation (ZeRO-3: its reduce bucket and gradient
  partition, kept);
* three steps (the first creates the optimizer states; the next see where they landed; more change
  nothing): the forward (each layer's activations, freed at its end under checkpointing; autocast's 16-bit
  weight copies), the loss (16-bit logits, their fp32 upcast, the log-softmax and, in backward, its two fp32
  gradients), the layers' backward (recompute, temporaries, weight gradients in autograd's order) with the
  strategy's gathers and reductions on their streams, and the optimizer step (Adam states; foreach AdamW's
  sqrt(v); ZeRO's flat gradient partition, its fp32 copy and the fp64 gradient norm).

Sizes come from the estimator's own terms (bench/estimate/activations.py, bench/models.py); the constants
are the frameworks' defaults and the generated configs' settings (bucket sizes, prefetch and live-parameter
limits). Tensors of a few MiB (norm statistics, scalars) are left out: they fit into cached blocks. The ranks
that differ (ZeRO-1/2 partitions, FSDP1 shards) are each replayed and the highest taken, as the records keep
the max over ranks. Not covered (None: the estimator's additive model applies): adapters, offload, users'
own configs, CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.estimate.allocator import CachingAllocator
from bench.estimate.prediction import CALIBRATION
from bench.estimate.states import optimizer_state_bytes
from bench.estimate.terms import compute_bytes, converts_outputs_to_fp32, residual_bytes
from bench.matrix import CellSettings
from bench.models import ModelShape, has_local_weights
from bench.precision import policy_for
from bench.strategies import Strategy, is_user_config

COMPUTE = "compute"
DS_REDUCE_BUCKET = 500_000_000  # reduce_bucket_size of the generated DeepSpeed JSON (bench/plan.py), elements
ZERO3_SUB_GROUP = 1_000_000_000  # DeepSpeed's zero_optimization.sub_group_size default, elements
DDP_BUCKET_BYTES = 25 << 20  # torch DDP bucket_cap_mb default
DDP_FIRST_BUCKET_BYTES = 1 << 20  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
DDP_BROADCAST_BUCKET_BYTES = 250 << 20  # DDP's _sync_module_states broadcast_bucket_size
STEPS = 3  # the first step creates the optimizer states; the next two see where they landed


@dataclass(frozen=True)
class Replay:
    """Bytes, one rank."""

    peak_reserved: int
    peak_allocated: int
    peak_phase: str  # where the allocated peak was: "forward", "backward", "backward (layers)", "optimizer step"
    build_peak_allocated: int  # the most allocated before the first step (the record's build peak)
    reserved_after_prepare: int  # torch.cuda.memory_reserved before the first step


def covers(cell: CellSettings, strategy: Strategy | None) -> bool:
    """Cells whose allocations are written down here: full fine-tuning on CUDA from a random init (local
    weights load another way), no offload but ZeRO-1/2's optimizer offload, catalogue strategies (a user's
    config may set anything)."""
    return (strategy is not None and cell.device == "cuda" and cell.adapter.type == "none"
            and (not strategy.offloads or zero12_optimizer_offload(strategy)) and not is_user_config(cell.strategy)
            and not has_local_weights(cell.model)
            and strategy.family in ("single", "ddp", "deepspeed", "fsdp", "fsdp2"))


def zero12_optimizer_offload(strategy: Strategy) -> bool:
    return (strategy.family == "deepspeed" and (strategy.zero_stage or 0) < 3 and strategy.offload_optimizer
            and not strategy.offload_params)


def replay(cell: CellSettings, shape: ModelShape, strategy: Strategy, calib=None) -> Replay | None:
    """The replay of the rank with the highest reserved peak (the records keep the max over ranks). Ranks
    differ where they hold different parts of the model: ZeRO-1/2's partitions (rank 0 holds the
    embedding) and FSDP1's flat shards; FSDP2 splits every parameter evenly and DDP replicates."""
    if not covers(cell, strategy):
        return None
    differs = strategy.family == "fsdp" or (strategy.family == "deepspeed" and (strategy.zero_stage or 0) < 3)
    ranks = range(cell.gpus) if differs else range(1)
    runs = [_Run(cell, shape, strategy, rank, calib).replay() for rank in ranks]
    return max(runs, key=lambda r: (r.peak_reserved, r.peak_allocated))


# ---------------------------------------------------------------- the model's tensors

def layer_params(shape: ModelShape) -> list[tuple[str, int]]:
    """One decoder layer's parameters in module order: (name, elements)."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    linears = [(n, i * o) for n, (i, o) in zip(names, shape.layer_linear_shapes)]
    return linears + [("input_layernorm", shape.hidden), ("post_attention_layernorm", shape.hidden)]


def backward_order(params: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The order in which a decoder layer's weight gradients are complete: autograd runs the nodes created
    last first (down_proj, then up_proj, created after gate_proj and its activation, ...), which decides
    where ZeRO's reduce buckets are cut."""
    order = ("down_proj", "up_proj", "gate_proj", "post_attention_layernorm", "o_proj", "v_proj", "k_proj",
             "q_proj", "input_layernorm")
    sizes = dict(params)
    return [(name, sizes[name]) for name in order]


def root_params(shape: ModelShape) -> list[tuple[str, int]]:
    """The parameters outside the decoder layers: FSDP's root unit."""
    out = [("embed_tokens", shape.embedding_params), ("norm", shape.hidden)]
    if shape.lm_head_params:
        out.append(("lm_head", shape.lm_head_params))
    return out


def model_params(shape: ModelShape) -> list[tuple[str, int]]:
    """All parameters in ``model.parameters()`` order."""
    out = [("embed_tokens", shape.embedding_params)]
    for layer in range(shape.layers):
        out += [(f"layers.{layer}.{n}", k) for n, k in layer_params(shape)]
    out.append(("norm", shape.hidden))
    if shape.lm_head_params:
        out.append(("lm_head", shape.lm_head_params))
    return out


def layer_activations(shape: ModelShape, tokens: int, c: int, r: int) -> list[tuple[str, int]]:
    """The tensors one decoder layer saves for backward (bytes), the terms of
    estimate.activations.layer_bytes_per_token (full fine-tuning) one by one."""
    h, q = shape.hidden, shape.heads * shape.head_dim
    kv, inter = shape.kv_heads * shape.head_dim, shape.intermediate
    out = []
    for norm in ("input", "post"):
        out += [(f"{norm}_norm_fp32", 4 * h), (f"{norm}_norm_out", r * h)]
        if r != c:
            out.append((f"{norm}_norm_cast", c * h))
        if norm == "input":
            out += [("q", c * q), ("k", c * kv), ("v", c * kv), ("sdpa_out", c * q), ("sdpa_lse", 4 * shape.heads),
                    ("o_proj_in", c * q)]
        else:
            out += [("gate", c * inter), ("silu", c * inter), ("up", c * inter), ("down_proj_in", c * inter)]
    return [(n, b * tokens) for n, b in out]


def backward_temporaries(acts: list[tuple[str, int]], fraction: float) -> list[tuple[str, int]]:
    """A layer's backward temporaries (gradients of its activations), ``fraction`` of its activations, taken
    largest first: the calibration constant backward_temp_fraction, as tensors."""
    budget, out = fraction * sum(b for _, b in acts), []
    for name, size in sorted(acts, key=lambda t: -t[1]):
        if budget <= 0:
            break
        out.append((f"grad_{name}", size))
        budget -= size
    return out


# ---------------------------------------------------------------- the replay

class _Run:
    def __init__(self, cell: CellSettings, shape: ModelShape, strategy: Strategy, rank: int = 0, calib=None):
        self.cell, self.shape, self.strategy = cell, shape, strategy
        self.mem = CachingAllocator()
        self.n, self.rank = cell.gpus, rank
        self.tokens = cell.train.seq_len * cell.train.micro_batch
        self.c = compute_bytes(cell)
        self.r = residual_bytes(cell, strategy)
        self.out_bytes = 4 if converts_outputs_to_fp32(cell, strategy) else self.c
        self.autocast_copies = policy_for(cell).name == "autocast"
        self.family = strategy.family
        self.ds = self.family == "deepspeed"
        self.stage = strategy.zero_stage or 0
        self.ds_offload = zero12_optimizer_offload(strategy)  # fp32 master, states, gradients and step on the host
        self.fsdp1 = self.family == "fsdp"
        self.no_shard = self.fsdp1 and (strategy.fsdp_sharding == "NO_SHARD" or self.n == 1)
        self.checkpointing = cell.train.grad_checkpointing
        self.temp_fraction = (calib or CALIBRATION).backward_temp_fraction
        self.acts = layer_activations(shape, self.tokens, self.c, self.r)
        self.temps = backward_temporaries(self.acts, self.temp_fraction)
        self.step_index = 0
        self.event = 0  # FSDP1's reshard events, in issue order
        self.bucket_fill = 0  # ZeRO-3's reduce bucket, elements
        self.free_events: list[int] = []  # FSDP1's _free_event_queue

    # ------------------------------------------------------------ helpers

    def alloc(self, name: str, size: float, stream: str = COMPUTE) -> None:
        if size > 0:
            self.mem.malloc(name, int(size), stream)

    def free(self, name: str) -> None:
        if self.mem.live(name):
            self.mem.free(name)

    def free_all(self, prefix: str) -> None:
        self.mem.free_prefix(prefix)

    def replay(self) -> Replay:
        self.mem.phase = "build"
        self.build()
        build_peak, reserved_after = self.mem.peak_allocated, self.mem.reserved
        for _ in range(STEPS):
            self.train_step()
            self.step_index += 1
        return Replay(self.mem.peak_reserved, self.mem.peak_allocated, self.mem.peak_allocated_phase, build_peak,
                      reserved_after)

    # ------------------------------------------------------------ build and prepare

    def build(self) -> None:
        if self.family in ("single", "ddp"):
            self.build_on_device({"float32": 4, "bfloat16": 2, "float16": 2}[policy_for(self.cell).weight_dtype])
            if self.n > 1:
                self.ddp_prepare()
        elif self.ds and self.stage < 3:
            self.build_on_device(self.c)
            self.zero12_prepare()
        elif self.ds:
            self.zero3_prepare()
        elif self.fsdp1:
            self.fsdp1_meta_build()
        else:
            self.fsdp2_meta_build()

    def build_on_device(self, nbytes: int) -> None:
        """``from_config`` under a device context: one tensor per parameter. With tied embeddings the LM
        head is first built untied and dropped by tie_weights (the records' build peak shows it)."""
        for name, numel in model_params(self.shape):
            self.alloc(f"param:{name}", nbytes * numel)
        if self.shape.tied_embeddings:
            self.alloc("untied_lm_head", nbytes * self.shape.embedding_params)
            self.free("untied_lm_head")

    def ddp_prepare(self) -> None:
        """DDP's constructor: rank 0's parameters broadcast in flat chunks of up to 250 MiB (a larger tensor
        is sent as it is), then the Reducer's gradient buckets (gradient_as_bucket_view=False), filled in
        reverse parameter order, 1 MiB first then 25 MiB, a larger tensor alone in its bucket."""
        params = model_params(self.shape)
        chunk, i = 0, 0
        for _, numel in params:
            size = 4 * numel
            if size >= DDP_BROADCAST_BUCKET_BYTES:
                continue
            if chunk + size > DDP_BROADCAST_BUCKET_BYTES:
                self.alloc(f"broadcast{i}", chunk)
                self.free(f"broadcast{i}")
                chunk, i = 0, i + 1
            chunk += size
        self.alloc(f"broadcast{i}", chunk)
        self.free(f"broadcast{i}")
        cap, filled, i = DDP_FIRST_BUCKET_BYTES, 0, 0
        for _, numel in reversed(params):
            size = 4 * numel
            if filled and filled + size > cap:
                self.alloc(f"ddp_bucket{i}", filled)
                filled, cap, i = 0, DDP_BUCKET_BYTES, i + 1
            filled += size
        self.alloc(f"ddp_bucket{i}", filled)

    def zero12_prepare(self) -> None:
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

    def fsdp1_units(self) -> list[tuple[str, list[tuple[str, int]]]]:
        """FSDP1's wrapping units in the order they are wrapped: the decoder layers, then the root."""
        units = [(f"layer{i}", layer_params(self.shape)) for i in range(self.shape.layers)]
        return units + [("root", root_params(self.shape))]

    def fsdp1_meta_build(self) -> None:
        """FSDP1 with param_init_fn on a meta model: each unit materialised whole (fp32, one tensor per
        parameter), flattened into a FlatParameter (torch.cat), this rank's slice cloned and the full flat
        parameter freed (FlatParamHandle.shard), then the originals (the module drops them once its
        parameters are views of the shard): (2 + 1/N) x the unit at once, as meta_init.build_peak_bytes.
        NO_SHARD keeps the flat parameter whole."""
        for unit, params in self.fsdp1_units():
            numel = sum(k for _, k in params)
            for name, k in params:
                self.alloc(f"materialised:{name}", 4 * k)
            self.alloc(f"flat_full:{unit}", 4 * numel)
            if self.no_shard:
                self.mem.rename(f"flat_full:{unit}", f"flat:{unit}")
            else:
                self.alloc(f"flat:{unit}", 4 * numel / self.n)
                self.free(f"flat_full:{unit}")
            self.free_all("materialised:")

    def fsdp2_meta_build(self) -> None:
        """FSDP2: fully_shard on meta, then each parameter's local shard allocated and initialised."""
        for name, numel in model_params(self.shape):
            self.alloc(f"shard:{name}", 4 * numel / self.n)

    def zero3_prepare(self) -> None:
        """DeepSpeed ZeRO-3 (stage3.py): zero.Init built each parameter and kept only its partition;
        defragment moves the partitions to the host, calls empty_cache and copies them back as one flat
        16-bit buffer; _create_fp32_partitions upcasts it (.to(fp32), then .clone(): the first copy is
        dropped); initialize_optimizer_states zeroes an fp32 gradient partition and drops it; then the
        reduce bucket (ipg buffer) and the flat 16-bit gradient partition, both kept. The fp32 work goes by
        sub-group (zero3_sub_groups)."""
        part = self.shape.params / self.n
        self.alloc("ds_flat_params", self.c * part)
        for i, numel in enumerate(self.zero3_sub_groups()):
            self.alloc("ds_fp32_converted", 4 * numel)
            self.alloc(f"ds_fp32_partition{i}", 4 * numel)
            self.free("ds_fp32_converted")
        self.alloc("ds_init_grad", 4 * max(self.zero3_sub_groups()))
        self.free("ds_init_grad")
        self.alloc("ds_ipg_bucket", self.c * DS_REDUCE_BUCKET)
        self.alloc("ds_grad_partitions", self.c * part)
        self.z3 = _Zero3Coordinator(self, self.shape, self.checkpointing)

    # ------------------------------------------------------------ one step

    def train_step(self) -> None:
        """bench/worker.py's train_step: forward and backward per micro-batch, synchronised after each
        backward and after the step (all deferred frees are then reusable)."""
        for _ in range(self.cell.train.grad_accum):
            self.mem.phase = "forward"
            self.forward()
            self.mem.phase = "backward"
            self.backward()
            self.mem.complete()
        self.mem.phase = "optimizer step"
        self.optimizer_step()
        self.mem.complete()
        self.free("output_logits")

    def forward(self) -> None:
        s, t = self.shape, self.tokens
        self.free("output_logits")  # the previous micro-batch's output, replaced
        if self.fsdp1:
            # use_orig_params: zero_grad drops the original parameters' gradient views; the flat sharded
            # gradient goes at the next root pre-forward (_reset_flat_param_grad_info_if_needed)
            self.free_all("grad:")
        self.unshard("root")
        self.z3_use("embed")
        self.alloc("hidden:0", self.r * s.hidden * t)
        self.z3_done("embed")
        for layer in range(s.layers):
            self.unshard(f"layer{layer}")
            self.z3_layer_forward(layer, "")
            if self.autocast_copies:
                # autocast's cache: kept until the forward ends; without checkpointing the linears also
                # save them for their backward
                kind = "autocast" if self.checkpointing else "saved_copy"
                for name, numel in layer_params(s)[:7]:
                    self.alloc(f"{kind}:{layer}.{name}", self.c * numel)
            for name, size in self.acts:
                self.alloc(f"act:{layer}.{name}", size)
            self.alloc(f"hidden:{layer + 1}", self.r * s.hidden * t)
            if self.checkpointing:  # the layer's input is all it keeps
                self.free_all(f"act:{layer}.")
            self.reshard_after_forward(f"layer{layer}")
        # final norm and the LM head's input (estimate.activations' head_in)
        self.alloc("head:norm_fp32", 4 * s.hidden * t)
        self.alloc("head:norm_out", self.r * s.hidden * t)
        if self.autocast_copies:  # the head is not checkpointed: its weight's copy is saved for its backward
            self.alloc("head:cast", self.c * s.hidden * t)
            self.alloc("saved_copy:lm_head", self.c * s.vocab * s.hidden)
        v = s.vocab * t
        self.z3_use("lm_head")
        self.alloc("logits", self.c * v)
        self.z3_done("lm_head")
        if self.c != 4:
            self.alloc("logits_fp32", 4 * v)  # ForCausalLMLoss: logits.float()
        self.alloc("log_softmax", 4 * v)  # cross_entropy saves its fp32 log-softmax
        self.free("logits_fp32")
        self.free_all("autocast:")  # leaving the outermost autocast clears its cache
        if self.out_bytes != self.c:  # accelerate's convert_outputs_to_fp32 replaces the output's logits
            self.alloc("output_logits", 4 * v)
            self.free("logits")
        else:
            self.mem.rename("logits", "output_logits")
        self.reshard_after_forward("root")

    def backward(self) -> None:
        s, t, v = self.shape, self.tokens, self.shape.vocab * self.tokens
        self.unshard("root")  # FSDP1 NO_SHARD freed the root's 16-bit copy after the forward
        self.z3_use("lm_head~b")
        self.alloc("grad_log_softmax", 4 * v)  # nll_loss backward
        self.alloc("grad_logits_fp32", 4 * v)  # log_softmax backward
        self.free("grad_log_softmax")
        self.free("log_softmax")
        if self.c != 4:
            self.alloc("grad_logits", self.c * v)  # the upcast's backward
            self.free("grad_logits_fp32")
        self.alloc("grad_hidden", self.r * s.hidden * t)
        self.weight_grad("lm_head", s.vocab * s.hidden, tied=s.tied_embeddings)
        self.free("saved_copy:lm_head")
        self.z3_done("lm_head~b")
        self.free("grad_logits")
        self.free("grad_logits_fp32")
        self.free_all("head:")
        self.mem.phase = "backward (layers)"
        for layer in reversed(range(s.layers)):
            self.unshard(f"layer{layer}")
            if layer > 0:
                self.prefetch(f"layer{layer - 1}")
            if self.checkpointing:  # the recompute: autocast copies live as long as the graph saving them
                self.z3_layer_forward(layer, "~r")
                if self.autocast_copies:
                    for name, numel in layer_params(s)[:7]:
                        self.alloc(f"autocast:{name}", self.c * numel)
                for name, size in self.acts:
                    self.alloc(f"act:{layer}.{name}", size)
            for name, size in self.temps:
                self.alloc(f"temp:{name}", size)
            for name, numel in backward_order(layer_params(s)):
                self.z3_use(f"{layer}.{name}~b")
                self.weight_grad(f"layers.{layer}.{name}", numel)
                self.z3_done(f"{layer}.{name}~b")
            self.free_all("temp:")
            self.free_all(f"act:{layer}.")
            self.free_all("autocast:")
            self.free_all(f"saved_copy:{layer}.")
            self.alloc("grad_hidden_next", self.r * s.hidden * t)
            self.free("grad_hidden")
            self.mem.rename("grad_hidden_next", "grad_hidden")
            self.free(f"hidden:{layer + 1}")
            self.post_backward(f"layer{layer}")
        self.z3_use("embed~b")
        self.weight_grad("embed_tokens", s.embedding_params, embedding=True)
        self.z3_done("embed~b")
        self.weight_grad("norm", s.hidden)
        self.free("grad_hidden")
        self.free("hidden:0")
        self.post_backward("root")
        self.backward_epilogue()

    # ------------------------------------------------------------ strategy hooks

    def unshard(self, unit: str) -> None:
        """Gather a unit's parameters in the compute dtype (FSDP)."""
        if self.fsdp1:
            self.fsdp1_unshard(unit)
        elif self.family == "fsdp2":  # on one rank too: the 16-bit copies come from a one-rank all-gather
            self.fsdp2_unshard(unit)

    def prefetch(self, unit: str) -> None:
        """FSDP1 BACKWARD_PRE and FSDP2's default backward prefetch: the next unit's gather is issued before
        this one's gradients are computed."""
        if self.family in ("fsdp", "fsdp2"):
            self.unshard(unit)

    def reshard_after_forward(self, unit: str) -> None:
        if unit == "root":  # FSDP keeps the root gathered for the backward that follows at once
            if self.fsdp1 and self.no_shard:
                self.defer_free("mp_shard:root")
            return
        if self.fsdp1:
            if self.no_shard:
                self.defer_free(f"mp_shard:{unit}")  # post_reshard frees NO_SHARD's low-precision copy
            elif self.strategy.fsdp_sharding != "SHARD_GRAD_OP":
                self.fsdp1_reshard(unit)
        elif self.family == "fsdp2" and self.strategy.reshard_after_forward is not False:
            self.free_all(f"unsharded:{unit}.")

    @staticmethod
    def unit_of(key: str) -> str:
        """The FSDP unit holding a parameter: its decoder layer, or the root."""
        return f"layer{key.split('.')[1]}" if key.startswith("layers.") else "root"

    def unit_params(self, unit: str) -> list[tuple[str, int]]:
        return root_params(self.shape) if unit == "root" else layer_params(self.shape)

    def unit_numel(self, unit: str) -> int:
        return sum(k for _, k in self.unit_params(unit))

    def keep_first_sharded_grad(self, unit: str, first: bool) -> None:
        """The new fp32 gradient becomes the unit's sharded gradient on the first backward; later ones are
        accumulated into it and dropped."""
        if first:
            self.mem.rename(f"grad_fp32_new:{unit}", f"grad:{unit}")
        else:
            self.free(f"grad_fp32_new:{unit}")

    def fsdp1_unshard(self, unit: str) -> None:
        """FlatParamHandle: the low-precision shard is made on the pre-unshard stream; the padded unsharded
        flat parameter is allocated on the unshard stream and all-gathered; the shard copy is then freed.
        NO_SHARD: the low-precision copy of the whole unit is the unsharded parameter (kept until reshard)."""
        numel = self.unit_numel(unit)
        if self.no_shard:
            if not self.mem.live(f"mp_shard:{unit}"):
                self.alloc(f"mp_shard:{unit}", self.c * numel, "pre_unshard")
            return
        if self.mem.live(f"unsharded:{unit}"):
            return
        if len(self.free_events) >= 2:  # limit_all_gathers: wait for the reshard two back
            self.mem.complete(self.free_events.pop(0))
        self.alloc(f"mp_shard:{unit}", self.c * numel / self.n, "pre_unshard")
        self.alloc(f"unsharded:{unit}", self.c * numel, "unshard")
        self.defer_free(f"mp_shard:{unit}")

    def fsdp1_reshard(self, unit: str) -> None:
        """Free the unsharded flat parameter (after the compute that used it: record_stream) and record the
        event FSDP1's rate limiter waits on."""
        self.defer_free(f"unsharded:{unit}")
        self.event += 1
        self.free_events.append(self.event)

    def defer_free(self, name: str) -> None:
        """FSDP1 frees blocks used on other streams through record_stream: reusable once the GPU has run
        that work. The GPU is taken to be as far behind as FSDP1 lets it be: the rate limiter
        (limit_all_gathers) makes the CPU wait, before an all-gather, for the reshard two reshards back;
        nothing else waits until the worker synchronises after the backward and after the step."""
        if self.mem.live(name):
            self.mem.free(name, until=self.event + 1)

    def fsdp2_unshard(self, unit: str) -> None:
        """foreach_all_gather: on the copy-in stream a flat copy of the shards and the all-gather output
        (world x shards); the copy-out allocates each parameter's unsharded tensor on the compute stream;
        then the copy-in buffers are dropped."""
        params = self.unit_params(unit)
        if any(self.mem.live(f"unsharded:{unit}.{name}") for name, _ in params):
            return
        numel = sum(k for _, k in params)
        self.alloc(f"ag_input:{unit}", self.c * numel / self.n, "ag_copy_in")
        self.alloc(f"ag_output:{unit}", self.c * numel, "ag_copy_in")
        self.free(f"ag_input:{unit}")
        for name, k in params:
            self.alloc(f"unsharded:{unit}.{name}", self.c * k)
        self.free(f"ag_output:{unit}")

    def backward_epilogue(self) -> None:
        if self.ds and self.stage < 3:
            self.zero12_epilogue()
        elif self.ds:
            self.zero3_reduce_bucket()
            self.z3.end_of_pass()

    # ------------------------------------------------------------ ZeRO-3

    def z3_use(self, module: str) -> None:
        if self.ds and self.stage == 3 and self.n > 1 and module in self.z3.step_of:
            self.z3.fetch(module)

    def z3_done(self, module: str) -> None:
        if self.ds and self.stage == 3 and self.n > 1 and module in self.z3.step_of:
            self.z3.release(module)

    def z3_layer_forward(self, layer: int, suffix: str) -> None:
        """A decoder layer's linears, one after the other: gathered before, released after (the norms are
        below stage3_param_persistence_threshold: kept whole)."""
        for name, _ in layer_params(self.shape)[:7]:
            self.z3_use(f"{layer}.{name}{suffix}")
            self.z3_done(f"{layer}.{name}{suffix}")

    def zero3_grad(self, src: str, numel: int) -> None:
        """reduce_ready_partitions_and_remove_grads: the gradient is copied into the (kept) reduce bucket and
        freed; a bucket that cannot take it is reduced first."""
        if self.bucket_fill + numel > DS_REDUCE_BUCKET:
            self.zero3_reduce_bucket()
        self.bucket_fill += numel
        self.free(src)

    def zero3_reduce_bucket(self) -> None:
        """__reduce_and_partition_ipg_grads on its own stream: reduce_scatter_coalesced interleaves the
        bucket's gradients into one flat buffer (torch.cat), this rank's part is copied into the gradient
        partition buffer, the flat buffer is dropped."""
        if self.bucket_fill and self.n > 1:
            self.alloc("ds_reduce_scatter_flat", self.c * self.bucket_fill, "reduce_and_partition")
            self.free("ds_reduce_scatter_flat")
        self.bucket_fill = 0

    def zero3_step(self) -> None:
        """stage3.step: every gathered parameter released (_partition_all_parameters); the gradient norm
        (each parameter's partition upcast to fp64 in turn); the partition's 16-bit gradients flattened and
        upcast to fp32 (_prepare_fp32_grad_for_sub_group); the optimizer; the fp32 gradient dropped."""
        if self.n > 1:
            self.z3.release_all()
        self.alloc("ds_norm_fp64", 8 * max(k for _, k in model_params(self.shape)) / self.n)
        self.free("ds_norm_fp64")
        for i, numel in enumerate(self.zero3_sub_groups()):
            self.alloc("ds_flat_grad", self.c * numel)
            self.alloc("ds_fp32_grad", 4 * numel)
            self.free("ds_flat_grad")
            self.adam_states([(f"fp32_partition{i}", numel)])
            self.free("ds_fp32_grad")

    def zero3_sub_groups(self) -> list[float]:
        """Partition elements of each optimizer sub-group (stage3._create_fp16_sub_groups): parameters in
        order, a group closed once it reaches sub_group_size (DeepSpeed's default 1e9): the fp32 copies,
        gradients and the step go one sub-group at a time."""
        groups, current = [], 0.0
        for _, numel in model_params(self.shape):
            current += -(-numel // self.n)
            if current >= ZERO3_SUB_GROUP:
                groups.append(current)
                current = 0.0
        return groups + ([current] if current else [])

    def weight_grad(self, name: str, numel: int, tied: bool = False, embedding: bool = False) -> None:
        """One parameter's gradient, computed in the compute dtype (the weight's dtype under FSDP/DeepSpeed,
        autocast's 16-bit copy under DDP)."""
        key = "embed_tokens" if tied or embedding else name
        if embedding and self.mem.live("grad_tied:embed_tokens"):
            # the tied weight's two gradients meet in autograd's input buffer: summed in place
            g = 4 if self.autocast_copies else self.c
            self.alloc("grad_new:embed_tokens", g * numel)
            self.free("grad_new:embed_tokens")
            self.grad_ready(key, numel, from_buffer=True)
            return
        self.alloc(f"grad_new:{key}", self.c * numel)
        if self.autocast_copies:  # the cast's backward upcasts to the fp32 weight's dtype
            self.alloc(f"grad_fp32:{key}", 4 * numel)
            self.free(f"grad_new:{key}")
            self.mem.rename(f"grad_fp32:{key}", f"grad_new:{key}")
        if tied:
            self.mem.rename(f"grad_new:{key}", "grad_tied:embed_tokens")
            return
        self.grad_ready(key, numel)

    def grad_ready(self, key: str, numel: int, from_buffer: bool = False) -> None:
        """The parameter's gradient is complete (``grad_new:<key>`` or the tied buffer)."""
        src = "grad_tied:embed_tokens" if from_buffer else f"grad_new:{key}"
        if self.family in ("single", "ddp"):
            if not self.mem.live(f"grad:{key}"):  # AccumulateGrad steals the first gradient
                self.mem.rename(src, f"grad:{key}")
            else:
                self.free(src)
        elif self.ds and self.stage < 3:
            self.zero12_grad(key, src, numel)
        elif self.ds:
            self.zero3_grad(src, numel)
        else:  # FSDP: the unit's gradients are reduced in its post-backward hook
            self.mem.rename(src, f"unit_grad:{self.unit_of(key)}:{key}")

    def post_backward(self, unit: str) -> None:
        if self.fsdp1:
            self.fsdp1_post_backward(unit)
        elif self.family == "fsdp2":
            self.fsdp2_post_backward(unit)

    def fsdp1_post_backward(self, unit: str) -> None:
        """The views' gradients are concatenated into the flat parameter's (SplitWithSizesBackward), then on
        the post-backward stream: reduce-scatter into a new 16-bit shard, upcast to fp32 (the sharded
        gradient, kept until the next forward), the 16-bit shard and the unsharded gradient freed; the unit is
        resharded. NO_SHARD all-reduces the unsharded gradient in place and upcasts all of it."""
        numel = self.unit_numel(unit)
        self.alloc(f"flat_grad:{unit}", self.c * numel)
        self.free_all(f"unit_grad:{unit}:")
        first = not self.mem.live(f"grad:{unit}")
        if self.no_shard:
            self.alloc(f"grad_fp32_new:{unit}", 4 * numel, "post_backward")
        else:
            self.alloc(f"rs_out:{unit}", self.c * numel / self.n, "post_backward")
            self.alloc(f"grad_fp32_new:{unit}", 4 * numel / self.n, "post_backward")
            self.free(f"rs_out:{unit}")
        self.keep_first_sharded_grad(unit, first)
        self.defer_free(f"flat_grad:{unit}")
        if self.no_shard:
            self.defer_free(f"mp_shard:{unit}")
        else:
            self.fsdp1_reshard(unit)

    def fsdp2_post_backward(self, unit: str) -> None:
        """foreach_reduce: the reduce-scatter input (the group's gradients copied into one 16-bit buffer,
        compute stream) is kept until the next group's reduce-scatter; the output shard is made on the
        reduce-scatter stream and upcast there to fp32 (the sharded gradients, kept until zero_grad); the
        unsharded gradients and parameters are freed."""
        numel = self.unit_numel(unit)
        previous = self.mem.live_names("rs_input:")
        self.alloc(f"rs_input:{unit}", self.c * numel)
        self.free_all(f"unit_grad:{unit}:")
        for name in previous:
            self.free(name)
        first = not self.mem.live(f"grad:{unit}")
        self.alloc(f"rs_out:{unit}", self.c * numel / self.n, "reduce_scatter")
        self.alloc(f"grad_fp32_new:{unit}", 4 * numel / self.n, "reduce_scatter")
        self.free(f"rs_out:{unit}")
        self.keep_first_sharded_grad(unit, first)
        self.free_all(f"unsharded:{unit}.")
        if unit == "root":
            self.free_all("rs_input:")

    # ------------------------------------------------------------ ZeRO-1/2

    def zero12_grad(self, key: str, src: str, numel: int) -> None:
        """The gradient hook: on the first one, setup_buckets allocates the two reduce buckets (overlap_comm);
        each gradient is copied into the current bucket and freed; a bucket that cannot take the next
        gradient is reduced first (zero12_reduce_bucket)."""
        if not self.mem.live("ds_bucket0"):
            self.alloc("ds_bucket0", self.c * DS_REDUCE_BUCKET)
            self.alloc("ds_bucket1", self.c * DS_REDUCE_BUCKET)
        if sum(k for _, k in self.bucket) + numel > DS_REDUCE_BUCKET:
            self.zero12_reduce_bucket()
        self.bucket.append((key, numel))
        self.free(src)

    def zero12_reduce_bucket(self) -> None:
        """reduce_ipg_grads on the reduction stream: average_tensor all-reduces the bucket's slices, one per
        owning rank, through allreduce_bucket's flatten (use_multi_rank_bucket_allreduce): a copy of the
        bucket where it spans two partitions (flatten of a single tensor is a view). Then
        copy_grads_in_partition copies this rank's gradients into grads_in_partition, allocated there at its
        first use: early in the backward on the ranks holding the last layers, at its end on rank 0."""
        if len({r for key, _ in self.bucket for r in self.owners[key]}) > 1:
            self.alloc("ds_allreduce_flat", self.c * sum(k for _, k in self.bucket), "reduction")
            self.free("ds_allreduce_flat")
        if self.ds_offload:
            self.zero12_offload_grads()
        elif any(key in self.mine for key, _ in self.bucket) and not self.mem.live("ds_grads_in_partition"):
            self.alloc("ds_grads_in_partition", self.c * self.partition(), "reduction")
        self.bucket = []

    def zero12_offload_grads(self) -> None:
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

    def zero12_epilogue(self) -> None:
        """independent_gradient_partition_epilogue: the last bucket reduced, the buckets released (the
        partition's gradients stay, as views, until the step)."""
        self.zero12_reduce_bucket()
        self.free("ds_bucket0")
        self.free("ds_bucket1")

    # ------------------------------------------------------------ the optimizer step

    def optimizer_step(self) -> None:
        if self.ds and self.stage < 3:
            self.zero12_step()
        elif self.ds:
            self.zero3_step()
        elif self.family in ("single", "ddp"):
            self.adam_states([(n, k) for n, k in model_params(self.shape)])
            self.free_all("grad:")
        elif self.fsdp1:
            self.adam_states(self.fsdp1_pieces())
        elif self.family == "fsdp2":
            self.adam_states([(n, k / self.n) for n, k in model_params(self.shape)])
            self.free_all("grad:")

    def adam_states(self, pieces: list[tuple[str, float]]) -> None:
        """The optimizer's step over its tensors: exp_avg and exp_avg_sq per tensor at the first step (fp32,
        or bitsandbytes' 8-bit states), and for foreach AdamW (adamw_torch) the sqrt(v) of every tensor at
        once (_multi_tensor_adamw: torch._foreach_sqrt), freed when the step ends."""
        if self.step_index == 0:
            per_state = optimizer_state_bytes(self.cell.train.optimizer) / 2
            for name, numel in pieces:
                self.alloc(f"exp_avg:{name}", per_state * numel)
                self.alloc(f"exp_avg_sq:{name}", per_state * numel)
        if self.cell.train.optimizer == "adamw_torch":
            for name, numel in pieces:
                self.alloc(f"adam_sqrt:{name}", 4 * numel)
            self.free_all("adam_sqrt:")

    def fsdp1_pieces(self) -> list[tuple[str, float]]:
        """use_orig_params: the optimizer holds each original parameter's part of this rank's flat shard,
        the rank-th 1/N of each unit's flat parameter (all of it under NO_SHARD)."""
        out = []
        for unit, params in self.fsdp1_units():
            size = sum(k for _, k in params) / (1 if self.no_shard else self.n)
            lo = 0 if self.no_shard else self.rank * size
            offset = 0
            for name, k in params:
                part = min(lo + size, offset + k) - max(lo, offset)
                offset += k
                if part > 0:
                    out.append((f"{unit}.{name}", part))
        return out

    def zero12_step(self) -> None:
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


class _Zero3Coordinator:
    """DeepSpeed ZeRO-3's PartitionedParameterCoordinator, per module (each linear; the norms are
    persistent), as partitioned_param_coordinator.py runs it:

    * the first pass records the module order and releases every parameter after its module;
    * from then on (a complete trace) each fetch also prefetches the parameters used next, up to
      stage3_prefetch_bucket_size elements and as long as the gathered total stays under
      stage3_max_live_parameters; after a module, a parameter stays gathered if the trace uses it again
      within stage3_max_reuse_distance elements, or if a prefetch already walked past its next use.

    A gather (all_gather_coalesced) allocates one flat buffer on the all-gather stream (world x the
    partitions); when the parameters are waited for, each is concatenated into its own 16-bit tensor on the
    compute stream and the flat buffer is dropped. DeepSpeed's defaults, which the generated JSON keeps."""

    PREFETCH_BUCKET = 500_000_000  # stage3_prefetch_bucket_size (bench/plan.py)
    MAX_LIVE = 1_000_000_000  # stage3_max_live_parameters (DeepSpeed default)
    MAX_REUSE = 1_000_000_000  # stage3_max_reuse_distance (DeepSpeed default)

    def __init__(self, run: _Run, shape: ModelShape, checkpointing: bool):
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
        self.run.alloc(name, self.run.c * sum(self.numel[p] for p in params), "allgather")
        for p in params:
            self.inflight[p] = name
            self.n_available += self.numel[p]

    def _wait(self, gather: str) -> None:
        for p in [p for p, g in self.inflight.items() if g == gather]:
            del self.inflight[p]
            self.run.alloc(f"z3_param:{p}", self.run.c * self.numel[p])
            self.available.add(p)
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
