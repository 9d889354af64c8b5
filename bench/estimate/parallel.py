"""One rank's view of a tensor- or context-parallel cell, for the additive model (bench/estimate/additive.py).

- Tensor parallelism (degree t, transformers' plan: bench/worker/parallel.py) splits every decoder linear by
  heads (q, k, v, o) or by the MLP width (gate, up, down), and the embedding and LM head by vocabulary: one rank
  is the same architecture with heads/t, kv_heads/t, intermediate/t and vocab/t of the embedding and head
  (``rank_shape``), which gives both its parameters and the activations its layers save (q, k, v, attention
  output and the MLP's intermediates are split; the residual stream, the norms and the logits, gathered for
  the loss, are whole on every rank). Only the norms stay whole.
- Data-parallel sharding divides those per-rank states by the state shard degree (``shard_ranks``): under
  accelerate's FSDP2 the flattened dp_shard x cp mesh, so context ranks shard states too; without sharding
  (tensor parallelism alone) nothing more.
- Context parallelism (degree c) gives each rank s/c tokens of every sequence (``rank_seq_len``): every
  activation term scales with the tokens (SDPA's flash/efficient kernels save no s x s scores), the logits and
  the loss too (the inputs and labels are split before the model). Ring attention adds per layer only
  transients (the full sequence's K/V gathered, fp32 merges: bench/estimate/replay/tensors.py). Under FSDP2 at tp 1
  the allocations are replayed (bench/estimate/replay/): a cp rank reserves what a plain FSDP2 rank of the same
  tokens and shards reserves, gigabytes of free blocks that a constant slack misses; tensor parallelism alone
  (full fine-tuning) is replayed at ``rank_shape`` too (bench/estimate/replay/tp.py), FSDP2 + tp stays additive.

Per rank, full fine-tune, Adam in fp32, FSDP2 + tp t + cp c over W ranks (dp_shard d = W/(t c)):
weights + grads + optimizer = 16 B x [layers x linear/t + norms + (embedding + head)/t] / (d c).
Pure arithmetic: no torch import.
"""

from __future__ import annotations

from dataclasses import replace

from bench.spec import CellSettings
from bench.spec.models import ModelShape
from bench.strategies import Strategy


def rank_shape(shape: ModelShape, strategy: Strategy) -> ModelShape:
    """The part of the architecture one tensor-parallel rank holds (the whole shape at tp 1)."""
    t = strategy.tp
    if t == 1:
        return shape
    return replace(shape, heads=shape.heads // t, kv_heads=shape.kv_heads // t, intermediate=shape.intermediate // t,
                   vocab_shards=shape.vocab_shards * t)


def shard_ranks(cell: CellSettings, strategy: Strategy) -> int:
    """Ranks the sharded states are split over: the cell's GPUs for data parallelism alone (as the estimator
    always took it), else the data-parallel shard degree times the context degree under FSDP2."""
    if strategy.tp == 1 and strategy.cp == 1:
        return cell.gpus
    return strategy.state_shards(cell.processes)


def rank_seq_len(cell: CellSettings, strategy: Strategy) -> int:
    """Tokens of each sequence one rank holds: the sequence over the context degree."""
    return cell.train.seq_len // strategy.cp
