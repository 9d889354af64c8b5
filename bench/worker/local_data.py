"""Batches from a local data set: JSON lines, parquet or a saved `datasets` folder, with a local tokenizer.

Synthetic tokens stay the default (see data.py). Real text matters when padding does: a padded batch
costs the GPU all of its tokens but trains on only the real ones, so every batch carries
``real_tokens`` beside its shape. Three ways to fill a (micro_batch, seq_len) batch:

- ``longest``: pad each batch to its longest record (truncated at seq_len);
- ``max_length``: pad every record to seq_len;
- ``pack``: concatenate records (EOS between them) and cut seq_len chunks: no padding at all.

Each rank reads its own shard (``Dataset.shard``) and starts again when it runs out.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import torch

from bench.spec import CellSettings
from bench.spec.data_source import load_records

IGNORE_INDEX = -100  # labels the loss skips (transformers' convention)


# ---------------------------------------------------------------- reading

def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _token_lists(cell: CellSettings, rank: int, tokenizer, world: int | None = None) -> Iterator[list[int]]:
    """This rank's records as token id lists, forever (a new pass when the shard runs out). ``rank`` and
    ``world``: the data-parallel rank and degree (None: torch.distributed's world)."""
    world = world or _world()[1]
    shard = load_records(cell).shard(num_shards=world, index=rank, contiguous=True)
    if len(shard) == 0:
        raise ValueError(f"data.source {cell.data.source!r}: rank {rank} got no records ({world} ranks); "
                         "give at least one record per rank")
    texts = shard[cell.data.text_field]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if not any(ids):
        raise ValueError(f"data.source {cell.data.source!r}: rank {rank}'s records hold no tokens")
    return itertools.cycle([x for x in ids if x])


# ---------------------------------------------------------------- batching

def _padded(rows: list[list[int]], length: int, pad_id: int) -> dict:
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "real_tokens": int(mask.sum())}


def _padded_batches(cell: CellSettings, docs: Iterator[list[int]], pad_id: int) -> Iterator[dict]:
    t = cell.train
    while True:
        rows = [next(docs)[:t.seq_len] for _ in range(t.micro_batch)]
        length = t.seq_len if cell.data.padding == "max_length" else max(map(len, rows))
        yield _padded(rows, length, pad_id)


def _packed_batches(cell: CellSettings, docs: Iterator[list[int]], eos_id: int | None) -> Iterator[dict]:
    t = cell.train
    need = t.micro_batch * t.seq_len
    buffer: list[int] = []
    while True:
        while len(buffer) < need:
            buffer += next(docs) + ([eos_id] if eos_id is not None else [])
        ids = torch.tensor(buffer[:need], dtype=torch.long).view(t.micro_batch, t.seq_len)
        buffer = buffer[need:]
        yield {"input_ids": ids, "labels": ids.clone(), "real_tokens": ids.numel()}


def local_batches(cell: CellSettings, rank: int, device: torch.device, world: int | None = None) -> Iterator[dict]:
    """Batches of (micro_batch, seq_len) at most from this rank's shard, on ``device``. Under tensor or context
    parallelism ``rank`` and ``world`` are the data-parallel ones: the ranks of a group read the same shard."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cell.data.tokenizer)
    docs = _token_lists(cell, rank, tokenizer, world)
    if cell.data.padding == "pack":
        batches = _packed_batches(cell, docs, tokenizer.eos_token_id)
    else:
        # A tokenizer without a pad token pads with EOS (or 0): the label mask, not the id, hides padding.
        pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        batches = _padded_batches(cell, docs, pad_id)
    for batch in batches:
        yield {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
