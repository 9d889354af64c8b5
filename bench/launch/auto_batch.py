"""``train.micro_batch: auto`` in the campaign: the estimator's proposal, confirmed by the launch itself.

The cell's own launch is the probe: it runs at the proposed micro-batch and, where it runs out of memory
(which happens in its first step), the cell is launched again a step lower, up to ``MAX_LAUNCHES`` times.
The first launch that is not an out-of-memory is the cell's measurement, so a cell stays one record: it
keeps the matrix's settings (``micro_batch: auto``) and cell id, and ``micro_batch_auto`` says what was
proposed, every launch's micro-batch, status and peak (the trail), and the value chosen (None when every
launch ran out of memory). Each launch has its own folder (the id of its concrete micro-batch).

With repeats, only a cell's first launch probes: later repeats start at the micro-batch its first ok launch
chose (``first_choices``; the campaign remembers it, across a resume too), since launches at different
micro-batches measure different configurations and a median over them is the figure of none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from bench.launch.plan import LaunchPlan
from bench.records import RunRecord
from bench.spec import CellSettings

MAX_LAUNCHES = 4  # a wrong proposal costs at most this many short launches (an OOM ends in its first step)
GIB = 2**30


@dataclass(frozen=True)
class AutoCell:
    """An auto cell to run: its proposal and how to plan a launch at a given micro-batch."""

    cell: CellSettings  # as the matrix gives it (micro_batch: auto)
    repeat: int
    proposed: int | None
    capacity_gib: float | None
    capacity_source: str | None
    plan_for: Callable[[int], LaunchPlan]
    reason: str | None = None  # why there is no proposal


def step_down(mb: int) -> int | None:
    """The next micro-batch to try after an out-of-memory: a quarter lower (at least one), None below 1."""
    lower = mb - max(1, mb // 4)
    return lower if lower >= 1 else None


def plan_auto(cell: CellSettings, repeat: int, capacity: tuple[float | None, str | None],
              plan_for: Callable[[CellSettings], LaunchPlan], margin: float | None) -> AutoCell:
    from bench.estimate.auto_batch import propose, with_micro_batch

    gib, source = capacity
    if gib is None:
        return AutoCell(cell, repeat, None, None, None, lambda mb: plan_for(with_micro_batch(cell, mb)),
                        "train.micro_batch auto: this machine's GPU memory could not be read (NVML). Fix: set "
                        "gpu_memory_gib, pass --capacity-gib, or give a number")
    proposed, _ = propose(cell, gib, source, margin)
    reason = None if proposed else (f"train.micro_batch auto: not even micro-batch 1 is predicted to fit "
                                    f"{gib:.1f} GiB ({source}) with the fit margin. Fix: a larger card, more "
                                    "GPUs or a sharding strategy")
    return AutoCell(cell, repeat, proposed, gib, source, lambda mb: plan_for(with_micro_batch(cell, mb)), reason)


def peak_gib(record: RunRecord) -> float | None:
    """The largest rank's reserved peak of a launch, GiB (None on CPU or where no rank reported)."""
    peaks = [r.get("torch_peak_reserved_bytes") for r in record.ranks if r.get("torch_peak_reserved_bytes")]
    return round(max(peaks) / GIB, 3) if peaks else None


def first_choices(records: list[RunRecord]) -> dict[str, tuple[int, int]]:
    """Per auto cell id, (micro-batch, repeat) of its first ok launch: what its later repeats reuse."""
    found: dict[str, tuple[int, int]] = {}
    for r in records:
        chosen = (r.micro_batch_auto or {}).get("chosen") if r.status == "ok" else None
        if chosen and (r.cell_id not in found or r.repeat < found[r.cell_id][1]):
            found[r.cell_id] = (int(chosen), r.repeat)
    return found


def run_auto(item: AutoCell, launch: Callable[[LaunchPlan], RunRecord],
             reuse: tuple[int, int] | None = None) -> RunRecord:
    """Launch at the proposal, step down on out-of-memory; one record for the auto cell with the trail.

    ``reuse``: (micro-batch, repeat) of the cell's first ok launch. A later repeat starts there instead of at
    the proposal, so that the cell's launches measure one configuration and can be pooled (the report pools
    only launches at one micro-batch); it still steps down should that run out of memory this time. The
    trail marks the reused launch (``reused_from_repeat``).
    """
    trail, mb, record = [], reuse[0] if reuse else item.proposed, None
    while mb is not None and len(trail) < MAX_LAUNCHES:
        record = launch(item.plan_for(mb))
        entry = {"mb": mb, "status": record.status, "peak_gib": peak_gib(record)}
        if reuse and not trail:
            entry["reused_from_repeat"] = reuse[1]
        trail.append(entry)
        if record.status != "oom":
            break
        mb = step_down(mb)
    chosen = trail[-1]["mb"] if trail and trail[-1]["status"] == "ok" else None
    auto = {"proposed": item.proposed, "capacity_gib": item.capacity_gib, "capacity_source": item.capacity_source,
            "trail": trail, "chosen": chosen}
    if reuse:
        auto["reused_from_repeat"] = reuse[1]
    return record.model_copy(update={"cell_id": item.cell.cell_id, "label": item.cell.label,
                                     "settings": item.cell.model_dump(mode="json"), "micro_batch_auto": auto})
