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

Sizes come from the estimator's own terms (bench/estimate/activations.py, bench/spec/models.py); the constants
are the frameworks' defaults and the generated configs' settings (bucket sizes, prefetch and live-parameter
limits). Tensors of a few MiB (norm statistics, scalars) are left out: they fit into cached blocks. The ranks
that differ (ZeRO-1/2 partitions, FSDP1 shards) are each replayed and the highest taken, as the records keep
the max over ranks. FSDP2 with context parallelism is replayed at the rank's share of the sequence, its states
over dp_shard x cp, with ring attention's transients in each layer's attention (tensors.py); tensor parallelism
alone at one rank's slices with the head's gather (tp.py). Not covered (None: the estimator's additive model
applies): adapters, offload (but ZeRO-1/2's optimizer offload and FSDP2's CPU offload), FSDP2 + tensor
parallelism, users' own configs, CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.estimate.activations import liger_chunk_tokens
from bench.estimate.allocator import CachingAllocator
from bench.estimate.prediction import CALIBRATION
from bench.estimate.parallel import rank_seq_len, shard_ranks
from bench.estimate.replay.tensors import (backward_order, backward_temporaries, layer_activations, layer_params,
                                          model_params, ring_attention_backward, ring_attention_forward)
from bench.estimate.states import optimizer_state_bytes
from bench.estimate.terms import compute_bytes, converts_outputs_to_fp32, residual_bytes
from bench.spec import CellSettings
from bench.spec.models import ModelShape
from bench.strategies.precision import policy_for
from bench.strategies import Strategy

COMPUTE = "compute"
UNSAVED_LIVE = 3  # a checkpointed layer's forward: its tensors live at once (Run.unsaved_forward)
STEPS = 3  # the first step creates the optimizer states; the next two see where they landed


@dataclass(frozen=True)
class Replay:
    """Bytes, one rank."""

    peak_reserved: int
    peak_allocated: int
    peak_phase: str  # where the allocated peak was: "forward", "backward", "backward (layers)", "optimizer step"
    build_peak_allocated: int  # the most allocated before the first step (the record's build peak)
    reserved_after_prepare: int  # torch.cuda.memory_reserved before the first step


