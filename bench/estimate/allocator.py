"""A model of PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp, default settings), to
replay an allocation trace and read what ``torch.cuda.max_memory_reserved`` would: pure Python, no torch.

What it keeps of the real allocator (PyTorch 2.x, no PYTORCH_CUDA_ALLOC_CONF: no expandable segments, no
max_split_size, no garbage-collection threshold):

* sizes are rounded up to 512 B (kMinBlockSize);
* requests of at most 1 MiB (kSmallSize) come from the small pool, in 2 MiB segments (kSmallBuffer);
  larger ones from the large pool: a new segment is 20 MiB (kLargeBuffer) for a request under 10 MiB
  (kMinLargeAlloc), else the request rounded up to 2 MiB (kRoundLarge);
* a request takes the smallest free block of its pool *and stream* that fits (best fit; blocks freed on one
  stream are never handed to another), splitting it when the rest is over 1 MiB (large pool) or at least
  512 B (small pool); an unsplit block is counted allocated whole;
* a freed block merges with free neighbours of its segment and stays cached: only ``empty_cache`` (which
  releases the segments with nothing allocated in them) gives memory back.

A block freed after use on another stream (``record_stream``) is reusable only once that stream's work has
run: ``free(name, until=event)`` holds it back until ``complete(event)``; the caller says when that is.

Not modelled: cudaMalloc failing near the card's capacity (the allocator then frees cached segments and
retries, which only lowers reserved).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_BUFFER = 2 << 20
LARGE_BUFFER = 20 << 20
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def round_size(size: int) -> int:
    return max(MIN_BLOCK, -(-size // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass(eq=False)
class _Block:
    segment: int
    offset: int
    size: int
    stream: str
    small: bool
    free: bool = True
    prev: _Block | None = None
    next: _Block | None = None

    def key(self) -> tuple[int, int, int]:
        return (self.size, self.segment, self.offset)


@dataclass
class CachingAllocator:
    """Replays malloc/free; ``peak_reserved`` and ``peak_allocated`` are the torch.cuda max_memory_* stats."""

    reserved: int = 0
    allocated: int = 0
    peak_reserved: int = 0
    peak_allocated: int = 0
    _pools: dict[tuple[str, bool], list[tuple[tuple[int, int, int], _Block]]] = field(default_factory=dict)
    _segments: dict[int, _Block] = field(default_factory=dict)  # segment id -> its first block
    _live: dict[str, _Block] = field(default_factory=dict)
    _pending: list[tuple[int, _Block]] = field(default_factory=list)
    _segment_count: int = 0  # segment ids in cudaMalloc order (the tie-break of best fit, as addresses are)
    phase: str = ""  # set by the caller: what the program is doing
    peak_allocated_phase: str = ""  # the phase in which the allocated peak was reached

    def malloc(self, name: str, size: int, stream: str = "compute") -> None:
        if name in self._live:
            raise ValueError(f"{name} is already allocated")
        size = round_size(size)
        small = size <= SMALL_SIZE
        block = self._take_free(size, stream, small)
        if block is None:
            seg = segment_size(size)
            block = _Block(self._segment_count, 0, seg, stream, small)
            self._segment_count += 1
            self._segments[block.segment] = block
            self.reserved += seg
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        remaining = block.size - size
        if (small and remaining >= MIN_BLOCK) or (not small and remaining > SMALL_SIZE):
            rest = _Block(block.segment, block.offset + size, remaining, stream, small, True, block, block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, size
            self._insert(rest)
        block.free = False
        self._live[name] = block
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated, self.peak_allocated_phase = self.allocated, self.phase

    def free(self, name: str, until: int | None = None) -> None:
        """Free ``name``; with ``until``, a block used on another stream (record_stream): it leaves the
        allocated count now but is reusable only once ``complete(until)`` says that stream's work ran."""
        block = self._live.pop(name)
        self.allocated -= block.size
        if until is not None:
            self._pending.append((until, block))
            return
        self._release(block)

    def complete(self, upto: int | None = None) -> None:
        """The recorded work up to event ``upto`` (all, if None) has run: deferred frees become free blocks."""
        keep = []
        for until, block in self._pending:
            if upto is None or until <= upto:
                self._release(block)
            else:
                keep.append((until, block))
        self._pending = keep

    def _release(self, block: _Block) -> None:
        block.free = True
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                self._remove(neighbour)
                if neighbour is block.prev:
                    neighbour.size += block.size
                    neighbour.next = block.next
                    if block.next is not None:
                        block.next.prev = neighbour
                    if self._segments[block.segment] is block:
                        self._segments[block.segment] = neighbour
                    block = neighbour
                else:
                    block.size += neighbour.size
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
        self._insert(block)

    def rename(self, old: str, new: str) -> None:
        """The same block under another name (a tensor handed on: stolen as .grad, kept as the output)."""
        if new in self._live:
            raise ValueError(f"{new} is already allocated")
        self._live[new] = self._live.pop(old)

    def free_prefix(self, prefix: str) -> None:
        """Free every live allocation whose name starts with ``prefix`` (in allocation order)."""
        for name in self.live_names(prefix):
            self.free(name)

    def live(self, name: str) -> bool:
        return name in self._live

    def live_names(self, prefix: str) -> list[str]:
        return [n for n in self._live if n.startswith(prefix)]

    def reserved_on(self, stream: str) -> int:
        """Bytes of the segments made for ``stream`` (its pools, small and large): what it holds reserved."""
        total = 0
        for first in self._segments.values():
            block = first
            while block is not None:
                total += block.size if block.stream == stream else 0
                block = block.next
        return total

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache: release every segment that is one free block."""
        for seg_id, first in list(self._segments.items()):
            if first.free and first.next is None:
                self._remove(first)
                self.reserved -= first.size
                del self._segments[seg_id]

    # ---------------------------------------------------------------- pools

    def _pool(self, stream: str, small: bool) -> list:
        return self._pools.setdefault((stream, small), [])

    def _insert(self, block: _Block) -> None:
        bisect.insort(self._pool(block.stream, block.small), (block.key(), block))

    def _remove(self, block: _Block) -> None:
        pool = self._pool(block.stream, block.small)
        i = bisect.bisect_left(pool, (block.key(),))
        if i < len(pool) and pool[i][1] is block:
            del pool[i]
            return
        raise KeyError("block not in its pool")

    def _take_free(self, size: int, stream: str, small: bool) -> _Block | None:
        pool = self._pool(stream, small)
        i = bisect.bisect_left(pool, ((size, -1, -1),))
        if i == len(pool):
            return None
        return pool.pop(i)[1]
