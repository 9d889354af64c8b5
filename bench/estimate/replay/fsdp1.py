"""FSDP1 (FullyShardedDataParallel, use_orig_params): units materialised on meta and flattened, this rank's
slice of each flat parameter kept; unshard and reshard on their own streams, frees through record_stream
bounded by the rate limiter (limit_all_gathers); NO_SHARD keeps the flat parameters whole."""

from __future__ import annotations

from bench.estimate.replay.fsdp import FsdpRun
from bench.estimate.replay.tensors import layer_params, root_params
from bench.strategies import Strategy


class Fsdp1Run(FsdpRun):
    """Ranks differ: each keeps its own slice of every unit's flat parameter."""

    ranks_differ = True
    # The tied embedding's two gradients are summed (out of place) by the node that consumes them, the
    # embedding's view's backward, which runs where the view was made: the unshard stream (see post_backward).
    # A third root-sized block there at the end of the backward, with the gathered root and, next, its flat
    # gradient (memory snapshot of the 1B x2 cell, step after step: 3 x 501 MiB live,
    # results/llama-full-h200-snap/snapshot-vs-replay.md).
    TIED_SUM_STREAM = "unshard"

    @classmethod
    def handles(cls, strategy: Strategy) -> bool:
        return strategy.fsdp_version == 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.no_shard = not self.strategy.shards_at(self.n)  # FSDP1 runs NO_SHARD on one rank
        self.event = 0  # reshard events, in issue order
        self.free_events: list[int] = []  # _free_event_queue

    def units(self) -> list[tuple[str, list[tuple[str, int]]]]:
        """FSDP1's wrapping units in the order they are wrapped: the decoder layers, then the root."""
        units = [(f"layer{i}", layer_params(self.shape)) for i in range(self.shape.layers)]
        return units + [("root", root_params(self.shape))]

    def build(self) -> None:
        """FSDP1 with param_init_fn on a meta model: each unit materialised whole (fp32, one tensor per
        parameter), flattened into a FlatParameter (torch.cat), this rank's slice cloned and the full flat
        parameter freed (FlatParamHandle.shard), then the originals (the module drops them once its
        parameters are views of the shard): (2 + 1/N) x the unit at once, as bench/worker/prepare.py's build_peak_bytes.
        NO_SHARD keeps the flat parameter whole."""
        for unit, params in self.units():
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

    def start_forward(self) -> None:
        # use_orig_params: zero_grad drops the original parameters' gradient views; the flat sharded
        # gradient goes at the next root pre-forward (_reset_flat_param_grad_info_if_needed)
        self.free_all("grad:")

    def unshard(self, unit: str) -> None:
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

    def reshard_after_forward(self, unit: str) -> None:
        if unit == "root":  # FSDP keeps the root gathered for the backward that follows at once
            if self.no_shard:
                self.defer_free("mp_shard:root")
            return
        if self.no_shard:
            self.defer_free(f"mp_shard:{unit}")  # post_reshard frees NO_SHARD's low-precision copy
        elif self.strategy.reshards_after_forward:
            self.reshard(unit)

    def reshard(self, unit: str) -> None:
        """Free the unsharded flat parameter (after the compute that used it: record_stream) and record the
        event FSDP1's rate limiter waits on."""
        self.defer_free(f"unsharded:{unit}")
        self.event += 1
        self.free_events.append(self.event)

    def defer_free(self, name: str) -> None:
        """FSDP1 frees blocks used on other streams through record_stream: reusable once the GPU has run
        that work. The GPU is taken to be as far behind as FSDP1 lets it be: the rate limiter
        (limit_all_gathers) makes the CPU wait, before an all-gather, for the reshard two reshards back;
        nothing else waits until the worker synchronises after the backward and after the step.
        NO_SHARD has no gathers, so nothing waits and its low-precision copies stay pending for the whole
        backward: 3B NO_SHARD on H100 (results/llama-full-h100x4) is over-predicted +11-13 % reserved with the
        allocated peak exact, ~6 GiB of pre_unshard copies never reused. Completing them two units back instead
        (as the gathers' limiter does) gives 3B -2..-3 % but 1B -3..-8 %; a lag of ~16 units fits the 8 NO_SHARD
        records within -4.4..+1.4 %: a GPU about that far behind, not a rule. Left as is: every NO_SHARD record is
        in-sample, and under-predicting is the worse error (2026-11-30)."""
        if self.mem.live(name):
            self.mem.free(name, until=self.event + 1)

    def post_backward(self, unit: str) -> None:
        """The views' gradients are concatenated into the flat parameter's (SplitWithSizesBackward), then on
        the post-backward stream: reduce-scatter into a new 16-bit shard, upcast to fp32 (the sharded
        gradient, kept until the next forward), the 16-bit shard and the unsharded gradient freed; the unit is
        resharded. NO_SHARD all-reduces the unsharded gradient in place and upcasts all of it.
        The flat gradient is made on the unshard stream, not the compute stream: autograd runs a node's backward
        on the stream its forward op ran on, and FSDP1 makes the views (FlatParamHandle._use_unsharded_views,
        torch.split then .view) inside handle.unshard(), under _unshard's ``stream(unshard_stream)``
        (_runtime_utils.py), so the split's backward, the cat, allocates there (the snapshot: a 116 MiB block per
        layer per step on that stream, a fourth 118 MiB segment). It is freed once reduce-scattered (record_stream
        on the post-backward stream) and taken reusable at once: the snapshot completes that free within about a
        layer, and holding it to the rate limiter's next wait (defer_free) piles the gradients up where no gather
        waits (SHARD_GRAD_OP, NO_SHARD: +10-20 % on results/llama-full-h100x4)."""
        numel = self.unit_numel(unit)
        self.alloc(f"flat_grad:{unit}", self.c * numel, "unshard")
        self.free_all(f"unit_grad:{unit}:")
        first = not self.mem.live(f"grad:{unit}")
        if self.no_shard:
            self.alloc(f"grad_fp32_new:{unit}", 4 * numel, "post_backward")
        else:
            self.alloc(f"rs_out:{unit}", self.c * numel / self.n, "post_backward")
            self.alloc(f"grad_fp32_new:{unit}", 4 * numel / self.n, "post_backward")
            self.free(f"rs_out:{unit}")
        self.keep_first_sharded_grad(unit, first)
        self.free(f"flat_grad:{unit}")
        if self.no_shard:
            self.defer_free(f"mp_shard:{unit}")
        else:
            self.reshard(unit)

    def optimizer_step(self) -> None:
        self.adam_states(self.pieces())

    def pieces(self) -> list[tuple[str, float]]:
        """use_orig_params: the optimizer holds each original parameter's part of this rank's flat shard,
        the rank-th 1/N of each unit's flat parameter (all of it under NO_SHARD)."""
        out = []
        for unit, params in self.units():
            size = sum(k for _, k in params) / (1 if self.no_shard else self.n)
            lo = 0 if self.no_shard else self.rank * size
            offset = 0
            for name, k in params:
                part = min(lo + size, offset + k) - max(lo, offset)
                offset += k
                if part > 0:
                    out.append((f"{unit}.{name}", part))
        return out
