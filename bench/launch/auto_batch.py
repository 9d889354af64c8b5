"""``train.micro_batch: auto`` in the campaign: the estimator's proposal, confirmed by the launch itself, then a
climb to the largest micro-batch that fits.

The cell's own launch is the probe. It runs at the proposed micro-batch; where it runs out of memory (which
happens in its first step) the cell is launched again a step lower. Once a launch runs ok and its measured
reserved peak leaves room, the estimator re-proposes from that measurement (bench/estimate/auto_batch.py
``climb``: its error at the launched micro-batch corrects it) and the cell is launched at the largest
micro-batch the corrected prediction says fits, and so on while that finds a larger one, never at or above a
micro-batch that ran out of memory, and at most ``MAX_LAUNCHES`` launches in all. A climb that runs out of
memory (or fails otherwise) ends the search: the capacity is enforced by the ranks themselves, since a
``gpu_memory_gib`` cap is the caching allocator's limit (bench/worker/train.py ``apply_memory_cap``:
torch.cuda.set_per_process_memory_fraction), so a launch over it raises torch's OutOfMemoryError: status oom.

The largest ok launch is the cell's measurement, so a cell stays one record: it keeps the matrix's settings
(``micro_batch: auto``) and cell id, and ``micro_batch_auto`` says what was proposed, every launch's
micro-batch, status and peak (the trail; a climb's entry also ``corrected_gib``, the corrected requirement it
was chosen on), the value chosen (the largest ok micro-batch; None when no launch ran ok) and why the search
``stopped`` (STOP_REASONS). Each launch has its own folder (the id of its concrete micro-batch). A launch
stopped by Ctrl-C or SIGTERM is recorded the same way, as the auto cell's interrupted record with the trail so
far, and so is a search stopped between two launches once one has finished (its record is then the finished
launch's, status interrupted); an interrupted record does not count as done, so a resume runs the search again.

With repeats, only a cell's first launch probes: later repeats start at the micro-batch its first ok launch
chose (``first_choices``; the campaign remembers it, across a resume too) and do not climb, since launches at
different micro-batches measure different configurations and a median over them is the figure of none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from bench.launch.plan import LaunchPlan
from bench.launch.runner import CellInterrupted
from bench.records import CellError, RunRecord
from bench.spec import CellSettings

# A wrong proposal costs at most this many short launches (an OOM ends in its first step). 5, one more than
# before the climb: a cell may step down once or twice and still climb once or twice; a climb normally ends
# after one or two launches, the first correcting the estimator by its error at the launched micro-batch,
# the second also guarded by the growth measured between two ok launches.
MAX_LAUNCHES = 5
# Ctrl-C (or SIGTERM) between two launches of the search: the error of the cell's interrupted record then.
BETWEEN_LAUNCHES = CellError(kind="interrupted", message="stopped by Ctrl-C (or SIGTERM to bench) between two "
                             "launches of the micro-batch search; the launches that finished are in the trail")
GIB = 2**30
STOP_REASONS = (
    "next predicted not to fit",  # the corrected prediction finds no larger micro-batch that fits
    "oom above",  # a climb ran out of memory, or the next micro-batch up already did
    "launch cap",  # MAX_LAUNCHES reached
    "no measured peak",  # an ok launch without a reserved peak (CPU): nothing to correct the estimator with
    "search bound",  # an ok launch at the estimator's search bound (MAX_MICRO_BATCH)
    "reused",  # a later repeat: it runs at the first ok launch's choice and does not climb
    "oom at 1",  # every launch ran out of memory, down to micro-batch 1
    "interrupted",  # Ctrl-C or SIGTERM during a launch
)  # and "<status>" (the first ok launch not reached: crash, hang ...) or "<status> above" (a climb failed so)


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
    margin: float | None = None  # the matrix's estimate_margin, for the climb's predictions


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
    return AutoCell(cell, repeat, proposed, gib, source, lambda mb: plan_for(with_micro_batch(cell, mb)), reason,
                    margin)


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


def next_launch(item: AutoCell, trail: list[dict], reused: bool) -> tuple[int | None, float | None, str | None]:
    """After the trail's last launch: (the next micro-batch, the corrected requirement a climb chose it on,
    None) or (None, None, why the search stops)."""
    last = trail[-1]
    oks = [t for t in trail if t["status"] == "ok"]
    if last["status"] == "oom":
        if oks:  # a climb ran out of memory: the largest ok launch stands
            return None, None, "oom above"
        lower = step_down(last["mb"])
        return (lower, None, None) if lower else (None, None, "oom at 1")
    if last["status"] != "ok":
        return None, None, f"{last['status']} above" if oks else last["status"]
    if reused:
        return None, None, "reused"
    ooms = [t["mb"] for t in trail if t["status"] == "oom"]
    below = min(ooms) if ooms else None
    if below is not None and last["mb"] + 1 >= below:
        return None, None, "oom above"
    if last["peak_gib"] is None or item.capacity_gib is None:
        return None, None, "no measured peak"
    from bench.estimate.auto_batch import MAX_MICRO_BATCH, climb

    if last["mb"] >= MAX_MICRO_BATCH:
        return None, None, "search bound"
    measured = [(t["mb"], t["peak_gib"]) for t in oks if t["peak_gib"] is not None]
    target, corrected = climb(item.cell, item.capacity_gib, item.capacity_source, measured, below, item.margin)
    return (target, corrected, None) if target else (None, None, "next predicted not to fit")


def run_auto(item: AutoCell, launch: Callable[[LaunchPlan, bool], RunRecord],
             reuse: tuple[int, int] | None = None) -> RunRecord:
    """Launch at the proposal, step down on out-of-memory, climb while the measurement leaves room; one record
    for the auto cell: its largest ok launch's (else its last launch's), with the trail.

    ``launch(plan, measured_fit)``: ``measured_fit`` is True for a micro-batch above the proposal (a climb, or a
    repeat reusing one), which a measurement says fits although the estimator alone does not: the campaign
    launches it even where the pre-flight would record it predicted_oom.
    ``reuse``: (micro-batch, repeat) of the cell's first ok launch. A later repeat starts there instead of at
    the proposal, so that the cell's launches measure one configuration and can be pooled (the report pools
    only launches at one micro-batch); it still steps down should that run out of memory this time, and never
    climbs. The trail marks the reused launch (``reused_from_repeat``).
    Raises CellInterrupted with the auto cell's interrupted record when a launch is stopped by Ctrl-C, or when
    Ctrl-C comes between two launches once one has finished (before any, KeyboardInterrupt: nothing to record).
    """
    trail: list[dict] = []
    finished: dict[int, RunRecord] = {}
    try:
        return search(item, launch, reuse, trail, finished)
    except KeyboardInterrupt:
        if not finished:
            raise
        # Nothing runs between two launches, but the finished ones are measurements: keep them as the cell's
        # interrupted record (not done: a resume runs the search again) rather than lose them.
        oks = [mb for mb, r in finished.items() if r.status == "ok"]
        base = finished[max(oks)] if oks else finished[trail[-1]["mb"]]
        stopped = base.model_copy(update={"status": "interrupted", "error": BETWEEN_LAUNCHES})
        raise CellInterrupted(as_auto_record(item, stopped, trail, "interrupted", reuse)) from None


def search(item: AutoCell, launch: Callable[[LaunchPlan, bool], RunRecord], reuse: tuple[int, int] | None,
           trail: list[dict], finished: dict[int, RunRecord]) -> RunRecord:
    """run_auto's loop. Fills ``trail`` and ``finished`` (micro-batch -> its launch's record) as it goes, so
    that an interruption between two launches still has them."""
    mb, corrected, stopped, record = reuse[0] if reuse else item.proposed, None, None, None
    while mb is not None:
        if len(trail) >= MAX_LAUNCHES:
            stopped = "launch cap"
            break
        extra = {"reused_from_repeat": reuse[1]} if reuse and not trail else {}
        if corrected is not None:
            extra["corrected_gib"] = corrected
        try:
            record = launch(item.plan_for(mb), mb > (item.proposed or 0))
        except CellInterrupted as stop:
            trail.append({"mb": mb, "status": "interrupted", "peak_gib": peak_gib(stop.record), **extra})
            raise CellInterrupted(as_auto_record(item, stop.record, trail, "interrupted", reuse)) from None
        trail.append({"mb": mb, "status": record.status, "peak_gib": peak_gib(record), **extra})
        finished[mb] = record
        mb, corrected, stopped = next_launch(item, trail, reuse is not None)
    oks = [mb for mb, r in finished.items() if r.status == "ok"]
    return as_auto_record(item, finished[max(oks)] if oks else record, trail, stopped, reuse)


def as_auto_record(item: AutoCell, record: RunRecord, trail: list[dict], stopped: str | None,
                   reuse: tuple[int, int] | None) -> RunRecord:
    """A launch's record as the auto cell's: its id, label and settings (micro_batch auto) and the search."""
    ok = [t["mb"] for t in trail if t["status"] == "ok"]
    auto = {"proposed": item.proposed, "capacity_gib": item.capacity_gib, "capacity_source": item.capacity_source,
            "trail": trail, "chosen": max(ok) if ok and stopped != "interrupted" else None, "stopped": stopped}
    if reuse:
        auto["reused_from_repeat"] = reuse[1]
    return record.model_copy(update={"cell_id": item.cell.cell_id, "label": item.cell.label,
                                     "settings": item.cell.model_dump(mode="json"), "micro_batch_auto": auto})
