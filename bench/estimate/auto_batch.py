"""``train.micro_batch: auto``: the largest micro-batch the estimator says fits a capacity, and the largest
its prediction corrected by a measurement says fits (the climb).

"Fits" is the estimator's own fit decision (bench/estimate/prediction.py ``with_capacity``): the prediction
times (1 + the framework's fit margin) within the capacity, so the proposal errs small by the margin that
the measured out-of-sample errors give. The prediction grows with the micro-batch (activations and logits
scale with the tokens, states do not), so the largest fitting value is found by galloping up (1, 2, 4 ...
above the last that fits), then bisection.

The launch confirms the proposal (bench/launch/auto_batch.py steps down on an out-of-memory) and, where its
measured reserved peak leaves room, climbs: ``climb`` re-proposes from the measurement (see there).
"""

from __future__ import annotations

from typing import Callable

from bench.estimate.additive import predict
from bench.estimate.prediction import CALIBRATION, Calibration, Prediction
from bench.spec import CellSettings

MAX_MICRO_BATCH = 512  # a search bound, far above what a training step of a real model fits


def with_micro_batch(cell: CellSettings, micro_batch: int) -> CellSettings:
    """The same cell at a given micro-batch (its own cell id)."""
    return cell.model_copy(update={"train": cell.train.model_copy(update={"micro_batch": micro_batch})})


def largest_fitting(fits: Callable[[int], bool], low: int, high: int) -> int:
    """The largest n in [low, high] with ``fits(n)``, given that ``low`` fits (or is 0: none known) and that
    fitting only gets harder as n grows: gallop up from ``low`` by 1, 2, 4 ... then bisect; ``low`` itself
    when nothing above it fits."""
    step = 1
    while low + step <= high and fits(low + step):
        low, step = low + step, step * 2
    high = min(low + step, high + 1)  # low fits, high does not (or is past the bound)
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def propose(cell: CellSettings, capacity_gib: float, capacity_source: str | None, margin: float | None = None,
            calib: Calibration = CALIBRATION) -> tuple[int | None, Prediction | None]:
    """(largest micro-batch predicted to fit, its prediction); (None, None) when not even 1 fits or the
    strategy cannot be described."""
    def at(mb: int) -> Prediction | None:
        return predict(with_micro_batch(cell, mb), calib, margin, capacity_gib, capacity_source)

    def fits(mb: int) -> bool:
        pred = at(mb)
        return pred is not None and pred.fits

    best = largest_fitting(fits, 0, MAX_MICRO_BATCH)
    return (best, at(best)) if best else (None, None)


def climb(cell: CellSettings, capacity_gib: float, capacity_source: str | None, measured: list[tuple[int, float]],
          below: int | None = None, margin: float | None = None,
          calib: Calibration = CALIBRATION) -> tuple[int | None, float | None]:
    """The largest micro-batch above the largest measured one whose corrected prediction fits the capacity with
    the fit margin, and that corrected requirement (GiB); (None, None) when none does.

    ``measured``: (micro-batch, measured torch reserved peak GiB, the largest rank's) of the launches that ran
    ok; ``below``: the smallest micro-batch that ran out of memory (the climb stays under it).

    The correction: anchor at the largest ok launch, add the estimator's error there as an offset (measured
    minus predicted reserved peak), and grow from it by the estimator's per-sample growth. Why so: what the
    estimator gets wrong at a micro-batch (allocator slack, a buffer it over- or under-counts) is mostly
    there at the next few too, so the offset carries it; the growth with the micro-batch is the part the
    estimator models (activations and logits per token), and a climb of a few samples from the anchor leans
    little on it. Scaling the whole prediction by the ratio measured/predicted instead would also scale the
    states, which do not grow, and misplace the error. Once two launches ran ok, their measured growth per
    sample is known too, but the difference of two reserved peaks a few samples apart is coarse (the caching
    allocator grows in whole segments), so it is used only as a guard: the climb takes the steeper of the two
    growths. That way a noisy measured slope can only make the climb more careful, and an estimator that
    under-predicts the growth is caught after the first climb (the first climb, on its growth alone, may run
    out of memory: the launch then says so, and the cell keeps its largest ok launch).
    """
    if not measured:
        return None, None
    points = sorted(measured)
    anchor_mb, anchor_gib = points[-1]
    anchor = predict(with_micro_batch(cell, anchor_mb), calib, margin, capacity_gib, capacity_source)
    if anchor is None or anchor.required_gib is None:
        return None, None
    offset = anchor_gib - anchor.peak_reserved_gib
    slope = None
    if len(points) > 1 and points[-2][0] < anchor_mb:
        slope = (anchor_gib - points[-2][1]) / (anchor_mb - points[-2][0])

    def corrected(mb: int) -> float:
        pred = predict(with_micro_batch(cell, mb), calib, margin, capacity_gib, capacity_source)
        growth = pred.required_gib - anchor.required_gib
        if slope is not None:
            growth = max(growth, slope * (mb - anchor_mb))
        return anchor.required_gib + offset + growth

    def fits(mb: int) -> bool:
        return corrected(mb) * (1 + anchor.fit_margin) <= capacity_gib

    high = min(MAX_MICRO_BATCH, below - 1 if below else MAX_MICRO_BATCH)
    best = largest_fitting(fits, anchor_mb, high)
    return (best, round(corrected(best), 3)) if best > anchor_mb else (None, None)
