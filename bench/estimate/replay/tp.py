"""Tensor parallelism alone (strategy ``tp``, no data-parallel wrapper): one rank of the tensor-parallel group, a
plain torch model of the rank's part of every layer (bench/estimate/parallel.py rank_shape), replayed like one
process with the head's gather added.

Why replayed, not the additive model's constant slack: the caching allocator's free blocks at the peak are not a
fraction of the allocated peak. Llama-3.2-3B, tp 2, seq 2048 x micro-batch 2 on 2x H200 (results/tp-h200) reserved
38.05 GiB at 31.94 allocated (x 1.19), Llama-3.1-8B 79.08 at 77.79 (x 1.017); a 7 % slack gave 3B -10.3 %. The
first step's Adam states (every parameter's slice: 18-48 MiB tensors on 3B) land in the loss's freed fp32 logits
segments (best fit), so the second step's fp32 logits, log-softmax and logits gradient (1.96 GiB each at 4096
tokens x 128256) find them taken and get new segments: 3 x 1.96 GiB more reserved, free again when the optimizer
step makes its allocated peak (replayed: 37.94 GiB at 31.88). On 8B the second step's loss finds room in what the
first left free, and the replay keeps 1.17 GiB free at the peak (measured 1.29): 77.92 GiB for 79.08.

What a rank does (transformers' plan, bench/worker/parallel.py; torch DTensor):
- the build: the model split on meta, then each rank's slice of every parameter materialised in the weights'
  dtype (bench/worker/meta_init.py): no whole model, no untied head built and dropped;
- the head (``colwise_gather_output``): the local linear gives this rank's vocabulary slice of the logits, a
  DTensor Shard(-1) redistributed to Replicate: funcol's all_gather_tensor gathers along dim 0 into a new
  buffer (tp x the slice) and concatenates the chunks along the last dim (the whole logits), the buffer and
  the slice then dropped; in backward the Replicate -> Shard(-1) redistribution clones this rank's slice of
  the logits' gradient (Shard._replicate_to_shard) and the whole gradient goes once it is consumed;
- the row-wise linears' and the embedding's partial outputs are all-reduced into new tensors of the hidden
  size (tens of MiB: left out, as the replay leaves out tensors of a few MiB);
- the optimizer steps over the local slices (foreach over DTensors runs per local tensor).
"""

from __future__ import annotations

from bench.estimate.replay.ddp import DdpRun
from bench.estimate.replay.tensors import model_params
from bench.strategies import Strategy
from bench.strategies.precision import policy_for


class TpRun(DdpRun):
    """Every rank of the group holds the same-sized slices: one rank replayed."""

    replays_tensor_split = True

    @classmethod
    def handles(cls, strategy: Strategy) -> bool:
        return strategy.tensor_only and strategy.splits_layers

    def build(self) -> None:
        nbytes = {"float32": 4, "bfloat16": 2, "float16": 2}[policy_for(self.cell).weight_dtype]
        for name, numel in model_params(self.shape):
            self.alloc(f"param:{name}", nbytes * numel)

    def head_logits(self, v: int) -> None:
        t = self.strategy.tp
        self.alloc("logits_local", self.c * v / t)
        self.alloc("logits_gather", self.c * v)  # all_gather_into_tensor's output: the slices stacked on dim 0
        self.alloc("logits", self.c * v)  # torch.cat of its chunks along the vocabulary
        self.free("logits_gather")
        self.free("logits_local")

    def head_grad_output(self, name: str, v: int) -> None:
        self.alloc("grad_logits_local", self.c * v / self.strategy.tp)
        self.free(name)
