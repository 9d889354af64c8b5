"""Where a rank's reserved memory was at its peak, read from a memory snapshot (`bench run --memory-snapshot`).

The memory estimator replays a cell's allocations through a model of PyTorch's caching allocator
(bench/estimate/replay/); when its reserved peak misses, the question is which stream's cached free blocks it
got wrong. A snapshot (torch.cuda.memory._dump_snapshot, written by bench/worker/memory_snapshot.py) holds the
allocator's segments at the end and every event since recording began; walking the events from the state
they imply at the start gives, at the moment the reserved total was highest: per CUDA stream, the bytes
reserved, allocated and cached free, and the event that set the peak. Nothing is launched.

    python benchmarks/memory_snapshot_peak.py results/X/cells/<id>/ranks/memory-snapshot-rank0.pickle

Allocated counts a block from its alloc to its free_requested, as torch's allocated_bytes statistic does
(CUDACachingAllocator's free() lowers it at once; a block still used by another stream stays *reserved and
unusable*, not allocated, until its free_completed): the highest allocated over the events is then the
record's torch_peak_allocated_bytes, printed to check the file against the record. Stream 0 is the default
stream, where compute runs; others are FSDP's, DeepSpeed's or NCCL's side streams. A rank's snapshot holds
its own device's trace (rank 1: device 1): that device is read unless --device says otherwise.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections import defaultdict
from pathlib import Path

GIB = 2**30
GROWS = {"segment_alloc": 1, "segment_map": 1, "segment_free": -1, "segment_unmap": -1}
USES = {"alloc": 1, "free_requested": -1}
LIVE_STATES = ("active_allocated",)  # not "active_pending_free": freed, awaiting a stream


def end_state(snapshot: dict, device: int) -> tuple[dict, dict]:
    """Per stream, (reserved, allocated) bytes when the snapshot was written."""
    reserved, allocated = defaultdict(int), defaultdict(int)
    for seg in snapshot.get("segments", []):
        if seg.get("device", 0) != device:
            continue
        reserved[seg["stream"]] += seg["total_size"]
        allocated[seg["stream"]] += sum(b["size"] for b in seg.get("blocks", []) if b.get("state") in LIVE_STATES)
    return reserved, allocated


def recorded_device(snapshot: dict) -> int:
    """The device whose events were recorded (a rank records its own; the others' traces are empty)."""
    return next((i for i, trace in enumerate(snapshot["device_traces"]) if trace), 0)


def at_peak(snapshot: dict, device: int | None = None) -> dict:
    """The reserved peak over the recorded events and each stream's reserved / allocated / free bytes then;
    also the highest allocated total over the events."""
    device = recorded_device(snapshot) if device is None else device
    events = snapshot["device_traces"][device]
    reserved, allocated = end_state(snapshot, device)
    for e in events:  # back to the state when recording began
        reserved[e["stream"]] -= GROWS.get(e["action"], 0) * e["size"]
        allocated[e["stream"]] -= USES.get(e["action"], 0) * e["size"]
    best = {"reserved": sum(reserved.values()), "event": None, "streams": _streams(reserved, allocated)}
    peak_allocated = sum(allocated.values())
    for i, e in enumerate(events):
        reserved[e["stream"]] += GROWS.get(e["action"], 0) * e["size"]
        allocated[e["stream"]] += USES.get(e["action"], 0) * e["size"]
        peak_allocated = max(peak_allocated, sum(allocated.values()))
        total = sum(reserved.values())
        if total > best["reserved"]:
            best = {"reserved": total, "event": {"index": i, "action": e["action"], "size": e["size"],
                                                  "stream": e["stream"]},
                    "streams": _streams(reserved, allocated)}
    best["allocated"] = sum(s["allocated"] for s in best["streams"].values())
    best["events"], best["device"], best["peak_allocated"] = len(events), device, peak_allocated
    return best


def _streams(reserved: dict, allocated: dict) -> dict:
    return {s: {"reserved": reserved[s], "allocated": allocated.get(s, 0), "free": reserved[s] - allocated.get(s, 0)}
            for s in sorted(reserved) if reserved[s]}


def render(peak: dict) -> str:
    lines = [f"reserved peak {peak['reserved'] / GIB:.2f} GiB, allocated then {peak['allocated'] / GIB:.2f} GiB "
             f"({peak['events']} events recorded on device {peak['device']}; "
             f"allocated peak over them {peak['peak_allocated'] / GIB:.2f} GiB)"]
    if peak["event"]:
        e = peak["event"]
        lines.append(f"set by event {e['index']}: {e['action']} of {e['size'] / GIB:.2f} GiB on stream {e['stream']}")
    lines.append("| stream | reserved GiB | allocated GiB | cached free GiB |")
    lines.append("| --- | ---: | ---: | ---: |")
    for stream, s in peak["streams"].items():
        lines.append(f"| {stream} | {s['reserved'] / GIB:.2f} | {s['allocated'] / GIB:.2f} | {s['free'] / GIB:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("snapshot", type=Path)
    p.add_argument("--device", type=int, default=None,
                   help="device index inside the snapshot (default: the one with recorded events, the rank's own)")
    args = p.parse_args(argv)
    try:
        snapshot = pickle.loads(args.snapshot.read_bytes())
        print(render(at_peak(snapshot, args.device)))
    except (OSError, pickle.UnpicklingError, KeyError, IndexError) as exc:
        print(f"error: {args.snapshot} is not a readable memory snapshot ({exc!r}). Fix: give a "
              "memory-snapshot-rank<k>.pickle written by `bench run --memory-snapshot`", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
