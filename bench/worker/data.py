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


def batch_source(cell: CellSettings, vocab: int, rank: int, device: torch.device) -> Iterator[dict]:
    if cell.data.source == "synthetic":
        return synthetic_batches(cell, vocab, rank, device)
    from bench.worker.local_data import local_batches

    return local_batches(cell, rank, device)
