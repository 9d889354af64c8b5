"""Batches for the fixed step: synthetic tokens by default.

Throughput and memory depend on the batch shape, not the token values, so synthetic batches of the
configured shape measure the same thing as real text, with no data set to ship.
"""

from __future__ import annotations

from typing import Iterator

import torch

from bench.spec import CellSettings


def synthetic_batches(cell: CellSettings, vocab: int, rank: int, device: torch.device) -> Iterator[dict]:
    g = torch.Generator().manual_seed(cell.train.seed * 1000 + rank)
    shape = (cell.train.micro_batch, cell.train.seq_len)
    while True:
        ids = torch.randint(0, vocab, shape, generator=g).to(device)
        yield {"input_ids": ids, "labels": ids, "real_tokens": ids.numel()}


def data_parallel_rank(cell: CellSettings, rank: int, world: int) -> tuple[int, int]:
    """(data-parallel rank, degree) of a global rank: the ranks of one tensor/context group share a batch.

    accelerate lays the mesh out as (dp_replicate, dp_shard, cp, tp) with tp innermost (ParallelismConfig.
    _get_mesh): ranks r and r' are in one tp x cp group when r // (tp x cp) == r' // (tp x cp).
    """
    group = cell.tp * cell.cp
    return rank // group, max(1, world // group)


def batch_source(cell: CellSettings, vocab: int, rank: int, device: torch.device, world: int = 1) -> Iterator[dict]:
    """``rank``/``world``: the global ones; every rank of a tensor/context group gets the same batches."""
    dp_rank, dp_world = data_parallel_rank(cell, rank, world)
    if cell.data.source == "synthetic":
        return synthetic_batches(cell, vocab, dp_rank, device)
    from bench.worker.local_data import local_batches

    return local_batches(cell, dp_rank, device, dp_world)