class Run:
    """One rank's replay. The steps every framework shares are written here; a framework's subclass
    (ddp.py, zero12.py, zero3.py, fsdp1.py, fsdp2.py) fills in the hooks: how it builds and prepares the
    model, what it gathers and frees around a unit, where a finished gradient goes, and its optimizer step.
    ``handles`` says which strategies a subclass replays, from the strategy's attributes."""

    # The stream the tied embedding's two gradients are summed on (sum_tied_grads).
    TIED_SUM_STREAM = COMPUTE

    ranks_differ = False  # whether ranks hold different parts of the model (then each is replayed)
    replays_tensor_split = False  # whether a tensor-parallel rank's layout is written down (tp.py)

    @classmethod
    def handles(cls, strategy: Strategy) -> bool:
        return False

    @classmethod
    def replays_offload(cls, strategy: Strategy) -> bool:
        """Whether the replay covers this strategy's offload (only ZeRO-1/2's optimizer offload)."""
        return False

    def __init__(self, cell: CellSettings, shape: ModelShape, strategy: Strategy, rank: int = 0, calib=None):
        self.cell, self.shape, self.strategy = cell, shape, strategy
        self.mem = CachingAllocator()
        # the ranks the states are split over (FSDP2 under context parallelism: dp_shard x cp), and the tokens one
        # rank's forward sees (context parallelism splits every sequence before the model: seq / cp)
        self.n, self.rank = shard_ranks(cell, strategy), rank
        self.tokens = rank_seq_len(cell, strategy) * cell.train.micro_batch
        self.c = compute_bytes(cell)
        self.r = residual_bytes(cell, strategy)
        self.out_bytes = 4 if converts_outputs_to_fp32(cell, strategy) else self.c
        self.fused_loss = cell.train.kernels == "liger"  # Liger's fused linear cross-entropy: no full logits
        self.autocast_copies = policy_for(cell).name == "autocast"
        self.checkpointing = cell.train.grad_checkpointing
        self.temp_fraction = (calib or CALIBRATION).backward_temp_fraction
        self.acts = layer_activations(shape, self.tokens, self.c, self.r)
        self.temps = backward_temporaries(self.acts, self.temp_fraction)
        self.ring_forward = ring_attention_forward(shape, self.tokens, strategy.cp, self.c)
        self.ring_backward = ring_attention_backward(shape, self.tokens, strategy.cp, self.c)
        self.step_index = 0

    # ------------------------------------------------------------ helpers

    def alloc(self, name: str, size: float, stream: str = COMPUTE) -> None:
        if size > 0:
            self.mem.malloc(name, int(size), stream)

    def free(self, name: str) -> None:
        if self.mem.live(name):
            self.mem.free(name)

    def free_all(self, prefix: str) -> None:
        self.mem.free_prefix(prefix)

    def transients(self, prefix: str, tensors: list[tuple[str, int]]) -> None:
        """Tensors made one after the other and all freed together when the op returns."""
        for name, size in tensors:
            self.alloc(f"{prefix}:{name}", size)
        self.free_all(f"{prefix}:")

    def replay(self) -> Replay:
        self.mem.phase = "build"
        self.build()
        build_peak, reserved_after = self.mem.peak_allocated, self.mem.reserved
        for _ in range(STEPS):
            self.train_step()
            self.step_index += 1
        return Replay(self.mem.peak_reserved, self.mem.peak_allocated, self.mem.peak_allocated_phase, build_peak,
                      reserved_after)

    # ------------------------------------------------------------ build

    def build_on_device(self, nbytes: int) -> None:
        """``from_config`` under a device context: one tensor per parameter. With tied embeddings the LM
        head is first built untied and dropped by tie_weights (the records' build peak shows it)."""
        for name, numel in model_params(self.shape):
            self.alloc(f"param:{name}", nbytes * numel)
        if self.shape.tied_embeddings:
            self.alloc("untied_lm_head", nbytes * self.shape.embedding_params)
            self.free("untied_lm_head")

    # ------------------------------------------------------------ one step

    def train_step(self) -> None:
        """bench/worker/train.py's train_step: forward and backward per micro-batch, synchronised after each
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
        self.start_forward()
        self.unshard("root")
        self.use_module("embed")
        self.alloc("hidden:0", self.r * s.hidden * t)
        self.done_module("embed")
        for layer in range(s.layers):
            self.unshard(f"layer{layer}")
            self.layer_forward(layer, "")
            if self.autocast_copies:
                # autocast's cache: kept until the forward ends; without checkpointing the linears also
                # save them for their backward
                kind = "autocast" if self.checkpointing else "saved_copy"
                for name, numel in layer_params(s)[:7]:
                    self.alloc(f"{kind}:{layer}.{name}", self.c * numel)
            if self.checkpointing:  # the layer's input is all it keeps
                self.unsaved_forward(layer)
            else:
                for name, size in self.acts:
                    self.alloc(f"act:{layer}.{name}", size)
            self.transients("ring", self.ring_forward)  # context parallelism's attention (cp > 1)
            self.alloc(f"hidden:{layer + 1}", self.r * s.hidden * t)
            self.reshard_after_forward(f"layer{layer}")
        # final norm and the LM head's input (estimate.activations' head_in)
        self.alloc("head:norm_fp32", 4 * s.hidden * t)
        self.alloc("head:norm_out", self.r * s.hidden * t)
        if self.autocast_copies:  # the head is not checkpointed: its weight's copy is saved for its backward
            self.alloc("head:cast", self.c * s.hidden * t)
            # (the head's weight is shaped as the embedding's: a rank's vocabulary rows under tensor parallelism)
            self.alloc("saved_copy:lm_head", self.c * s.embedding_params)
        v = s.vocab * t
        self.use_module("lm_head")
        if self.fused_loss:
            self.fused_loss_forward()
            self.reshard_after_forward("root")
            return
        self.head_logits(v)
        self.done_module("lm_head")
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

    def head_logits(self, v: int) -> None:
        """The LM head's output, ``v`` logits in the compute dtype (tensor parallelism gathers it: tp.py)."""
        self.alloc("logits", self.c * v)

    def head_grad_output(self, name: str, v: int) -> None:
        """The logits' gradient ``name`` as the head's backward takes it (tensor parallelism: its local slice)."""

    def unsaved_forward(self, layer: int) -> None:
        """A checkpointed layer's forward saves nothing for backward (torch.utils.checkpoint): each of its
        tensors is freed once the next ops have read it, so only a few are live at a time, not the layer's
        whole set (that is the recompute's, in backward): three at most, an op's two inputs and its output
        (the MLP's SiLU(gate) and up before their product: 768 MiB on Llama-3.2-1B at 16k tokens, as in
        results/llama-full-h200-snap's memory snapshot), all gone before the residual sum, the layer's output,
        is allocated. Why it matters: the kept outputs then pack together; when they were made amid the whole
        set, the next step's spilled into the loss's freed 8 GiB segments, and the backward's fp32 logits
        gradient needed a new one (snapshot-vs-replay.md there)."""
        live: list[str] = []
        for name, size in self.acts:
            if len(live) == UNSAVED_LIVE:
                self.free(live.pop(0))
            live.append(f"act:{layer}.{name}")
            self.alloc(live[-1], size)
        self.free_all(f"act:{layer}.")

    def fused_loss_forward(self) -> None:
        """Liger's fused linear cross-entropy (liger_kernel/ops/fused_linear_cross_entropy.py): the head
        input's gradient and the fp32 per-token loss made up front, one chunk's logits at a time (in the
        head input's dtype, the residual stream's), the chunk's input gradient; the output holds no logits."""
        s, t = self.shape, self.tokens
        chunk = liger_chunk_tokens(t, s.vocab, s.hidden)
        self.alloc("fused:grad_input", self.r * s.hidden * t)
        self.alloc("fused:loss_1d", 4 * t)
        self.alloc("fused:logits_chunk", self.r * chunk * s.vocab)
        self.alloc("fused:grad_chunk", self.r * chunk * s.hidden)
        self.free("fused:grad_chunk")
        self.free("fused:logits_chunk")
        self.done_module("lm_head")
        self.free_all("autocast:")

    def backward(self) -> None:
        s, t, v = self.shape, self.tokens, self.shape.vocab * self.tokens
        self.unshard("root")  # FSDP1 NO_SHARD freed the root's 16-bit copy after the forward
        self.use_module("lm_head~b")
        if self.fused_loss:  # the head input's gradient was made in the forward: it is the backward's input
            self.mem.rename("fused:grad_input", "grad_hidden")
            self.free("fused:loss_1d")
            v = 0
        self.alloc("grad_log_softmax", 4 * v)  # nll_loss backward
        self.alloc("grad_logits_fp32", 4 * v)  # log_softmax backward
        self.free("grad_log_softmax")
        self.free("log_softmax")
        if self.c != 4:
            self.alloc("grad_logits", self.c * v)  # the upcast's backward
            self.free("grad_logits_fp32")
        if not self.fused_loss:
            self.head_grad_output("grad_logits" if self.c != 4 else "grad_logits_fp32", v)
            self.alloc("grad_hidden", self.r * s.hidden * t)
        self.weight_grad("lm_head", s.embedding_params, tied=s.tied_embeddings)  # shaped as the embedding
        self.free("saved_copy:lm_head")
        self.done_module("lm_head~b")
        self.free_all("grad_logits")
        self.free_all("head:")
        self.mem.phase = "backward (layers)"
        for layer in reversed(range(s.layers)):
            self.unshard(f"layer{layer}")
            if layer > 0:
                self.prefetch(f"layer{layer - 1}")
            if self.checkpointing:  # the recompute: autocast copies live as long as the graph saving them
                self.layer_forward(layer, "~r")
                if self.autocast_copies:
                    for name, numel in layer_params(s)[:7]:
                        self.alloc(f"autocast:{name}", self.c * numel)
                for name, size in self.acts:
                    self.alloc(f"act:{layer}.{name}", size)
                self.transients("ring", self.ring_forward)
            for name, size in self.temps:
                self.alloc(f"temp:{name}", size)
            self.transients("ring_b", self.ring_backward)
            for name, numel in backward_order(layer_params(s)):
                self.use_module(f"{layer}.{name}~b")
                self.weight_grad(f"layers.{layer}.{name}", numel)
                self.done_module(f"{layer}.{name}~b")
            self.free_all("temp:")
            self.free_all(f"act:{layer}.")
            self.free_all("autocast:")
            self.free_all(f"saved_copy:{layer}.")
            self.alloc("grad_hidden_next", self.r * s.hidden * t)
            self.free("grad_hidden")
            self.mem.rename("grad_hidden_next", "grad_hidden")
            self.free(f"hidden:{layer + 1}")
            self.post_backward(f"layer{layer}")
        self.use_module("embed~b")
        self.weight_grad("embed_tokens", s.embedding_params, embedding=True)
        self.done_module("embed~b")
        self.weight_grad("norm", s.hidden)
        self.free("grad_hidden")
        self.free("hidden:0")
        self.post_backward("root")
        self.backward_epilogue()

    def layer_forward(self, layer: int, suffix: str) -> None:
        """A decoder layer's linears, one after the other: each used (ZeRO-3 gathers it before, releases it
        after; the norms are below stage3_param_persistence_threshold: kept whole)."""
        for name, _ in layer_params(self.shape)[:7]:
            self.use_module(f"{layer}.{name}{suffix}")
            self.done_module(f"{layer}.{name}{suffix}")

    # ------------------------------------------------------------ gradients and the optimizer's states

    def weight_grad(self, name: str, numel: int, tied: bool = False, embedding: bool = False) -> None:
        """One parameter's gradient, computed in the compute dtype (the weight's dtype under FSDP/DeepSpeed,
        autocast's 16-bit copy under DDP)."""
        key = "embed_tokens" if tied or embedding else name
        if embedding and self.mem.live("grad_tied:embed_tokens"):
            # the tied weight's two gradients meet in autograd's input buffer
            g = 4 if self.autocast_copies else self.c
            self.alloc("grad_new:embed_tokens", g * numel)
            self.sum_tied_grads(g * numel)
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

    # ------------------------------------------------------------ what a framework fills in

    def start_forward(self) -> None:
        """What the framework does as a forward begins (FSDP1 drops the previous gradients' views)."""

    def use_module(self, module: str) -> None:
        """A module's parameters are about to be used (ZeRO-3 gathers them)."""

    def done_module(self, module: str) -> None:
        """A module's parameters were used (ZeRO-3 may release them)."""

    def unshard(self, unit: str) -> None:
        """Gather a unit's parameters in the compute dtype (FSDP)."""

    def prefetch(self, unit: str) -> None:
        """Issue the next unit's gather before this one's gradients are computed (FSDP)."""

    def reshard_after_forward(self, unit: str) -> None:
        """Free what a unit gathered for its forward (FSDP)."""

    def post_backward(self, unit: str) -> None:
        """A unit's gradients are complete (FSDP reduces them)."""

    def sum_tied_grads(self, size: int) -> None:
        """The embedding's gradient added to the LM head's in autograd's input buffer (``grad_tied:embed_tokens``),
        out of place: torch's engine adds with aten::add, not add_ (InputBuffer::accumulate, for a tied weight on
        torch 2.13, leaf or view), so for a moment three embedding-sized tensors are live; on the compute stream
        here, on FSDP1's unshard stream (``TIED_SUM_STREAM``, fsdp1.py, from a memory snapshot). Checked against
        every judged record: 8 of 312 predictions move, the 3B ddp x1 cell of estimate-judge-2-h200 from -5.6 %
        to -0.5 %."""
        self.alloc("grad_tied_sum", size, self.TIED_SUM_STREAM)
        self.free("grad_tied:embed_tokens")
        self.free("grad_new:embed_tokens")
        self.mem.rename("grad_tied_sum", "grad_tied:embed_tokens")

    def backward_epilogue(self) -> None:
        """After the backward pass (ZeRO reduces its last bucket)."""

    def build(self) -> None:
        """The model built and prepared: the framework's own."""
        raise NotImplementedError

    def grad_ready(self, key: str, numel: int, from_buffer: bool = False) -> None:
        """The parameter's gradient is complete (``grad_new:<key>`` or the tied buffer ``grad_tied:embed_tokens``)."""
        raise NotImplementedError

    def optimizer_step(self) -> None:
        raise NotImplementedError
