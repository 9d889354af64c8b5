"""The allocation replay: a full fine-tuning cell's GPU allocations through the caching-allocator model,
one module per framework over a shared base (base.py; what it replays and why: its docstring)."""

from __future__ import annotations

from bench.estimate.replay.base import Replay, Run
from bench.estimate.replay.ddp import DdpRun
from bench.estimate.replay.fsdp1 import Fsdp1Run
from bench.estimate.replay.fsdp2 import Fsdp2Run, offload_copy_in_pool
from bench.estimate.replay.tensors import layer_activations
from bench.estimate.replay.tp import TpRun
from bench.estimate.replay.zero12 import Zero12Run
from bench.estimate.replay.zero3 import Zero3Run
from bench.spec.schema import CellSettings
from bench.spec.models import ModelShape, has_local_weights
from bench.strategies import Strategy, is_user_config

__all__ = ["RUNS", "Replay", "covers", "layer_activations", "offload_copy_in_pool", "replay", "run_for"]

RUNS: tuple[type[Run], ...] = (TpRun, DdpRun, Zero12Run, Zero3Run, Fsdp1Run, Fsdp2Run)


def run_for(strategy: Strategy) -> type[Run] | None:
    """The framework's replay: the one class that says it handles the strategy."""
    return next((run for run in RUNS if run.handles(strategy)), None)


def covers(cell: CellSettings, strategy: Strategy | None) -> bool:
    """Cells whose allocations are written down here: full fine-tuning on CUDA from a random init (local
    weights load another way), no offload but ZeRO-1/2's optimizer offload and FSDP2's CPU offload, catalogue
    strategies (a user's config may set anything), of the tensor-parallel layouts only tensor parallelism alone."""
    return (strategy is not None and cell.device == "cuda" and cell.adapter.type == "none"
            and not is_user_config(cell.strategy) and not has_local_weights(cell.model)
            and (run := run_for(strategy)) is not None and (not strategy.offloads or run.replays_offload(strategy))
            # tensor-parallel layouts: tensor parallelism alone is replayed (tp.py), FSDP2 + tp the additive model
            and (not strategy.splits_layers or run.replays_tensor_split))


def replay(cell: CellSettings, shape: ModelShape, strategy: Strategy, calib=None) -> Replay | None:
    """The replay of the rank with the highest reserved peak (the records keep the max over ranks). Ranks
    differ where they hold different parts of the model: ZeRO-1/2's partitions (rank 0 holds the
    embedding) and FSDP1's flat shards; FSDP2 splits every parameter evenly and DDP replicates."""
    if not covers(cell, strategy):
        return None
    run = run_for(strategy)
    ranks = range(cell.gpus) if run.ranks_differ else range(1)
    runs = [run(cell, shape, strategy, rank, calib).replay() for rank in ranks]
    return max(runs, key=lambda r: (r.peak_reserved, r.peak_allocated))
